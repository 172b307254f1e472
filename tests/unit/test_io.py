import json
import math

import numpy as np
import pytest

from neuronaudit.errors import NeuronAuditError
from neuronaudit.io import json_safe, write_json


@pytest.mark.parametrize("obj, key", [
    ({"rho": math.nan, "n": 3}, "rho"),
    ({"a": {"ci": [np.float64(0.5), math.inf]}}, r"a\.ci\.1"),
    ({"x": [{"mae": np.float64("-inf")}]}, r"x\.0\.mae"),
])
def test_write_json_refuses_a_non_finite_number_naming_its_key(tmp_path, obj, key):
    """A NaN never reads as "missing": it is refused, and nothing is written."""
    with pytest.raises(NeuronAuditError, match=rf"s\.json': key {key} is -?(nan|inf), not a number"):
        write_json(obj, tmp_path / "s.json")
    assert not list(tmp_path.iterdir())


def test_write_json_writes_a_missing_value_given_as_none(tmp_path):
    out = write_json({"rho": None, "null_reasons": {"rho": "a ranking is constant"}, "ci": [np.float64(0.5)],
                      "n": np.int64(3), "k": 0}, tmp_path / "s.json")
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"rho": None, "null_reasons": {"rho": "a ranking is constant"}, "ci": [0.5], "n": 3,
                                "k": 0}


def test_json_safe_keeps_finite_values_and_structure():
    assert json_safe({"a": (1.5, -2.0), "b": {"c": None, "d": "x"}}) == {"a": [1.5, -2.0], "b": {"c": None, "d": "x"}}


def test_atomic_path_replaces_a_full_directory_only_on_success(tmp_path):
    from neuronaudit.io import atomic_path

    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "half.bin").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["old.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
