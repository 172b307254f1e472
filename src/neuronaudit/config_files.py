"""Config files read before anything expands them: repeated keys, alias bombs, non-UTF-8 text.

YAML lets a key repeat in one mapping (the loader silently keeps the last) and lets an alias
stand for a whole subtree, so a few lines can describe billions of values (the "billion laughs"
file). The parser shares an aliased subtree, but whatever walks the config afterwards (schema
validation, an error message that prints the config, a merge of files) expands it and hangs.

:func:`read_config_file` composes a file's node graph, refuses repeated keys and self-referring
aliases, and counts the values the document stands for with every alias expanded; the count is
memoised per node, so it costs as much as the file and a bomb fails in milliseconds.
:func:`check_config_size` counts an already-loaded config the same way (Snakemake's merge of
``--configfile`` files and ``--config`` values) before validation walks it. Every failure is one
line naming the file or the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from neuronaudit.errors import NeuronAuditError

#: The most values (mappings, lists and scalars, aliases expanded) a config may stand for. The
#: default config has about 350; a config with thousands of prompt sets stays far below.
MAX_CONFIG_VALUES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _key_path(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _too_big(where: str) -> str:
    return (f"expands to more than {MAX_CONFIG_VALUES} values once its YAML aliases are expanded "
            f"(at key {where or '(top level)'}); a study config has a few hundred")


class _Counter:
    """Values a YAML node graph stands for, aliases expanded, each node counted once."""

    def __init__(self, name: str):
        self.name = name
        self.sizes: dict[int, int] = {}
        self.open: set[int] = set()

    def size(self, node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in self.sizes:
            return self.sizes[key]
        if key in self.open:
            raise NeuronAuditError(f"config file {self.name!r}: key {path or '(top level)'} is an alias "
                                   "of a value that contains it")
        self.open.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(self.size(item, _key_path(path, i)) for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            self.check_repeats(node, path)
            for k, v in node.value:
                n += self.size(k, path) + self.size(v, _key_path(path, getattr(k, "value", "?")))
        self.open.discard(key)
        self.sizes[key] = n
        if n > MAX_CONFIG_VALUES:
            raise NeuronAuditError(f"config file {self.name!r} {_too_big(path)}")
        return n

    def check_repeats(self, node: yaml.MappingNode, path: str) -> None:
        lines: dict[tuple[str, str], int] = {}
        for k, _ in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == _MERGE_TAG:
                continue  # a merge key (<<) may be overridden on purpose
            line = k.start_mark.line + 1
            if (k.tag, k.value) in lines:
                raise NeuronAuditError(
                    f"config file {self.name!r}: key {_key_path(path, k.value)} is given twice "
                    f"(lines {lines[k.tag, k.value]} and {line}); YAML would silently keep the last")
            lines[k.tag, k.value] = line


def _reject_repeats(name: str):
    def pairs(items: list) -> dict:
        seen = set()
        for key, _ in items:
            if key in seen:
                raise NeuronAuditError(f"config file {name!r}: key {key} is given twice; "
                                       "JSON would silently keep the last")
            seen.add(key)
        return dict(items)

    return pairs


def read_config_file(path: str | Path) -> dict:
    """A config file's mapping, read as Snakemake reads it (JSON first, then YAML), refusing a
    file that is missing, empty, not UTF-8, repeats a key or expands past
    :data:`MAX_CONFIG_VALUES` values."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise NeuronAuditError(f"config file {name!r} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise NeuronAuditError(f"config file {name!r} is not UTF-8 text (byte {data[err.start]:#04x} "
                               f"on line {line})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_reject_repeats(name))
    except json.JSONDecodeError:
        doc = _read_yaml(name, text)
    else:
        check_config_size(doc, name)
    if doc is None:
        raise NeuronAuditError(f"config file {name!r} is empty")
    if not isinstance(doc, dict):
        raise NeuronAuditError(f"config file {name!r} must hold a mapping of keys, not {type(doc).__name__}")
    return doc


def _read_yaml(name: str, text: str):
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _Counter(name).size(node, "")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise NeuronAuditError(f"config file {name!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise NeuronAuditError(f"config file {name!r} is nested too deeply") from None
    finally:
        loader.dispose()


def check_config_size(config, name: str | None = None) -> None:
    """Refuse a loaded config that stands for more than :data:`MAX_CONFIG_VALUES` values
    (shared subtrees counted at every use, computed once)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(value, path: str) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise NeuronAuditError(f"config key {path or '(top level)'}: contains itself")
        open_.add(key)
        if isinstance(value, dict):
            n = 1 + sum(1 + size(v, _key_path(path, k)) for k, v in value.items())
        else:
            n = 1 + sum(size(v, _key_path(path, i)) for i, v in enumerate(value))
        open_.discard(key)
        sizes[key] = n
        if n > MAX_CONFIG_VALUES:
            where = f"config file {name!r}" if name else "config"
            raise NeuronAuditError(f"{where} {_too_big(path)}")
        return n

    size(config, "")
