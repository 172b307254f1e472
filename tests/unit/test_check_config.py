"""``neuronaudit check-config``: several files merged in order, a partial file alone is one line."""

from pathlib import Path

import pytest

from neuronaudit.cli import main
from neuronaudit.config import load_config
from neuronaudit.errors import NeuronAuditError

ROOT = Path(__file__).resolve().parents[2]


def test_files_merge_in_order_like_snakemake_configfiles():
    full = load_config(ROOT / "config" / "config.yaml")
    quick = load_config([ROOT / "config" / "config.yaml", ROOT / "config" / "quick.yaml"])
    assert full["study"] is None and quick["study"] == "quick"
    assert quick["prompts"]["sets"] == full["prompts"]["sets"]  # kept from the first file


def test_a_partial_config_alone_names_the_missing_key(capsys):
    with pytest.raises(NeuronAuditError, match=r"config key prompts\.sets is missing"):
        load_config(ROOT / "config" / "quick.yaml")
    assert main(["check-config", str(ROOT / "config" / "quick.yaml"), "--root", str(ROOT)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neuronaudit: error: config key prompts.sets is missing") and "\n" not in err


def test_a_config_file_that_is_not_a_mapping_is_one_line(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(NeuronAuditError, match="must hold a mapping of keys, not list"):
        load_config(bad)
