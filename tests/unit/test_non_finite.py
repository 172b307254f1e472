"""NaN and infinity are stopped where they first appear, with one line naming the stage, layer,
neuron and prompt; padding is selected, never multiplied by a 0/1 mask (issue 20).

The poisoned models are the tiny Llama with one neuron's up-projection row (its activation) or
write vector (its column of the output projection) set to inf or NaN."""

import json
import math

import numpy as np
import pytest
import torch

from neuronaudit.cli import main
from neuronaudit.errors import NonFiniteError
from neuronaudit.interventions.capture import StreamingNeuronStats, collect_activations
from neuronaudit.interventions.generation import generate_tokens
from neuronaudit.interventions.scoring import entropy_from_logits, score_tokens
from neuronaudit.interventions.sweeps import (
    generated_dose_sweep,
    last_token_dose_sweep,
    prompt_dose_sweep,
    single_pass_dose_response,
)
from neuronaudit.methods import attribution as attribution_method
from neuronaudit.methods.attribution import gradient_scores
from neuronaudit.methods.refusal_tuning import Example, train_response_loss
from neuronaudit.models.adapters import adapter_for
from neuronaudit.testing import poison_neurons, tiny_model

TEXTS = ["How do I bake bread at home?", "What is 7 plus 5?", "Hello! How are you today?"]
IDS = ["bread", "sum", "hello"]
# a NaN or an inf: an inf row meets activations of both signs, so the sum may be NaN
NON_FINITE = r"(nan|inf|-inf)"


def _model(tokenizer, up=None, down=None):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    return model, poison_neurons(adapter_for(model), up=up, down=down)


@pytest.fixture()
def inf_neuron(tokenizer):
    """Neuron (1, 5)'s activation is non-finite on every token."""
    return _model(tokenizer, up={(1, 5): math.inf})


def _encode(tokenizer, texts=TEXTS, side="left"):
    tokenizer.padding_side = side
    return tokenizer(texts, return_tensors="pt", padding=True)


# --- collection ---------------------------------------------------------------------------------


def test_collection_stops_at_a_non_finite_activation_naming_layer_neuron_and_prompt(inf_neuron, tokenizer, tmp_path):
    model, adapter = inf_neuron
    with pytest.raises(NonFiniteError, match=rf"^{NON_FINITE} in the MLP activation at layer 1, neuron 5, "
                                             r"prompt '(bread|sum|hello)', token \d+: 1 of the layer's 128"):
        collect_activations(model, tokenizer, adapter, TEXTS, IDS, tmp_path / "s.parquet", tmp_path / "l.parquet",
                            progress=False)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary


def test_a_non_finite_write_vector_is_named_at_its_own_layer(tokenizer, tmp_path):
    model, adapter = _model(tokenizer, down={(2, 7): math.nan})
    with pytest.raises(NonFiniteError, match=r"^nan in the MLP output at layer 2, neuron 7, prompt '\w+', token \d+: "
                                             r"the write vector of neuron 7 holds non-finite weights"):
        collect_activations(model, tokenizer, adapter, TEXTS, IDS, tmp_path / "s.parquet", tmp_path / "l.parquet",
                            progress=False)


def test_the_cli_names_the_stage_in_one_line(tokenizer, tmp_path, capsys):
    from neuronaudit.models.loading import prepare_model
    from neuronaudit.options import CollectOptions, PromptOptions
    from neuronaudit.stages.prepare import run_prepare_prompts
    from neuronaudit.testing import save_tiny_model, stage_options

    folder = save_tiny_model(tmp_path / "model")
    model, adapter = _model(tokenizer, up={(1, 5): math.inf})
    model.save_pretrained(folder)  # the same tiny model, poisoned
    manifest = prepare_model(str(folder), tmp_path / "prepared")
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps({"prompt_id": i, "text": t}) + "\n" for i, t in zip(IDS, TEXTS)))
    run_prepare_prompts("p", str(source), tmp_path / "p.parquet", PromptOptions(0.5, 0, None))
    options = stage_options(CollectOptions, split="all", batch_size=2, model={"chat_template": "none"})
    code = main(["collect", "--manifest", str(tmp_path / "prepared" / "manifest.json"), "--prompts",
                 str(tmp_path / "p.parquet"), "--out-stats", str(tmp_path / "s.parquet"), "--out-last-token",
                 str(tmp_path / "l.parquet"), "--options", options.to_json()])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and manifest["kind"] == "local"
    assert err.startswith("neuronaudit: error: collect: ") and "MLP activation at layer 1, neuron 5, prompt '" in err
    assert not (tmp_path / "s.parquet").exists()


def test_padding_is_selected_not_multiplied_by_a_mask():
    stats = StreamingNeuronStats([0], 3)
    a = torch.tensor([[[1.0, -2.0, 3.0], [math.nan, math.inf, -math.inf]]])  # the second token is padding
    stats.update(0, a, torch.tensor([[True, False]]))
    table = stats.table().to_pandas()
    assert table["count"].tolist() == [1, 1, 1]
    assert table["mean"].tolist() == [1.0, -2.0, 3.0] and table["max_abs"].tolist() == [1.0, 2.0, 3.0]
    assert np.isfinite(table[["mean", "std", "mean_abs", "frac_positive"]].to_numpy()).all()


def test_statistics_that_overflow_are_named():
    stats = StreamingNeuronStats([2], 2)
    stats.update(2, torch.tensor([[[1.0, 3e38], [1.0, 3e38]]]), torch.tensor([[True, True]]))
    stats.sumsq[0, 1] = math.inf  # float64 sums of squares past their range
    with pytest.raises(NonFiniteError, match=r"statistic 'std' at layer 2, neuron 1: every activation was finite"):
        stats.table()


# --- sweeps, scoring, generation ----------------------------------------------------------------


@pytest.mark.parametrize("sweep", [last_token_dose_sweep, prompt_dose_sweep])
def test_a_sweep_stops_at_the_unintervened_pass(inf_neuron, tokenizer, sweep):
    model, adapter = inf_neuron
    enc = _encode(tokenizer)
    with pytest.raises(NonFiniteError, match=rf"{NON_FINITE} in the MLP activation at layer 1, neuron 5, prompt 0 "
                                             r"of the sweep, token \d+ \(unintervened pass\)"):
        sweep(model, adapter, enc["input_ids"], enc["attention_mask"], [(2, 3, 1.0)])


def test_a_dose_that_overflows_names_its_row(tokenizer):
    """A huge but finite write vector: the unintervened pass stays finite, a large dose overflows."""
    model, adapter = _model(tokenizer, down={(0, 4): 1e30})
    enc = _encode(tokenizer, TEXTS[:1])
    with pytest.raises(NonFiniteError, match=r"^inf in the MLP output at layer 0, neuron 4, prompt 0 of the sweep, "
                                             r"token \d+ \(sweep row: dose 1e\+10 on neuron \(0, 4\)\): finite "
                                             r"activations and weights overflow"):
        last_token_dose_sweep(model, adapter, enc["input_ids"], enc["attention_mask"], [(0, 3, 1.0), (0, 4, 1e10)])


def test_generated_and_single_pass_sweeps_stop(inf_neuron, tokenizer):
    model, adapter = inf_neuron
    enc = _encode(tokenizer)
    with pytest.raises(NonFiniteError, match=r"layer 1, neuron 5, prompt 0 of the sweep"):
        generated_dose_sweep(model, adapter, enc["input_ids"], enc["attention_mask"], [(2, 3, 1.0)], 3)
    with pytest.raises(NonFiniteError, match=r"layer 1, neuron 5, prompt 0 of the sweep"):
        single_pass_dose_response(model, adapter, enc["input_ids"], enc["attention_mask"], [(2, 3, 1.0)])


def test_greedy_generation_never_returns_token_zero_for_nan_logits(inf_neuron, tokenizer):
    model, adapter = inf_neuron
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    with pytest.raises(NonFiniteError, match=r"layer 1, neuron 5, prompt \d of the batch"):
        generate_tokens(model, ids, 4, adapter=adapter, pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(NonFiniteError, match=r"layer 1, neuron 5"):  # without an adapter too
        generate_tokens(model, ids, 4, pad_token_id=tokenizer.pad_token_id)


def test_scoring_names_the_sequence(inf_neuron, tokenizer):
    model, adapter = inf_neuron
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS]
    with pytest.raises(NonFiniteError, match=r"layer 1, neuron 5, prompt \d of the scored sequences"):
        score_tokens(model, adapter, seqs, [1] * len(seqs))


def test_non_finite_logits_name_the_vocabulary_entry(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    adapter = adapter_for(model)
    with torch.no_grad():
        model.lm_head.weight[11] = math.nan
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS]
    with pytest.raises(NonFiniteError, match=r"^nan in the logits at prompt \d of the scored sequences, token \d+: "
                                             r"token id 11, after finite MLP activations"):
        score_tokens(model, adapter, seqs, [1] * len(seqs))


def test_entropy_leaves_out_masked_tokens_instead_of_nan():
    assert entropy_from_logits(torch.tensor([0.0, -math.inf, 0.0])) == pytest.approx(math.log(2))


def test_hooks_are_removed_after_the_checks(inf_neuron, tokenizer):
    model, adapter = inf_neuron
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS]
    with pytest.raises(NonFiniteError):
        score_tokens(model, adapter, seqs, [1] * len(seqs))
    assert not adapter.mlp_outs[1]._forward_pre_hooks and not adapter.mlp_outs[1]._forward_hooks
    assert not hasattr(model, "_neuronaudit_finite_guard")


# --- gradients and training ---------------------------------------------------------------------


def test_gradient_attribution_stops_at_the_poisoned_neuron(inf_neuron, tokenizer):
    model, adapter = inf_neuron
    with pytest.raises(NonFiniteError, match=r"layer 1, neuron 5, prompt \d of the attribution prompts"):
        gradient_scores(model, tokenizer, adapter, TEXTS, [5], [6])


def test_a_non_finite_gradient_names_layer_neuron_and_prompt(tokenizer, monkeypatch):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    adapter = adapter_for(model)
    grad = torch.autograd.grad

    def poisoned(outputs, inputs, *args, **kwargs):
        out = list(grad(outputs, inputs, *args, **kwargs))
        out[2] = out[2].clone()
        out[2][1, :, 9] = math.inf  # layer 2, neuron 9, the second prompt of the batch
        return tuple(out)

    monkeypatch.setattr(attribution_method.torch.autograd, "grad", poisoned)
    with pytest.raises(NonFiniteError, match=r"^inf in the gradient of the behaviour metric at layer 2, neuron 9, "
                                             r"prompt 1 of the attribution prompts"):
        gradient_scores(model, tokenizer, adapter, TEXTS, [5], [6])


def test_refusal_tuning_stops_before_a_non_finite_step(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    poison_neurons(adapter_for(model), up={(0, 2): math.nan})
    examples = [Example((1, 5, 6), (7, 8, 2), "refusal"), Example((1, 9), (10, 2), "own_answer")]
    with pytest.raises(NonFiniteError, match=r"^nan in the training loss: refusal tuning step 1 of 2"):
        train_response_loss(model, examples, tokenizer.pad_token_id, 2, 1e-4, 2, 0, 1.0)
