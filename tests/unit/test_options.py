"""Every schema key reaches a stage through its options dataclass (or is read by the workflow),
no stage reads a key the schema lacks, and the options survive the JSON trip through the CLI."""

import dataclasses
import re
from pathlib import Path

import pytest

from neuronaudit.config import load_schema
from neuronaudit.errors import NeuronAuditError
from neuronaudit.options import (
    STAGE_OPTIONS,
    WORKFLOW_KEYS,
    ScreenOptions,
    StageOptions,
    WindowOptions,
)
from neuronaudit.testing import default_config, stage_options

ROOT = Path(__file__).resolve().parents[2]


def schema_keys(schema: dict, prefix: str = "") -> set[str]:
    """Dotted leaf keys of the schema (an object with declared properties is walked into)."""
    keys = set()
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        if sub.get("type") == "object" and sub.get("properties"):
            keys |= schema_keys(sub, path + ".")
        else:
            keys.add(path)
    return keys


def option_keys(cls: type[StageOptions]) -> set[str]:
    """Dotted schema keys a stage's options read, nested options included."""
    keys = set()
    nested = cls._nested()
    for name, path in cls.field_keys().items():
        keys |= option_keys(nested[name]) if name in nested else {path}
    return keys


ALL_OPTION_KEYS = set().union(*(option_keys(c) for c in STAGE_OPTIONS.values()))


def test_every_schema_key_reaches_a_stage_or_the_workflow():
    keys = schema_keys(load_schema())
    unread = keys - ALL_OPTION_KEYS - set(WORKFLOW_KEYS)
    assert not unread, f"schema keys no stage reads: {sorted(unread)}"


def test_no_stage_reads_a_key_the_schema_lacks():
    keys = schema_keys(load_schema())
    unknown = (ALL_OPTION_KEYS | set(WORKFLOW_KEYS)) - keys
    assert not unknown, f"keys outside the schema: {sorted(unknown)}"


def test_workflow_keys_are_read_by_the_rules():
    rules = "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk")) + (ROOT / "Snakefile").read_text()
    rules += (ROOT / "src" / "neuronaudit" / "config.py").read_text()  # study_name, collected_sets, swept_set
    for key in WORKFLOW_KEYS:
        parts = key.split(".")
        pattern = "".join(rf"\[[\"']{re.escape(p)}[\"']\]" for p in parts)
        assert re.search(pattern, rules), f"workflow key {key} is never read"


@pytest.mark.parametrize("rule", sorted(STAGE_OPTIONS))
def test_options_have_no_defaults_and_round_trip_through_json(rule):
    cls = STAGE_OPTIONS[rule]
    for f in dataclasses.fields(cls):
        assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name
    options = cls.from_config(default_config())
    assert cls.from_json(options.to_json()) == options


def test_options_follow_the_config_values():
    config = default_config(screen={"k": 7, "rank_by": "std_delta"}, seed=3, window={"n_prompts": 2},
                            model={"system_prompt": "Be brief."})
    screen = ScreenOptions.from_config(config)
    assert (screen.k, screen.rank_by, screen.seed) == (7, "std_delta", 3)
    window = WindowOptions.from_config(config)
    assert window.n_prompts == 2 and window.model.system_prompt == "Be brief." and window.seed == 3


def test_every_rule_passes_its_stage_options():
    rules = "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))
    for rule in STAGE_OPTIONS:
        if rule == "report":  # reads the whole resolved config from config.json
            continue
        assert f'stage_options("{rule}")' in rules, rule


def test_bad_options_json_is_one_line_errors():
    good = stage_options(ScreenOptions).to_dict()
    with pytest.raises(NeuronAuditError, match="unknown option 'top_n'"):
        ScreenOptions.from_dict({**good, "top_n": 3})
    with pytest.raises(NeuronAuditError, match="option 'seed' of ScreenOptions is missing"):
        ScreenOptions.from_dict({k: v for k, v in good.items() if k != "seed"})
    with pytest.raises(NeuronAuditError, match="not valid JSON"):
        ScreenOptions.from_json("{nope")
