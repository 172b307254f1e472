"""Config: the schema agrees with config/config.yaml, bad keys are named, preflight catches inputs."""

import re
from pathlib import Path

import pytest
import yaml

from neuronaudit.config import (
    ACCURACY_GROUPS,
    GENERIC_SET,
    load_config,
    load_schema,
    preflight,
    study_name,
    validate_config,
)
from neuronaudit.errors import NeuronAuditError

ROOT = Path(__file__).resolve().parents[2]

#: The sets the keystone and CNA stages score capability on, which keystone.groups must hold.
CAPABILITY_SETS = (GENERIC_SET, *ACCURACY_GROUPS)


def capability_sets(path) -> dict:
    return {name: str(path) for name in CAPABILITY_SETS}


NAMED_MAPS = ("sets", "behaviours", "thresholds", "tasks", "difficulty")  # keys are user-chosen names (or kinds)


def _keys(schema, prefix=""):
    out = set()
    for key, sub in schema.get("properties", {}).items():
        out.add(prefix + key)
        if key not in NAMED_MAPS:
            out |= _keys(sub, prefix + key + ".")
    return out


def _config_keys(cfg, prefix=""):
    out = set()
    for key, value in cfg.items():
        out.add(prefix + key)
        if isinstance(value, dict) and key not in NAMED_MAPS:
            out |= _config_keys(value, prefix + key + ".")
    return out


def test_default_config_sets_every_schema_key_and_nothing_else():
    raw = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert _config_keys(raw) == _keys(load_schema())


def test_every_config_key_is_commented():
    """Top-level and section keys each carry a comment (inline or on the line above); entries
    of named maps (prompt sets, behaviours) are documented by their map's comment."""
    lines = (ROOT / "config" / "config.yaml").read_text().splitlines()
    sections = {k for k, v in yaml.safe_load("\n".join(lines)).items() if isinstance(v, dict)}
    for i, line in enumerate(lines):
        key = re.match(r"^( {0,2})([A-Za-z_]+):", line)
        if key and key.group(2) not in sections:
            commented = "#" in line or lines[i - 1].strip().startswith("#")
            assert commented, f"config key {key.group(2)!r} (line {i + 1}) has no comment"


def test_defaults_fill_in_and_quick_config_merges(tmp_path):
    cfg = load_config(ROOT / "config" / "config.yaml")
    assert cfg["collect"]["positions"] == "prompt" and cfg["model"]["dtype"] == "float32"
    minimal = validate_config({"prompts": {"sets": {"a": "a.jsonl"}}})
    assert minimal["model"]["source"] == "embedded:SmolLM2-135M-Instruct"
    assert study_name(minimal) == "SmolLM2-135M-Instruct"
    qwen = validate_config({"prompts": {"sets": {"a": "x"}}, "model": {"source": "Qwen/Qwen2.5-0.5B"}})
    assert study_name(qwen) == "Qwen--Qwen2.5-0.5B"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"colect": {}},
         r"config key \(top level\): Additional properties are not allowed \('colect' was unexpected\)"),
        ({"refusal": {"batch_size": "8"}}, r"config key refusal.batch_size: '8' is not of type 'integer'"),
        ({"collect": {"batch_size": "8"}}, r"config key collect.batch_size: '8' is not an integer ≥ 1 or 'auto'"),
        ({"model": {"dtype": "float8"}}, r"config key model.dtype: 'float8' is not one of"),
        ({"prompts": {"sets": {"a": "a.jsonl"}, "heldout_fraction": 1.5}}, r"config key prompts.heldout_fraction"),
    ],
)
def test_bad_config_names_the_key(override, message):
    cfg = {"prompts": {"sets": {"a": "a.jsonl"}}}
    cfg.update(override)
    with pytest.raises(NeuronAuditError, match=message):
        validate_config(cfg)


def test_preflight_catches_missing_inputs_and_bad_layers(tiny_model_dir, tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt_id": "a", "text": "hi"}\n')
    base = {"model": {"source": str(tiny_model_dir)}, "prompts": {"sets": {"p": str(good), **capability_sets(good)}},
            "refusal": {"tune": False}, "screen": {"universal_sets": ["p"]},
            "keystone": {"groups": ["p", *CAPABILITY_SETS]}}
    assert preflight(validate_config(base), ROOT).kind == "local"
    with pytest.raises(NeuronAuditError, match="layer index 7 is out of range .* with 4 layers"):
        preflight(validate_config({**base, "collect": {"layers": [7]}}), ROOT)
    with pytest.raises(NeuronAuditError, match="missing.jsonl' not found"):
        sets = {**base["prompts"]["sets"], "p": str(tmp_path / "missing.jsonl")}
        preflight(validate_config({**base, "prompts": {"sets": sets}}), ROOT)
    with pytest.raises(NeuronAuditError, match="unknown prompt set 'q'"):
        preflight(validate_config({**base, "collect": {"sets": ["q"]}}), ROOT)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 16)
    with pytest.raises(NeuronAuditError, match="is not a GGUF file"):
        preflight(validate_config({**base, "model": {"source": str(fake)}}), ROOT)


def test_stage_references_and_judge_are_checked_before_work(tiny_model_dir, tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt_id": "a", "text": "hi"}\n')
    base = {"model": {"source": str(tiny_model_dir)}, "prompts": {"sets": {"p": str(good), **capability_sets(good)}},
            "refusal": {"tune": False}, "screen": {"universal_sets": ["p"]},
            "keystone": {"groups": ["p", *CAPABILITY_SETS]}}
    with pytest.raises(NeuronAuditError, match="behaviours.x.positive names unknown prompt set 'nope'"):
        preflight(validate_config(
            {**base, "behaviours": {"x": {"positive": "nope", "negative": "p", "oracle": "format"}}}), ROOT)
    with pytest.raises(NeuronAuditError, match="judge threshold max_perplexity=-1"):
        preflight(validate_config({**base, "judge": {"thresholds": {"max_perplexity": -1}}}), ROOT)
    with pytest.raises(NeuronAuditError, match="refusal.tune"):
        preflight(validate_config({**base, "refusal": {"tune": True}}), ROOT)


def test_cli_strings_are_coerced_where_the_schema_wants_numbers():
    from neuronaudit.config import coerce_cli_strings, validate_config

    raw = {"study": 123, "window": {"x_grid": ["0.5", "2.0"], "n_prompts": "4"}, "refusal": {"tune": "false"},
           "model": {"source": "embedded:SmolLM2-135M-Instruct"}, "keystone": {"k_max": "many"}}
    out = coerce_cli_strings(raw)
    assert out["study"] == "123"
    assert out["window"] == {"x_grid": [0.5, 2.0], "n_prompts": 4}
    assert out["refusal"]["tune"] is False
    assert out["model"]["source"] == "embedded:SmolLM2-135M-Instruct"
    assert out["keystone"]["k_max"] == "many"  # left for validation to name
    with pytest.raises(NeuronAuditError, match="keystone.k_max"):
        validate_config(out)


def _batch_size_keys(schema, prefix=""):
    out = set()
    for key, sub in schema.get("properties", {}).items():
        if key.endswith("batch_size") or key.endswith("_batch"):
            out.add(prefix + key)
        if key not in NAMED_MAPS:
            out |= _batch_size_keys(sub, prefix + key + ".")
    return out


def _with(key: str, value) -> dict:
    section, name = key.split(".")
    return {"prompts": {"sets": {"a": "a.jsonl"}}, section: {name: value}}


def test_every_batch_size_but_the_optimisers_takes_auto():
    from neuronaudit.options import AUTO_BATCH_KEYS

    assert _batch_size_keys(load_schema()) == {*AUTO_BATCH_KEYS, "refusal.batch_size"}
    for key in AUTO_BATCH_KEYS:
        section, name = key.split(".")
        assert validate_config(_with(key, "auto"))[section][name] == "auto"
        assert validate_config(_with(key, 3))[section][name] == 3
        for bad in (0, -2, "big", 2.5, True):
            with pytest.raises(NeuronAuditError, match=rf"config key {key}: .* is not an integer ≥ 1 or 'auto'"):
                validate_config(_with(key, bad))
    with pytest.raises(NeuronAuditError, match="config key refusal.batch_size: 'auto' is not of type 'integer'"):
        validate_config(_with("refusal.batch_size", "auto"))


def test_a_batch_size_from_the_command_line_is_a_number_or_auto():
    from neuronaudit.config import coerce_cli_strings

    out = coerce_cli_strings({"collect": {"batch_size": "64"}, "window": {"row_batch_size": "auto"},
                              "reasoning": {"prefix_batch": "big"}})
    assert out == {"collect": {"batch_size": 64}, "window": {"row_batch_size": "auto"},
                   "reasoning": {"prefix_batch": "big"}}
    with pytest.raises(NeuronAuditError, match="reasoning.prefix_batch: 'big' is not an integer ≥ 1 or 'auto'"):
        validate_config({"prompts": {"sets": {"a": "a.jsonl"}}, **out})


def test_keystone_groups_must_hold_the_capability_sets():
    from neuronaudit.config import check_references, load_config

    config = load_config(ROOT / "config" / "config.yaml", ["keystone={groups: [task_code, task_chat, generic]}"])
    with pytest.raises(NeuronAuditError, match=r"keystone.groups must include generic and task_knowledge and "
                                               r"task_arithmetic .*missing: \['task_knowledge', 'task_arithmetic'\]"):
        check_references(config)


def test_the_cli_help_prints():
    from neuronaudit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0


def test_the_tuned_models_key_follows_base_data_split_and_recipe_only(tmp_path):
    import shutil

    from neuronaudit.config import load_config, tuned_model_key

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "config" / "config.yaml")
    key = tuned_model_key(config, root)
    assert len(key) == 16 and key == tuned_model_key(config, root)

    def changed(*overrides):
        return tuned_model_key(load_config(root / "config" / "config.yaml", list(overrides)), root)

    # what only reads the tuned model is not part of it
    assert changed("study=other", "window={n_prompts: 24}", "refusal={eval_max_new_tokens: 96}") == key
    # the recipe, the split and the base are
    assert changed("refusal={steps: 401}") != key
    assert changed("refusal={extra_harmless_sets: [harmless_sounding]}") != key
    assert changed("prompts={split_seed: 1}") != key
    assert changed("model={revision: other}") != key
    # and the training data's bytes, wherever the file lives
    copy = tmp_path / "harmful.jsonl"
    shutil.copy(root / "config" / "prompts" / "harmful.jsonl", copy)
    assert changed(f"prompts={{sets: {{harmful: {copy}}}}}") == key
    copy.write_text(copy.read_text() + '{"text": "One more harmful request?"}\n')
    assert changed(f"prompts={{sets: {{harmful: {copy}}}}}") != key
