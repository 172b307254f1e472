import json
import math

import numpy as np

from neuronaudit.io import json_safe, write_json


def test_write_json_is_strict_json_with_missing_as_null(tmp_path):
    out = write_json({"rho": math.nan, "ci": [np.float64(0.5), math.inf], "n": np.int64(3), "k": 0},
                     tmp_path / "s.json")
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"rho": None, "ci": [0.5, None], "n": 3, "k": 0}


def test_json_safe_keeps_finite_values_and_structure():
    assert json_safe({"a": (1.5, -2.0), "b": {"c": None, "d": "x"}}) == {"a": [1.5, -2.0], "b": {"c": None, "d": "x"}}


def test_atomic_path_replaces_a_full_directory_only_on_success(tmp_path):
    import pytest

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
