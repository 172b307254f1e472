"""A tiny Llama with planted neurons: a ground truth the whole workflow must recover.

The model answers a yes/no behaviour in one token. A prompt ending in an *on* cue word
(``POSITIVE_CUES``) is answered `` yes``; one ending in an *off* cue (``NEGATIVE_CUES``) is answered
`` no`` with a margin of about 2.6 nats, and the answer is followed by the end-of-sequence token.
Attention writes nothing (every ``o_proj`` is zero), so each position is a function of its own
token and the MLP neurons, and the residual axes below carry the whole mechanism (64 dimensions,
axes 0–7 planted, 8–63 a random token identity; every embedding has norm 8, so the first RMSNorm
leaves it unchanged):

========= ============================================================================
axis      meaning
========= ============================================================================
``on``    the on-cue marker (4.0 in an on cue's embedding)
``off``   the off-cue marker (4.0 in an off cue's embedding)
``relay`` the controller's write axis, read only by the relay (and, at huge doses, by the
          readout row of the ``JUNK_CEILING`` token)
``bias``  a constant 3.0 in every embedding
``yes``   read by the `` yes`` logit (×10); 1.0 in every cue's embedding
``no``    read by the `` no`` logit (×10); 1.25 in every cue's embedding
``junk``  2.0 in every embedding, cancelled by the keystone; read by the ``JUNK_KEYSTONE`` logit
``stop``  5.0 in the answer tokens' embeddings; read by the end-of-sequence logit
========= ============================================================================

Planted neurons (``PLANTED``):

``keystone``   layer 0, reads ``bias`` (active ≈ 3.5 on every token) and writes ``−2·junk``:
               ablating it leaves the junk axis in place, the ``JUNK_KEYSTONE`` token wins at every
               position and generic-text perplexity explodes, while random same-layer neurons do
               nothing. It is universal (top activation on every prompt) and has no contrast.
``controller`` layer 1, active ≈ 17 on on cues and exactly 0 elsewhere; writes ``relay``, which
               is orthogonal to the readout: its only route to the answer is the relay.
``relay``      layer 2, gate ``2.5·relay − 3.23·bias``: about −10 on every natural input, where
               SiLU is flat (slope ≈ 4e-4), so the gradient through it is near zero. A controller
               dose of x ≈ 0.6 budget units turns the gate positive and the relay writes ``yes``:
               the dose sweep finds a trigger the gradient misses. At x = 4 the dose itself
               dominates the final norm and the junk token wins (the collapse ceiling).
``direct``     layer 2, active ≈ 17 on on cues, writes ``3·yes`` straight onto the readout: the
               gradient and the sweep both find it (trigger at x ≈ 0.1).

Every other MLP weight is random (gate and up N(0, 0.1²), down N(0, 0.01²) on the random axes
8–63 only): neurons with varied activations and no route to the answer, the negative controls a
dose sweep must not call controllers. :func:`save_planted_model` writes the model, its
tokenizer (byte-level BPE without a chat template) and the two prompt sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

D_MODEL, D_MLP, N_LAYERS = 64, 128, 4
AXES = {"on": 0, "off": 1, "relay": 2, "bias": 3, "yes": 4, "no": 5, "junk": 6, "stop": 7}
POSITIVE_CUES = ("red", "blue", "green", "gold")
NEGATIVE_CUES = ("cat", "dog", "fish", "bird")
ANSWERS = {"behaviour": "yes", "default": "no"}
JUNK_CEILING, JUNK_KEYSTONE = "qq", "kk"


@dataclass(frozen=True)
class PlantedNeurons:
    """(layer, neuron) of each planted neuron."""

    keystone: tuple[int, int] = (0, 3)
    controller: tuple[int, int] = (1, 7)
    relay: tuple[int, int] = (2, 11)
    direct: tuple[int, int] = (2, 29)


PLANTED = PlantedNeurons()

_FILLER_SUBJECTS = ("the lamp", "a river", "the market", "my garden", "the old city", "a small boat", "the tower",
                    "the bread", "our kitchen", "the road")
_FILLER_VERBS = ("looks", "seems", "is called", "was painted", "turns", "reads")
_WORDS = ["bread", "water", "river", "city", "market", "cathedral", "capital", "animals", "health", "energy",
          "steps", "today", "thanks", "answer", "number"]


def planted_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE (vocabulary 512) in which every cue, answer and junk word is one token after a
    space; no chat template (the workflow runs it with ``chat_template: none``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from neuronaudit.testing import _CORPUS

    special = (*POSITIVE_CUES, *NEGATIVE_CUES, *ANSWERS.values(), JUNK_CEILING, JUNK_KEYSTONE)
    corpus = list(_CORPUS) * 4 + [" ".join(f" {w}" for w in special)] * 40 + [" ".join(_WORDS)] * 8
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    for word in special:
        ids = fast(" " + word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"planted word {word!r} is {len(ids)} tokens in the planted tokenizer")
    return fast


def _word_id(tokenizer, word: str) -> int:
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]


def _blank_llama(tokenizer, n_layers: int) -> transformers.LlamaForCausalLM:
    """A Llama of the planted sizes for ``tokenizer`` (weights to be planted), its special tokens
    in both the config and the generation config."""
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-6,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def planted_model(tokenizer, seed: int = 0) -> transformers.LlamaForCausalLM:
    """The planted Llama (weights in the module docstring) for ``tokenizer``'s vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    model = _blank_llama(tokenizer, N_LAYERS)
    a = AXES
    e = torch.eye(D_MODEL)
    with torch.no_grad():
        emb = torch.zeros(len(tokenizer), D_MODEL)
        emb[:, 8:] = torch.randn(len(tokenizer), D_MODEL - 8, generator=gen)
        emb[:, a["bias"]], emb[:, a["junk"]] = 3.0, 2.0
        cues = [_word_id(tokenizer, w) for w in (*POSITIVE_CUES, *NEGATIVE_CUES)]
        emb[cues, a["yes"]], emb[cues, a["no"]] = 1.0, 1.25
        emb[[_word_id(tokenizer, w) for w in POSITIVE_CUES], a["on"]] = 4.0
        emb[[_word_id(tokenizer, w) for w in NEGATIVE_CUES], a["off"]] = 4.0
        emb[[_word_id(tokenizer, w) for w in ANSWERS.values()], a["stop"]] = 5.0
        planted = emb[:, :8].pow(2).sum(-1, keepdim=True)  # random part scaled so every row has norm 8
        emb[:, 8:] *= ((64.0 - planted).clamp_min(1.0).sqrt() / emb[:, 8:].norm(dim=-1, keepdim=True))
        model.model.embed_tokens.weight.copy_(emb)

        head = 0.02 * torch.randn(len(tokenizer), D_MODEL, generator=gen)
        head[_word_id(tokenizer, ANSWERS["behaviour"])] = 10.0 * e[a["yes"]]
        head[_word_id(tokenizer, ANSWERS["default"])] = 10.0 * e[a["no"]]
        head[tokenizer.eos_token_id] = 10.0 * e[a["stop"]]
        head[_word_id(tokenizer, JUNK_CEILING)] = 2.0 * e[a["relay"]]
        head[_word_id(tokenizer, JUNK_KEYSTONE)] = 10.0 * e[a["junk"]]
        model.lm_head.weight.copy_(head)

        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            mlp = layer.mlp
            mlp.gate_proj.weight.copy_(0.1 * torch.randn(D_MLP, D_MODEL, generator=gen))
            mlp.up_proj.weight.copy_(0.1 * torch.randn(D_MLP, D_MODEL, generator=gen))
            down = 0.01 * torch.randn(D_MODEL, D_MLP, generator=gen)
            down[:8] = 0.0  # random neurons write off the planted axes: no route to the answer
            mlp.down_proj.weight.copy_(down)

        def plant(where, gate, up, write):
            mlp = model.model.layers[where[0]].mlp
            mlp.gate_proj.weight[where[1]] = gate
            mlp.up_proj.weight[where[1]] = up
            mlp.down_proj.weight[:, where[1]] = write

        p = PLANTED
        # keystone: gate = up = 2 on every token (silu(2)·2 ≈ 3.52); cancels the junk axis
        plant(p.keystone, (2 / 3) * e[a["bias"]], (2 / 3) * e[a["bias"]], (-2.0 / 3.523) * e[a["junk"]])
        # controller: ≈ 16.8 on on cues (gate = up ≈ 4.13 after the norm), writes ~1.0 onto the relay axis
        plant(p.controller, e[a["on"]], e[a["on"]], (1.0 / 16.8) * e[a["relay"]])
        # relay: flat SiLU region on natural inputs; fires when a dose pushes the relay axis up
        plant(p.relay, 2.5 * e[a["relay"]] - 3.23 * e[a["bias"]], e[a["bias"]], 0.3 * e[a["yes"]])
        # direct: ≈ 16.8 on on cues, writes 3.0 onto the yes readout
        plant(p.direct, e[a["on"]], e[a["on"]], (3.0 / 16.8) * e[a["yes"]])
    return model


def planted_prompts(n_pairs: int = 48) -> tuple[list[dict], list[dict]]:
    """(on prompts, off prompts): the same fillers ending in an on cue or an off cue, paired."""
    on, off = [], []
    for k in range(n_pairs):
        subject = _FILLER_SUBJECTS[k % len(_FILLER_SUBJECTS)]
        verb = _FILLER_VERBS[(k // len(_FILLER_SUBJECTS)) % len(_FILLER_VERBS)]
        words = " ".join(_WORDS[(k * 7 + j) % len(_WORDS)] for j in range(1 + k % 3))
        text = f"Note {k + 1} about {words}: {subject} {verb}"
        pair = f"planted-{k + 1:03d}"
        on.append({"prompt_id": f"on-{k + 1:03d}", "text": f"{text} {POSITIVE_CUES[k % len(POSITIVE_CUES)]}",
                   "pair_id": pair})
        off.append({"prompt_id": f"off-{k + 1:03d}", "text": f"{text} {NEGATIVE_CUES[k % len(NEGATIVE_CUES)]}",
                    "pair_id": pair})
    return on, off


def save_planted_model(path: str | Path, seed: int = 0) -> dict:
    """Write the planted model and tokenizer to ``path/model`` and its prompt sets to
    ``path/planted_on.jsonl`` and ``path/planted_off.jsonl``; returns the paths and the planted
    neurons (``{"model", "on", "off", "neurons": {name: [layer, neuron]}}``)."""
    path = Path(path)
    tokenizer = planted_tokenizer()
    model = planted_model(tokenizer, seed)
    model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    files = {}
    for name, rows in zip(("on", "off"), planted_prompts()):
        files[name] = path / f"planted_{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": path / "model", **files,
            "neurons": {k: list(v) for k, v in PLANTED.__dict__.items()}}


# --------------------------------------------------------------------------------------------
# a planted sufficient pair (WASD, SCIENCE.md section 5)
# --------------------------------------------------------------------------------------------

#: The last word decides the answer: a word of ``BOTH_CUES`` carries both features and is answered
#: `` yes``; one of ``FIRST_CUES`` or ``SECOND_CUES`` carries one feature, one of ``NO_CUES`` none,
#: and all of these are answered `` no``.
BOTH_CUES = ("red", "blue")
FIRST_CUES = ("green", "gold")
SECOND_CUES = ("cat", "dog")
NO_CUES = ("fish", "bird")
SUFFICIENT_AXES = {"first": 0, "second": 1, "bias": 3, "yes": 4, "no": 5}


@dataclass(frozen=True)
class SufficientNeurons:
    """(layer, neuron) of each neuron planted in :func:`planted_sufficient_model`."""

    first: tuple[int, int] = (1, 5)  # fires on the first feature; writes 1.1 onto ``yes``
    second: tuple[int, int] = (1, 9)  # fires on the second feature; writes 0.9 onto ``yes``
    always: tuple[int, int] = (0, 3)  # fires on every token; writes 1.5 onto ``yes``
    noise_first: tuple[int, int] = (1, 40)  # fires harder than ``first`` on the first feature; no route
    noise_second: tuple[int, int] = (1, 41)  # fires harder than ``second`` on the second feature; no route
    noise_both: tuple[int, int] = (2, 17)  # fires only when both features are present; no route


SUFFICIENT = SufficientNeurons()


def planted_sufficient_model(tokenizer, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A three-layer Llama (for :func:`planted_tokenizer`'s vocabulary) whose answer `` yes`` needs
    two planted neurons together: the ground truth of the sufficient-set search.

    Attention writes nothing, so the last position is a function of the last token alone. Every
    embedding has norm 8, carries ``no = 2.75`` and ``bias = 3``; the cue words carry 4.0 on the
    ``first`` and/or ``second`` feature axis (``BOTH_CUES`` both). The `` yes`` logit reads ``10·yes``,
    the `` no`` logit ``10·no``. Writes onto ``yes`` (:data:`SUFFICIENT`):

    * ``always`` 1.5 on every token (necessary, never informative: it holds on every input),
    * ``first`` 1.1 when the first feature is present, ``second`` 0.9 when the second is.

    ``yes`` beats ``no = 2.75`` only with all three (3.5); ``always`` with one of the pair gives at
    most 2.6. So on inputs whose last word is any cue, clamping ``first`` and ``second`` to their
    activations on a ``BOTH_CUES`` word forces `` yes`` (the unique minimal sufficient set), while
    either alone forces it only where the other feature is present. Three noise neurons correlate
    with the pair (``noise_first``, ``noise_second`` fire harder on the same features,
    ``noise_both`` exactly when the answer is `` yes``) but write only onto the random axes: a
    contrastive screen ranks them first and clamping them changes nothing. Gradient × activation
    ranks ``always`` first (largest write), so its top two miss ``second``.
    """
    gen = torch.Generator().manual_seed(seed)
    n_layers = 3
    model = _blank_llama(tokenizer, n_layers)
    a = SUFFICIENT_AXES
    e = torch.eye(D_MODEL)

    def random_write(norm: float) -> torch.Tensor:
        v = torch.zeros(D_MODEL)
        v[8:] = torch.randn(D_MODEL - 8, generator=gen)
        return norm * v / v.norm()

    with torch.no_grad():
        emb = torch.zeros(len(tokenizer), D_MODEL)
        emb[:, 8:] = torch.randn(len(tokenizer), D_MODEL - 8, generator=gen)
        emb[:, a["bias"]], emb[:, a["no"]] = 3.0, 2.75
        emb[[_word_id(tokenizer, w) for w in (*BOTH_CUES, *FIRST_CUES)], a["first"]] = 4.0
        emb[[_word_id(tokenizer, w) for w in (*BOTH_CUES, *SECOND_CUES)], a["second"]] = 4.0
        planted = emb[:, :8].pow(2).sum(-1, keepdim=True)
        emb[:, 8:] *= ((64.0 - planted).clamp_min(1.0).sqrt() / emb[:, 8:].norm(dim=-1, keepdim=True))
        model.model.embed_tokens.weight.copy_(emb)

        head = 0.02 * torch.randn(len(tokenizer), D_MODEL, generator=gen)
        head[:, :8] = 0.0
        head[_word_id(tokenizer, ANSWERS["behaviour"])] = 10.0 * e[a["yes"]]
        head[_word_id(tokenizer, ANSWERS["default"])] = 10.0 * e[a["no"]]
        model.lm_head.weight.copy_(head)

        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            mlp = layer.mlp
            mlp.gate_proj.weight.copy_(0.1 * torch.randn(D_MLP, D_MODEL, generator=gen))
            mlp.up_proj.weight.copy_(0.1 * torch.randn(D_MLP, D_MODEL, generator=gen))
            down = 0.01 * torch.randn(D_MODEL, D_MLP, generator=gen)
            down[:8] = 0.0
            mlp.down_proj.weight.copy_(down)

        def plant(where, gate, up, write):
            mlp = model.model.layers[where[0]].mlp
            mlp.gate_proj.weight[where[1]] = gate
            mlp.up_proj.weight[where[1]] = up
            mlp.down_proj.weight[:, where[1]] = write

        p = SUFFICIENT
        # gate = up = 2 on every token: silu(2)·2 ≈ 3.52
        plant(p.always, (2 / 3) * e[a["bias"]], (2 / 3) * e[a["bias"]], (1.5 / 3.523) * e[a["yes"]])
        # gate = up ≈ 3.95 on a feature word after the norm: silu(3.95)·3.95 ≈ 15.2
        plant(p.first, e[a["first"]], e[a["first"]], (1.1 / 15.2) * e[a["yes"]])
        plant(p.second, e[a["second"]], e[a["second"]], (0.9 / 15.2) * e[a["yes"]])
        plant(p.noise_first, 1.5 * e[a["first"]], 1.5 * e[a["first"]], random_write(0.3))
        plant(p.noise_second, 1.5 * e[a["second"]], 1.5 * e[a["second"]], random_write(0.3))
        # fires (≈ 20) only when both features are present: gate 2.5·(first + second − 4·bias/3)
        both = 2.5 * (e[a["first"]] + e[a["second"]] - (4 / 3) * e[a["bias"]])
        plant(p.noise_both, both, both, random_write(0.3))
    return model


#: Nouns and places of the planted sufficient task's notes (all in the planted vocabulary).
SUFFICIENT_WORDS = ("bread", "water", "energy", "steps", "today", "health")
SUFFICIENT_SUBJECTS = ("the lamp", "a river", "the market", "my garden", "the old city", "a small boat")


def planted_sufficient_prompts(n: int = 32, seed: int = 0) -> list[dict]:
    """Notes ending in a cue word, three in four a ``BOTH_CUES`` word (answered `` yes``), the rest
    one of the other cues (answered `` no``): ``prompt_id``, ``text`` and ``span`` (``"Note about"``,
    which the perturbations keep while they vary the noun, the subject and the cue)."""
    rng = np.random.default_rng(seed)
    others = (*FIRST_CUES, *SECOND_CUES, *NO_CUES)
    rows, seen = [], set()
    while len(rows) < n:
        cue = rng.choice(BOTH_CUES) if len(rows) % 4 else rng.choice(others)
        text = f"Note about {rng.choice(SUFFICIENT_WORDS)}: {rng.choice(SUFFICIENT_SUBJECTS)} looks {cue}"
        if text not in seen:
            seen.add(text)
            rows.append({"prompt_id": f"note-{len(rows) + 1:04d}", "text": text, "span": "Note about"})
    return rows


def planted_sufficient_task() -> dict:
    """The planted task as a user declares it under ``sufficient.tasks`` (prompt set ``planted_notes``):
    substitutions that vary the cue word, the noun and the subject, so that only the planted pair
    can hold the answer `` yes`` across the perturbations."""
    return {"set": "planted_notes", "chat_template": "none", "templates": [], "fillers": [], "droppable": [],
            "operations": ["substitute"], "max_edits": 3,
            "substitutions": [[*BOTH_CUES, *FIRST_CUES, *SECOND_CUES, *NO_CUES], list(SUFFICIENT_WORDS),
                              list(SUFFICIENT_SUBJECTS)]}


def save_planted_sufficient_model(path: str | Path, seed: int = 0) -> dict:
    """Write :func:`planted_sufficient_model` and its tokenizer to ``path/model`` and the task's
    prompts to ``path/planted_notes.jsonl``; returns ``{"model", "notes", "neurons"}``."""
    path = Path(path)
    tokenizer = planted_tokenizer()
    model = planted_sufficient_model(tokenizer, seed)
    model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    notes = path / "planted_notes.jsonl"
    notes.write_text("".join(json.dumps(r) + "\n" for r in planted_sufficient_prompts()))
    return {"model": path / "model", "notes": notes,
            "neurons": {k: list(v) for k, v in SUFFICIENT.__dict__.items()}}
