import json
import math

import numpy as np

from neuronaudit.io import json_safe, write_json


def test_write_json_is_strict_json_with_missing_as_null(tmp_path):
    out = write_json({"rho": math.nan, "ci": [np.float64(0.5), math.inf], "n": np.int64(3), "k": 0}, tmp_path / "s.json")
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"rho": None, "ci": [0.5, None], "n": 3, "k": 0}


def test_json_safe_keeps_finite_values_and_structure():
    assert json_safe({"a": (1.5, -2.0), "b": {"c": None, "d": "x"}}) == {"a": [1.5, -2.0], "b": {"c": None, "d": "x"}}
