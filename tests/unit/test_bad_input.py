"""Bad input stops before any job starts, with one line naming the bad value (issue 20)."""

import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from neuronaudit.cli import main
from neuronaudit.config import (
    ACCURACY_GROUPS,
    GENERIC_SET,
    NO_FINAL_NEWLINE,
    load_config,
    load_schema,
    precheck_config,
    preflight,
    validate_config,
)
from neuronaudit.config_files import MAX_CONFIG_VALUES, read_config_file
from neuronaudit.errors import NeuronAuditError

ROOT = Path(__file__).resolve().parents[2]
FULL = ROOT / "config" / "config.yaml"

#: The sets the keystone and CNA stages score capability on, which keystone.groups must hold.
CAPABILITY_SETS = (GENERIC_SET, *ACCURACY_GROUPS)


def capability_sets(path) -> dict:
    return {name: str(path) for name in CAPABILITY_SETS}


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neuronaudit: error: ")
    return err.strip()


def _bomb(kind: str, levels: int = 9) -> str:
    """A "billion laughs" file: 9 ** 10 values from 10 lines of lists or of mappings, placed
    under a key the schema walks (window.x_grid, judge.thresholds)."""
    if kind == "list":
        lines = ["lol:", "  l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
        lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
        lines += ["window:", f"  x_grid: *l{levels}"]
    else:
        lines = ["lol:", "  m0: &m0 {" + ", ".join(f"k{j}: lol" for j in range(9)) + "}"]
        lines += [f"  m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(9)) + "}"
                  for i in range(1, levels + 1)]
        lines += ["judge:", f"  thresholds: *m{levels}"]
    return "\n".join(lines) + "\n"


# --- YAML safety -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, key, lines", [
    ("study: a\nseed: 1\nstudy: b\n", "study", "lines 1 and 3"),
    ("window:\n  n_prompts: 3\n  x_grid: [1.0, 2.0]\n  n_prompts: 4\n", "window.n_prompts", "lines 2 and 4"),
    ("prompts:\n  sets:\n    harmful: a.jsonl\n    harmful: b.jsonl\n", "prompts.sets.harmful", "lines 3 and 4"),
])
def test_a_repeated_key_names_the_key_and_file(tmp_path, capsys, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(NeuronAuditError, match=rf"config file '.*dup\.yaml': key {key} is given twice \({lines}\)"):
        load_config([FULL, path])
    err = _one_line(capsys, ["check-config", str(FULL), str(path), "--root", str(ROOT)])
    assert f"key {key} is given twice" in err


def test_a_repeated_key_in_a_json_config_is_named(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"study": "a", "study": "b"}')
    with pytest.raises(NeuronAuditError, match=r"dup\.json': key study is given twice"):
        read_config_file(path)


def test_a_yaml_merge_key_may_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert read_config_file(path)["other"] == {"x": 3, "y": 2}


@pytest.mark.parametrize("kind", ["list", "mapping"])
def test_an_alias_bomb_fails_fast_with_one_line(tmp_path, capsys, kind):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(kind))
    start = time.perf_counter()
    with pytest.raises(NeuronAuditError, match=rf"bomb\.yaml' expands to more than {MAX_CONFIG_VALUES} values"):
        load_config([FULL, path])
    err = _one_line(capsys, ["check-config", str(FULL), str(path), "--root", str(ROOT)])
    assert "expands to more than" in err
    assert time.perf_counter() - start < 5


def test_an_alias_bomb_already_loaded_stops_before_validation(tmp_path):
    """The workflow's path: Snakemake has parsed the files (aliases still shared); the precheck
    reads the raw file and bounds the merged config before validate walks it."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb("list"))
    config = {**yaml.safe_load(FULL.read_text()), **yaml.safe_load(path.read_text())}
    del config["lol"]  # the bomb itself is under window.x_grid
    start = time.perf_counter()
    with pytest.raises(NeuronAuditError, match="bomb.yaml' expands to more than"):
        precheck_config(config, [FULL, path])
    with pytest.raises(NeuronAuditError, match=r"config expands to more than .* \(at key window\.x_grid[.0-9]*\)"):
        precheck_config(config)  # e.g. a bomb given through --config
    with pytest.raises(NeuronAuditError, match="config expands to more than"):
        validate_config(config)
    assert time.perf_counter() - start < 5


def test_a_self_referring_alias_is_named(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("window:\n  x_grid: &g [1.0, *g]\n")
    with pytest.raises(NeuronAuditError, match=r"key window\.x_grid\.1 is an alias of a value that contains it"):
        load_config([FULL, path])


def test_an_empty_or_non_utf8_config_file_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(NeuronAuditError, match=r"empty\.yaml' is empty"):
        load_config([FULL, empty])
    assert "is empty" in _one_line(capsys, ["check-config", str(empty), "--root", str(ROOT)])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"study: quick\nreport:\n  title: caf\xe9\n")
    with pytest.raises(NeuronAuditError, match=r"latin\.yaml' is not UTF-8 text \(byte 0xe9 on line 3\)"):
        load_config([FULL, latin])


# --- names match the whole string ------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ({"study": "quick\n"}, "study"),
    ({"prompts": {"sets": {"a": "a.jsonl", "harmful\n": "h.jsonl"}}}, "prompts.sets"),
    ({"behaviours": {"refusal\n": {"positive": "a", "negative": "a", "oracle": "refusal"}}}, "behaviours"),
    ({"model": {"device": "cpu\n"}}, "model.device"),
    ({"rollouts": {"sampling": ["greedy\n"]}}, "rollouts.sampling.0"),
])
def test_a_name_with_a_trailing_newline_is_refused(override, key):
    cfg = {"prompts": {"sets": {"a": "a.jsonl"}}, **override}
    with pytest.raises(NeuronAuditError, match=rf"config key {key}: '.*\\n' does not match .*no line break"):
        validate_config(cfg)


def test_every_schema_pattern_refuses_a_final_newline():
    def patterns(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    yield value
                else:
                    yield from patterns(value)
        elif isinstance(node, list):
            for value in node:
                yield from patterns(value)

    found = list(patterns(load_schema()))
    assert len(found) >= 5 and all(p.endswith(NO_FINAL_NEWLINE) for p in found), found


def test_a_trailing_newline_from_a_yaml_file_is_refused(tmp_path, capsys):
    path = tmp_path / "nl.yaml"
    path.write_text('study: "quick\\n"\nprompts:\n  sets:\n    "harmful\\n": config/prompts/harmful.jsonl\n')
    with pytest.raises(NeuronAuditError, match=r"config key prompts.sets: 'harmful\\n' does not match"):
        load_config([FULL, path])
    err = _one_line(capsys, ["check-config", str(FULL), str(path), "--root", str(ROOT)])
    assert "'harmful\\n' does not match" in err


# --- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("yaml_text, message", [
    ("window:\n  x_grid: [0.5, .nan, 2.0]\n", r"config key window\.x_grid\.1: nan is not a finite number"),
    ("window:\n  x_grid: [0.5, .inf]\n", r"config key window\.x_grid\.1: inf is not a finite number"),
    ("rollouts:\n  temperature: .inf\n", r"config key rollouts\.temperature: inf is not a finite number"),
    ("rollouts:\n  temperature: .nan\n", r"config key rollouts\.temperature: nan is not a finite number"),
    ("refusal:\n  learning_rate: .inf\n", r"config key refusal\.learning_rate: inf is not a finite number"),
    ("prompts:\n  heldout_fraction: .nan\n", r"config key prompts\.heldout_fraction: nan is not a finite number"),
    ("cna:\n  caa_alphas: [-.inf]\n", r"config key cna\.caa_alphas\.0: -inf is not a finite number"),
    ("judge:\n  thresholds: {max_perplexity: .nan}\n", r"judge\.thresholds\.max_perplexity: nan is not a finite"),
    ("seed: 18446744073709551616\n", r"config key seed: 18446744073709551616 does not fit in a 64-bit integer"),
    ("seed: 9223372036854775808\n", r"config key seed: 9223372036854775808 does not fit in a 64-bit integer"),
    ("seed: -1\n", r"config key seed: -1 is less than the minimum of 0"),
    ("prompts:\n  heldout_fraction: 0\n", r"config key prompts\.heldout_fraction: 0 is less than or equal to"),
])
def test_non_finite_and_out_of_range_numbers_stop_up_front(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(NeuronAuditError, match=message):
        load_config([FULL, path])


def test_non_finite_numbers_given_through_config_overrides_are_named():
    with pytest.raises(NeuronAuditError, match=r"config key rollouts\.temperature: inf is not a finite number"):
        precheck_config({"rollouts": {"temperature": ".inf"}})  # --config leaves nested values as strings
    with pytest.raises(NeuronAuditError, match=r"config key window\.x_grid\.0: nan"):
        load_config(FULL, overrides=["window={x_grid: [.nan, 1.0]}"])


# --- preflight: settings that depend on the model or on each other ---------------------------


@pytest.fixture()
def base(tiny_model_dir, tmp_path):
    """A valid config over the tiny model (4 layers × 128 MLP neurons)."""
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt_id": "a", "text": "hi"}\n')
    return {"model": {"source": str(tiny_model_dir)}, "prompts": {"sets": {"p": str(good), **capability_sets(good)}},
            "refusal": {"tune": False}, "screen": {"universal_sets": ["p"]},
            "keystone": {"groups": ["p", *CAPABILITY_SETS]},
            "behaviours": {"x": {"positive": "p", "negative": "p", "oracle": "format"}}, "cna": {"behaviour": "x"},
            "window": {"n_candidates": 2, "n_random": 1, "n_heldout": 2}}


def test_the_base_config_passes_preflight(base):
    assert preflight(validate_config(base), ROOT).kind == "local"


def test_window_n_heldout_must_leave_candidates_to_fit_on(base):
    bad = {**base, "window": {"n_candidates": 2, "n_random": 1, "n_heldout": 3}}
    with pytest.raises(NeuronAuditError, match=r"config key window\.n_heldout: 3 would hold out every window "
                                               r"candidate \(at most 3: window\.n_candidates 2 × 1 behaviour "
                                               r"\+ window\.n_random 1\), leaving none .*; use at most 2"):
        preflight(validate_config(bad), ROOT)


@pytest.mark.parametrize("section, key, value, message", [
    ("screen", "k", 513, r"config key screen\.k: 513 neurons is more than the 512 MLP neurons .*4 layers × 128"),
    ("keystone", "k_max", 1000, r"config key keystone\.k_max: 1000 neurons is more than the 512 MLP neurons"),
    ("screen", "k", 1.5, r"config key screen\.k: 1\.5 must be an integer count of neurons or a fraction"),
])
def test_neuron_counts_beyond_the_model_are_named(base, section, key, value, message):
    with pytest.raises(NeuronAuditError, match=message):
        preflight(validate_config({**base, section: {**base.get(section, {}), key: value}}), ROOT)
    preflight(validate_config({**base, section: {**base.get(section, {}), key: 512 if key != "k" else 0.5}}), ROOT)


def test_a_cuda_device_without_cuda_is_named(base, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(NeuronAuditError, match=rf"config key model\.device: '{device}' requested but CUDA is "
                                                   "not available"):
            preflight(validate_config({**base, "model": {**base["model"], "device": device}}), ROOT)
    assert preflight(validate_config({**base, "model": {**base["model"], "device": "auto"}}), ROOT)


# --- prompt files ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, message", [
    ("latin.jsonl", b'{"text": "caf\xe9"}\n', r"latin\.jsonl' is not UTF-8 text \(byte 0xe9 on line 1\)"),
    ("latin.csv", b"text\nhello\ncaf\xe9\n", r"latin\.csv' is not UTF-8 text \(byte 0xe9 on line 3\)"),
    ("latin.json", b'[{"text": "caf\xe9"}]', r"latin\.json' is not UTF-8 text"),
    ("ragged.csv", b"text,x\na,1\nb,2,3\n", r"ragged\.csv' is malformed: .*Expected 2 fields in line 3, saw 3"),
    ("open.csv", b'text\n"never closed\n', r"open\.csv' is malformed: .*EOF inside string"),
    ("broken.parquet", b"PAR1 not really parquet", r"broken\.parquet' is malformed: .*Parquet"),
])
def test_a_bad_prompt_file_is_one_line_naming_it(base, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    cfg = validate_config({**base, "prompts": {"sets": {**base["prompts"]["sets"], "p": str(path)}}})
    with pytest.raises(NeuronAuditError, match=rf"prompt file '.*{message}"):
        preflight(cfg, ROOT)


def test_a_valid_csv_and_parquet_prompt_file_pass(base, tmp_path):
    pd.DataFrame({"text": ["a", "b"]}).to_parquet(tmp_path / "ok.parquet")
    (tmp_path / "ok.csv").write_text("text\na\n")
    for name in ("ok.parquet", "ok.csv"):
        sets = {**base["prompts"]["sets"], "p": str(tmp_path / name)}
        preflight(validate_config({**base, "prompts": {"sets": sets}}), ROOT)


# --- model directories ---------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b'{"model_type": "llama",\n  "num_hidden_layers": }', r"is not valid JSON: Expecting value \(line 2"),
    (b'{"model_type": "caf\xe9"}', r"is not UTF-8 text"),
    (b"[1, 2]", r"must hold a JSON object, not list"),
])
def test_a_model_config_json_that_is_not_json_names_the_file(base, tmp_path, content, message):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(content)
    cfg = validate_config({**base, "model": {"source": str(model)}})
    with pytest.raises(NeuronAuditError, match=rf"model config file '.*model/config\.json' {message}"):
        preflight(cfg, ROOT)


# --- truncated weights ---------------------------------------------------------------------


def _truncated_copy(model_dir, tmp_path, keep=0.5):
    import shutil

    copy = tmp_path / "truncated"
    shutil.copytree(model_dir, copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    return copy


def test_a_truncated_safetensors_file_stops_before_any_job(base, tiny_model_dir, tmp_path, capsys):
    copy = _truncated_copy(tiny_model_dir, tmp_path)
    cfg = validate_config({**base, "model": {"source": str(copy)}})
    with pytest.raises(NeuronAuditError, match=r"weight file '.*truncated/model\.safetensors' is truncated or "
                                               r"malformed: its header describes \d+ bytes, the file holds \d+"):
        preflight(cfg, ROOT)
    from neuronaudit.models.loading import prepare_model

    with pytest.raises(NeuronAuditError, match=r"model\.safetensors' is truncated"):  # and at prepare time
        prepare_model(str(copy), tmp_path / "prepared")
    assert not (tmp_path / "prepared" / "manifest.json").exists()


def test_a_cut_safetensors_header_is_named(base, tiny_model_dir, tmp_path):
    copy = _truncated_copy(tiny_model_dir, tmp_path, keep=0.0001)
    with pytest.raises(NeuronAuditError, match=r"safetensors' is truncated or malformed: its safetensors header"):
        preflight(validate_config({**base, "model": {"source": str(copy)}}), ROOT)


def _tiny_gguf(path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_feed_forward_length(8)
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", np.ones((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0.98, 0.5, 0.08])
def test_a_truncated_gguf_file_stops_before_any_job(base, tmp_path, capsys, keep):
    whole = _tiny_gguf(tmp_path / "whole.gguf")
    cut = tmp_path / "cut.gguf"
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    cfg = validate_config({**base, "model": {"source": str(cut)}})
    with pytest.raises(NeuronAuditError, match=r"GGUF file '.*cut\.gguf' is truncated"):
        preflight(cfg, ROOT)
    from neuronaudit.models.sources import read_gguf

    assert len(read_gguf(whole).tensors) == 2  # the whole file reads
