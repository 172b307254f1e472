"""Prompt sets: validation with one-line errors, stable ids and hashes, pair-preserving splits."""

import json
from pathlib import Path

import pytest

from neuronaudit.errors import NeuronAuditError
from neuronaudit.prompts import extras, load_prompt_set, render_prompts

ROOT = Path(__file__).resolve().parents[2]
SETS = ROOT / "config" / "prompts"


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_shipped_sets_meet_their_sizes_and_pairing():
    harmful = load_prompt_set("harmful", str(SETS / "harmful.jsonl"))
    harmless = load_prompt_set("harmless", str(SETS / "harmless.jsonl"))
    assert len(harmful) >= 150 and len(harmless) >= 150
    h, b = extras(harmful), extras(harmless)
    pairs = dict(zip(h["pair_id"], harmful["split"]))
    # style-matched partners land on the same side of the split
    assert all(pairs[p] == s for p, s in zip(b["pair_id"], harmless["split"]))
    frac = (harmful["split"] == "heldout").mean()
    assert 0.15 < frac < 0.45
    for name in ("generic", "operator_add", "operator_mul", "format_list", "format_prose"):
        assert len(load_prompt_set(name, str(SETS / f"{name}.jsonl"))) >= 50


def test_hash_and_split_are_stable_and_seeded(tmp_path):
    records = [{"prompt_id": f"x{i}", "text": f"prompt number {i}"} for i in range(40)]
    a = load_prompt_set("x", _write(tmp_path / "a.jsonl", records), seed=1)
    b = load_prompt_set("x", _write(tmp_path / "b.jsonl", records + [{"prompt_id": "new", "text": "another"}]), seed=1)
    c = load_prompt_set("x", str(tmp_path / "a.jsonl"), seed=2)
    assert a.attrs["content_hash"] != b.attrs["content_hash"]
    assert list(a["split"]) == list(b["split"][:40])  # adding a prompt moves no old one
    assert list(a["split"]) != list(c["split"])
    again = load_prompt_set("x", str(tmp_path / "a.jsonl"), seed=1)
    assert again.attrs["content_hash"] == a.attrs["content_hash"]


def test_missing_ids_are_derived_from_text(tmp_path):
    df = load_prompt_set("y", _write(tmp_path / "y.jsonl", [{"prompt": "hello"}, {"prompt": "bye"}]))
    assert df["prompt_id"].str.startswith("y-").all() and df["prompt_id"].nunique() == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('{"prompt_id": "a", "text": "ok"}\n{"prompt_id": "b", "text": \n', "malformed at line 2"),
        ('{"prompt_id": "a", "text": "ok"}\n{"prompt_id": "a", "text": "again"}\n', r"duplicate prompt_id \['a'\]"),
        ('{"prompt_id": "a", "body": "ok"}\n', "no 'text' or 'prompt' field"),
        ('{"prompt_id": "a", "text": "  "}\n', "empty or non-text prompts at rows \\[0\\]"),
    ],
)
def test_bad_prompt_files_fail_with_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(NeuronAuditError, match=message) as err:
        load_prompt_set("bad", str(path))
    assert "bad.jsonl" in str(err.value) and "\n" not in str(err.value)


def test_missing_prompt_file_is_named(tmp_path):
    with pytest.raises(NeuronAuditError, match="nope.jsonl' not found"):
        load_prompt_set("n", str(tmp_path / "nope.jsonl"))


def test_limit_keeps_each_split(tmp_path):
    records = [{"prompt_id": f"x{i}", "text": f"prompt {i}"} for i in range(60)]
    df = load_prompt_set("x", _write(tmp_path / "x.jsonl", records), limit=5)
    assert df["split"].value_counts().to_dict() == {"discovery": 5, "heldout": 5}
    assert df.attrs["n_total"] == 60


def test_chat_template_is_applied_unless_disabled(tokenizer):
    [templated] = render_prompts(tokenizer, ["Hi"], "auto")
    assert templated.startswith("<|im_start|>user\nHi<|im_end|>") and templated.endswith("assistant\n")
    assert render_prompts(tokenizer, ["Hi"], "none") == ["Hi"]
    [with_system] = render_prompts(tokenizer, ["Hi"], "auto", system_prompt="Be brief.")
    assert "<|im_start|>system\nBe brief." in with_system
