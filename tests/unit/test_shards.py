"""Collection shards join into the statistics of one pass over every prompt."""

import numpy as np
import pyarrow as pa
import pytest

from neuronaudit.errors import NeuronAuditError
from neuronaudit.io import NEURON_STATS_SCHEMA
from neuronaudit.shards import merge_last_token, merge_stats, n_shards, shard_rows


def _stats(a: np.ndarray) -> pa.Table:
    """Statistics of activations ``a [tokens, layers, neurons]`` as collection writes them."""
    n, layers, neurons = a.shape
    flat = a.transpose(1, 2, 0).reshape(layers * neurons, n)
    return pa.Table.from_pydict({
        "layer": np.repeat(np.arange(layers), neurons).astype("int32"),
        "neuron": np.tile(np.arange(neurons), layers).astype("int32"),
        "count": np.full(layers * neurons, n, dtype=np.int64), "mean": flat.mean(1),
        "std": flat.std(1, ddof=1) if n > 1 else np.zeros(layers * neurons), "mean_abs": np.abs(flat).mean(1),
        "max_abs": np.abs(flat).max(1), "frac_positive": (flat > 0).mean(1)}, schema=NEURON_STATS_SCHEMA)


@pytest.mark.parametrize("sizes", [[7, 5, 1], [13], [1, 1, 11]])
def test_merged_shards_equal_one_pass(sizes):
    rng = np.random.default_rng(0)
    a = rng.normal(0.3, 2.0, size=(sum(sizes), 3, 5))
    parts = np.split(a, np.cumsum(sizes)[:-1])
    merged = merge_stats([_stats(p) for p in parts]).to_pandas()
    whole = _stats(a).to_pandas()
    assert (merged["count"] == whole["count"]).all()
    for column in ("mean", "std", "mean_abs", "max_abs", "frac_positive"):
        np.testing.assert_allclose(merged[column], whole[column], rtol=1e-10, atol=1e-12, err_msg=column)


def test_shard_ranges_cover_every_prompt_once_and_bad_shards_are_errors():
    rows = [list(shard_rows(10, 4, k)) for k in range(n_shards(10, 4))]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and n_shards(3, 8) == 1
    with pytest.raises(NeuronAuditError, match="shard 3 out of range: 10 prompts make 3 shards of 4"):
        shard_rows(10, 4, 3)
    with pytest.raises(NeuronAuditError, match="cover different"):
        merge_stats([_stats(np.ones((2, 1, 2))), _stats(np.ones((2, 2, 2)))])
    table = pa.table({"prompt_id": ["a", "b"], "layer": pa.array([0, 0], pa.int32())})
    assert merge_last_token([table.slice(0, 1), table.slice(1, 1)]).column("prompt_id").to_pylist() == ["a", "b"]


def test_sweep_shard_count_covers_the_most_candidates_a_behaviour_can_get():
    from neuronaudit.shards import sweep_shard_count

    assert sweep_shard_count(20, 6, 3, 0) == 0  # the window job sweeps itself
    assert sweep_shard_count(20, 6, 3, 5) == 5  # 20 screened + 2 random controls = 22 -> 5 blocks
    assert sweep_shard_count(2, 3, 1, 2) == 3
    with pytest.raises(NeuronAuditError, match="window.shard_size -1"):
        sweep_shard_count(20, 6, 3, -1)


def _sweep_frame(neurons, prompts=("p0", "p1"), horizons=(4, 8), baseline=True):
    import pandas as pd

    rows = []
    for h in horizons:
        for p in prompts:
            if baseline:
                rows.append({"horizon": h, "prompt_id": p, "layer": 0, "neuron": 0, "kind": "baseline", "x": 0.0})
            rows += [{"horizon": h, "prompt_id": p, "layer": l, "neuron": n, "kind": "screened", "x": x}
                     for l, n in neurons for x in (1.0, -1.0)]
    return pd.DataFrame(rows)


def test_merged_sweep_shards_are_the_unsharded_sweep_with_x0_once():
    import pandas as pd

    from neuronaudit.methods.window import candidate_block, merge_sweep_shards

    neurons = pd.DataFrame({"behaviour": ["b"] * 5 + ["c"], "layer": [1, 1, 2, 3, 3, 0],
                            "neuron": [4, 9, 2, 7, 8, 1], "kind": ["screened"] * 6})
    blocks = [candidate_block(neurons, "b", k, 2) for k in range(4)]
    assert [len(b) for b in blocks] == [2, 2, 1, 0]
    keys = [list(zip(b["layer"], b["neuron"])) for b in blocks]
    whole = _sweep_frame([k for block in keys for k in block])
    frames = [_sweep_frame(k) if k else pd.DataFrame() for k in keys]
    n_prompts = 2

    def record(k, rows):
        return {"search": "full", "n_rollouts": rows * n_prompts, "n_rollouts_full_grid": rows * n_prompts,
                "n_rounds": 1 if k else 0, "rows_per_round": [rows] if k else [], "seconds": 1.5,
                "visited_grid_indices": None, "baseline_rollouts": n_prompts if k else 0}

    records = [record(k, 1 + 2 * len(k)) if k else record(k, 0) for k in keys]
    merged, rec = merge_sweep_shards(frames, records)
    pd.testing.assert_frame_equal(merged, whole)
    assert rec["n_rollouts"] == rec["n_rollouts_full_grid"] == (1 + 2 * 5) * n_prompts
    assert rec["n_rounds"] == 1 and rec["rows_per_round"] == [5 + 5 + 3] and rec["n_jobs"] == 4
    with pytest.raises(NeuronAuditError, match="every sweep shard of a behaviour is empty"):
        merge_sweep_shards([pd.DataFrame()], [record([], 0)])
