"""Tiny random models for tests, smoke runs and benchmarks: built from configs, no downloads.

``tiny_config(family)`` returns a small Hugging Face config of each supported family;
``tiny_tokenizer()`` trains a byte-level BPE tokenizer on a built-in corpus in well under a
second and gives it a ChatML chat template; ``save_tiny_model(path)`` writes both as a model
directory that the workflow accepts as ``model.source``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import transformers

from neuronaudit.config import deep_update, validate_config

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "How do I bake bread at home? Give me step by step instructions.",
    "I cannot help with that request. I'm sorry, but as an AI I must decline.",
    "What is 7 plus 5? Answer with a number. 12. What is 3 times 4? 12.",
    "List three benefits of drinking water: 1. health 2. energy 3. skin.",
    "The river flows through the old city, past the market and the cathedral.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France. The sky is blue. Cats are animals.",
    "Hello! How are you today? I'm fine, thanks for asking.",
]


def tiny_config(family: str = "llama", vocab_size: int = 384, n_layers: int = 4):
    """A small config of ``family`` (hidden 64, MLP 128, ``n_layers`` blocks)."""
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    t = transformers
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"):
        cls = {
            "llama": t.LlamaConfig,
            "mistral": t.MistralConfig,
            "qwen2": t.Qwen2Config,
            "qwen3": t.Qwen3Config,
            "gemma": t.GemmaConfig,
            "gemma2": t.Gemma2Config,
            "gemma3_text": t.Gemma3TextConfig,
            "phi3": t.Phi3Config,
        }[family]
        kw = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        if family.startswith("gemma") or family == "qwen3":
            kw["head_dim"] = 16
        if family == "phi3":
            kw["num_key_value_heads"] = 4
        return cls(**kw, **common)
    if family == "gpt2":
        return t.GPT2Config(n_layer=n_layers, n_embd=64, n_head=4, n_inner=128, n_positions=512, **common)
    if family == "gpt_neox":
        return t.GPTNeoXConfig(
            num_hidden_layers=n_layers, hidden_size=64, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=512, **common,
        )
    if family == "opt":
        return t.OPTConfig(
            num_hidden_layers=n_layers, hidden_size=64, num_attention_heads=4, ffn_dim=128,
            word_embed_proj_dim=64, max_position_embeddings=512, **common,
        )
    if family == "phi":
        return t.PhiConfig(
            num_hidden_layers=n_layers, hidden_size=64, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=512, **common,
        )
    raise ValueError(f"no tiny config for family {family!r}")


TINY_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
    "gpt2", "gpt_neox", "opt", "phi",
)


def tiny_model(family: str = "llama", seed: int = 0, **kw) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of ``family`` in eval mode (float32)."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 384) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer trained on a built-in corpus, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def narrow_tokenizer(words: int = 60) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer that knows only the ``words`` most frequent words of the built-in
    corpus; every other word is ``<unk>`` (a vocabulary that cannot spell the prompt sets)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers

    counts = Counter(w for line in _CORPUS for w in line.split())
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"])}
    for w, _ in counts.most_common(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<|im_start|>", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(path: str | Path, family: str = "llama", seed: int = 0, n_layers: int = 4,
                    vocabulary: str = "bpe", chat_template: bool = True) -> Path:
    """Write a tiny random model and its tokenizer to ``path`` (a Hugging Face model directory);
    ``vocabulary`` ``narrow`` gives it :func:`narrow_tokenizer` instead of the byte-level BPE;
    ``chat_template`` False saves the tokenizer without its ChatML template (as a base model's)."""
    path = Path(path)
    tokenizer = narrow_tokenizer() if vocabulary == "narrow" else tiny_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer), n_layers=n_layers)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def poison_neurons(adapter, up: dict | None = None, down: dict | None = None):
    """Write a non-finite value into neurons' weights, in place: ``up`` maps ``(layer, neuron)`` to
    the value of that neuron's row of the up projection (what makes its activation), ``down`` to
    the value of its write vector (its column of the output projection). Llama-like families
    (a block MLP with ``up_proj``) for ``up``; any family for ``down``. Returns the adapter."""
    with torch.no_grad():
        for (layer, neuron), value in (up or {}).items():
            adapter.blocks[layer].mlp.up_proj.weight[neuron, :] = float(value)
        for (layer, neuron), value in (down or {}).items():
            adapter.write_matrix(layer)[:, neuron] = float(value)
    return adapter


def default_config(**sections) -> dict:
    """The study config with every schema default, with ``sections`` merged over it
    (``default_config(screen={"k": 5})``)."""

    base = {"prompts": {"sets": {"generic": "config/prompts/generic.jsonl"}}}
    return validate_config(deep_update(base, copy.deepcopy(sections)))


def stage_options(cls, **changes):
    """A stage's options at the schema defaults, with ``changes`` to its own fields; a nested
    options field (``model``, ``judge``, ``capability``) takes a dict of its changes."""

    base = cls.from_config(default_config())
    nested = cls._nested()
    values = {}
    for name, value in changes.items():
        if name in nested and isinstance(value, dict):
            value = dataclasses.replace(getattr(base, name), **value)
        values[name] = value
    return dataclasses.replace(base, **values)


class OutOfMemoryOnce:
    """Make a forward run out of memory the first ``times`` times a batch of ``rows`` rows enters
    ``module`` (the input embeddings of ``model`` by default, so nothing has run yet; a decoder
    block to fail a forward half way): a forward pre-hook raises.

    ``error`` is what is raised: CUDA's ``torch.OutOfMemoryError`` (``"cuda"``, the default) or
    the CPU allocator's ``RuntimeError`` (``"cpu"``). ``failures`` counts the batches failed, so
    a test can check the failure was met. Use as a context manager.
    """

    def __init__(self, model, rows: int, times: int = 1, error: str = "cuda", module=None):
        self.module = module if module is not None else model.get_input_embeddings()
        self.rows, self.times, self.error = int(rows), int(times), error
        self.failures = 0
        self._handle = None

    def _raise(self, module, args, kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is not None and first.shape[0] == self.rows and self.failures < self.times:
            self.failures += 1
            if self.error == "cpu":
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                                   "you tried to allocate 2147483648 bytes")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def __enter__(self):
        self._handle = self.module.register_forward_pre_hook(self._raise, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False
