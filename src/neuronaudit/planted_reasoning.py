"""A tiny Llama whose answers depend on one planted "carry" neuron: the ground truth of the
reasoning-critical neuron method (SCIENCE.md section 6).

A problem is a short note ending in a cue word; its answer is `` yes`` for a cue of
``YES_CUES`` and `` no`` for one of ``NO_CUES``, followed by the end-of-sequence token. Every cue
carries a *doubt* that, left alone, makes the model answer the junk token `` qq`` (wrong).
The carry neuron cancels the doubt; it fires (≈ 7.0) on the ``EASY_CUES`` and is weak (≈ −0.14,
SiLU's floor) on the ``HARD_CUES`` and on every other token. So the model solves the easy
problems and fails the hard ones (accuracy 1/2 on a balanced set), and the carry neuron is the
only neuron whose activation separates correct from incorrect solutions by a wide margin.

Attention writes nothing (every ``o_proj`` is zero), so each position is a function of its own
token. Residual axes (64 dimensions, 0–7 planted, 8–63 a random token identity; every embedding
has norm 8, which the RMSNorms leave unchanged):

========= ===================================================================================
axis      meaning
========= ===================================================================================
``easy``  4.0 in an easy cue's embedding (read by the carry neuron's gate)
``bias``  a constant 3.0 in every embedding
``doubt`` 3.0 in every cue's embedding; the `` qq`` logit reads ``20·doubt``
``yes``   4.0 in a yes cue's embedding; the `` yes`` logit reads ``10·yes``
``no``    4.0 in a no cue's embedding; the `` no`` logit reads ``10·no``
``stop``  5.0 in the answer tokens' embeddings; the end-of-sequence logit reads ``10·stop``
========= ===================================================================================

The carry neuron (``CARRY``, layer 1): gate ``2.5·easy − bias`` (7 on an easy cue, −3
elsewhere), up ``bias/3`` (1 everywhere), write ``−(3/7)·doubt``. At a cue, the right answer's
logit is 40 and `` qq``'s is ``20·(3 − 3a/7)``: the answer is right iff ``a > 7/3``. Over the
positions that predict a solution (the cue and the answer token), correct solutions average
``g ≈ 3.43`` and incorrect ones ``b ≈ −0.14``: steering the carry toward ``g`` (blend, ``s = 1``)
or by ``w = g − b`` (add, ``s = 1``) puts it at ≈ 3.43 on a hard cue and the answer turns right,
while the same edits on any other neuron change nothing (their writes avoid the planted axes).

Every other MLP weight is random (gate and up N(0, 0.1²), down N(0, 0.01²) on axes 8–63 only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from neuronaudit.planted import D_MLP, D_MODEL, _blank_llama, _word_id, planted_tokenizer

REASONING_AXES = {"easy": 0, "bias": 1, "doubt": 2, "yes": 3, "no": 4, "stop": 5}
YES_CUES = ("red", "green", "blue", "gold")
NO_CUES = ("cat", "fish", "dog", "bird")
EASY_CUES = ("red", "blue", "cat", "dog")
HARD_CUES = ("green", "gold", "fish", "bird")
WRONG_ANSWER = "qq"
N_REASONING_LAYERS = 2


@dataclass(frozen=True)
class ReasoningNeurons:
    """(layer, neuron) of the planted carry neuron."""

    carry: tuple[int, int] = (1, 42)


CARRY = ReasoningNeurons().carry

_SUBJECTS = ("the lamp", "a river", "the market", "my garden", "the old city", "a small boat", "the tower",
             "the bread", "our kitchen", "the road", "a letter", "the bridge")
_VERBS = ("looks", "seems", "is called", "was painted", "turns", "reads")


def planted_reasoning_model(tokenizer, seed: int = 0) -> transformers.LlamaForCausalLM:
    """The two-layer planted Llama of the module docstring for :func:`~neuronaudit.planted.planted_tokenizer`'s
    vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    model = _blank_llama(tokenizer, N_REASONING_LAYERS)
    a = REASONING_AXES
    e = torch.eye(D_MODEL)
    with torch.no_grad():
        emb = torch.zeros(len(tokenizer), D_MODEL)
        emb[:, 8:] = torch.randn(len(tokenizer), D_MODEL - 8, generator=gen)
        emb[:, a["bias"]] = 3.0
        cues = [_word_id(tokenizer, w) for w in (*YES_CUES, *NO_CUES)]
        emb[cues, a["doubt"]] = 3.0
        emb[[_word_id(tokenizer, w) for w in YES_CUES], a["yes"]] = 4.0
        emb[[_word_id(tokenizer, w) for w in NO_CUES], a["no"]] = 4.0
        emb[[_word_id(tokenizer, w) for w in EASY_CUES], a["easy"]] = 4.0
        emb[[_word_id(tokenizer, w) for w in ("yes", "no", WRONG_ANSWER)], a["stop"]] = 5.0
        planted = emb[:, :8].pow(2).sum(-1, keepdim=True)
        emb[:, 8:] *= ((64.0 - planted).clamp_min(1.0).sqrt() / emb[:, 8:].norm(dim=-1, keepdim=True))
        model.model.embed_tokens.weight.copy_(emb)

        head = 0.02 * torch.randn(len(tokenizer), D_MODEL, generator=gen)
        head[:, :8] = 0.0
        head[_word_id(tokenizer, "yes")] = 10.0 * e[a["yes"]]
        head[_word_id(tokenizer, "no")] = 10.0 * e[a["no"]]
        head[_word_id(tokenizer, WRONG_ANSWER)] = 20.0 * e[a["doubt"]]
        head[tokenizer.eos_token_id] = 10.0 * e[a["stop"]]
        model.lm_head.weight.copy_(head)

        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            mlp = layer.mlp
            mlp.gate_proj.weight.copy_(0.1 * torch.randn(D_MLP, D_MODEL, generator=gen))
            mlp.up_proj.weight.copy_(0.1 * torch.randn(D_MLP, D_MODEL, generator=gen))
            down = 0.01 * torch.randn(D_MODEL, D_MLP, generator=gen)
            down[:8] = 0.0
            mlp.down_proj.weight.copy_(down)

        mlp = model.model.layers[CARRY[0]].mlp
        mlp.gate_proj.weight[CARRY[1]] = 2.5 * e[a["easy"]] - e[a["bias"]]
        mlp.up_proj.weight[CARRY[1]] = e[a["bias"]] / 3.0
        mlp.down_proj.weight[:, CARRY[1]] = -(3.0 / 7.0) * e[a["doubt"]]
    return model


def planted_reasoning_problems(n: int, offset: int = 0) -> list[dict]:
    """``n`` problems cycling through the eight cues (half easy, half hard): ``problem_id``,
    ``text``, ``answer`` (``yes``/``no``) and ``hard``. Different ``offset`` values give different
    notes (disjoint splits)."""
    cues = (*YES_CUES, *NO_CUES)
    rows = []
    for k in range(offset, offset + n):
        cue = cues[k % len(cues)]
        subject = _SUBJECTS[(k // len(cues)) % len(_SUBJECTS)]
        verb = _VERBS[(k // (len(cues) * len(_SUBJECTS))) % len(_VERBS)]
        rows.append({"problem_id": f"planted-{k:04d}", "text": f"Note {k + 1}: {subject} {verb} {cue}",
                     "answer": "yes" if cue in YES_CUES else "no", "hard": cue in HARD_CUES})
    return rows


#: Kind of a planted problem by its cue: the yes cues are colours, the no cues animals.
PLANTED_KINDS = {**{c: "colour" for c in YES_CUES}, **{c: "animal" for c in NO_CUES}}


def planted_problem_file_rows(n: int = 96) -> list[dict]:
    """The planted problems as a problem file for the reasoning stage (``reasoning.problem_set``):
    ``prompt_id``, ``text``, ``answer`` (a text answer), ``answer_type``, ``kind`` (``colour`` or
    ``animal``) and ``hard``; ``n`` distinct notes, each cue equally often."""
    rows = []
    for r in planted_reasoning_problems(n):
        cue = r["text"].rsplit(" ", 1)[1]
        rows.append({"prompt_id": r["problem_id"], "text": r["text"], "answer": r["answer"], "answer_type": "text",
                     "kind": PLANTED_KINDS[cue], "hard": r["hard"]})
    return rows


def save_planted_reasoning_model(path: str | Path, seed: int = 0, n_problems: int = 96) -> dict:
    """Write :func:`planted_reasoning_model` and its tokenizer to ``path/model`` and the planted
    problems to ``path/planted_problems.jsonl``; returns ``{"model", "problems", "carry"}``."""
    path = Path(path)
    tokenizer = planted_tokenizer()
    model = planted_reasoning_model(tokenizer, seed)
    model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    problems = path / "planted_problems.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in planted_problem_file_rows(n_problems)))
    return {"model": path / "model", "problems": problems, "carry": list(CARRY)}


def grade_planted(reply: str, answer: str) -> bool:
    """A planted reply is right when it is the expected word."""
    return reply.strip() == answer
