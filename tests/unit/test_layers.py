"""The package's rooms import only downwards, without cycles, and reading the workflow stays light."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "neuronaudit"

#: Layer of each room, bottom first; a module may import its own layer and the ones below.
LAYERS = {
    "errors": 0, "cluster": 1, "io": 1, "resources": 1, "config_files": 1, "prompts": 2, "options": 2, "shards": 2,
    "models": 3,
    "interventions": 4,
    "evaluation": 5, "preconditions": 5, "config": 6, "methods": 6, "report": 7, "stages": 8, "cli": 9, "study_diff": 9,
    "bench": 9, "estimate": 9, "testing": 9, "planted": 9, "planted_reasoning": 9, "publish": 9, "resume": 9,
    "__init__": 0, "__main__": 9,
}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_imports() -> dict[str, set[str]]:
    """Module -> the neuronaudit modules it imports at module level (function bodies left out)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neuronaudit"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("neuronaudit")}
        graph[name] = targets
    return graph


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, targets in module_imports().items():
        for target in targets:
            if target == "neuronaudit":
                continue
            if LAYERS[room(target)] > LAYERS[room(module)]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_import_cycles():
    graph = module_imports()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*stack, node, nxt])}")
            if nxt in graph and state.get(nxt) != 2:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if state.get(node) != 2:
            visit(node, [])


def test_reading_the_workflow_imports_neither_torch_nor_matplotlib():
    code = ("import sys, neuronaudit.config, neuronaudit.options, neuronaudit.report.captions; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'seaborn', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_preparing_a_prompt_set_imports_neither_torch_nor_transformers():
    code = ("import sys, neuronaudit.cli, neuronaudit.stages.prepare; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
