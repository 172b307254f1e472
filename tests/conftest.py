"""Shared fixtures: tiny random models built from configs (no downloads)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)  # tiny models: one thread is fastest and never oversubscribes

from neuronaudit.models.adapters import adapter_for  # noqa: E402
from neuronaudit.testing import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    return model, adapter_for(model)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from neuronaudit.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model")
