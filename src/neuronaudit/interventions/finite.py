"""Non-finite numbers stopped where they first appear.

A NaN or infinity in a model's weights (or an overflow) spreads silently: a NaN activation makes
every later layer NaN, greedy ``argmax`` over NaN logits returns token 0, statistics become NaN
and then read as "missing". :func:`finite_checks` installs hooks that stop the forward at the
first non-finite value with a :class:`~neuronaudit.errors.NonFiniteError` naming where it is:

* the MLP activation ``a_l`` (input of the output projection, before any edit) of layer ``l``:
  the neuron, batch row and token position of the first non-finite entry, and how many neurons of
  the layer are non-finite there (every neuron: the layer's input was already non-finite);
* the MLP output ``W_out a_l``, when ``a_l`` was finite: the neuron whose write vector holds a
  non-finite entry (or, for an overflow of finite values, the neuron with the largest
  ``|a_i|·‖v_i‖``);
* the logits, when every MLP was finite: the vocabulary entry and position.

Only real tokens are checked: positions are *selected* by the attention mask, never multiplied by
it (``NaN × 0`` is ``NaN``). The checks cost one ``isfinite`` reduction per layer and forward; the
location is worked out only once something is non-finite. The hooks live on the model, installed
once (nested :func:`finite_checks` and a stage's lasting :func:`install_finite_checks` share
them), and are prepended, so they see the model's own activations before any edit.

:func:`check_finite` does the same for a tensor the caller computed (a gradient, a statistic).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from neuronaudit.errors import NonFiniteError
from neuronaudit.models.kv_cache import cache_from_arguments, cache_length

__all__ = ["NonFiniteError", "check_finite", "finite_checks", "install_finite_checks"]


def _first_bad(bad: torch.Tensor) -> tuple[int, ...]:
    """Index of the first ``True`` of a bool tensor, in row-major order."""
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape))


def check_finite(values: torch.Tensor, site: str, *, layer: int | None = None,
                 dims: tuple[str, ...] = ("row", "neuron"), detail: str = "") -> None:
    """Raise :class:`NonFiniteError` at the first non-finite entry of ``values``; ``dims`` names
    its axes (``row``, ``neuron``, ``position``, anything else is ignored)."""
    values = values.detach()
    if not values.is_floating_point() or bool(torch.isfinite(values).all()):
        return
    index = _first_bad(~torch.isfinite(values))
    named = dict(zip(dims, index))
    raise NonFiniteError(float(values[index]), site, layer=layer, neuron=named.get("neuron"), row=named.get("row"),
                         position=named.get("position"), detail=detail)


class _Guard:
    """The installed hooks of one adapter (see the module docstring)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.valid: torch.Tensor | None = None  # [batch, chunk] real tokens of the current forward
        self.past = 0
        self.handles: list = []
        self.users = 0
        self._signature = inspect.signature(adapter.base.forward)

    # -- where the real tokens are ------------------------------------------------------------
    def on_base(self, module, args, kwargs):
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        ids = bound.get("input_ids", extra.get("input_ids"))
        ref = ids if ids is not None else bound.get("inputs_embeds", extra.get("inputs_embeds"))
        if ref is None:
            self.valid = None
            return
        batch, chunk = int(ref.shape[0]), int(ref.shape[1])
        self.past = cache_length(cache_from_arguments(bound))
        mask = bound.get("attention_mask", extra.get("attention_mask"))
        if mask is not None and mask.dim() == 2 and mask.shape[1] >= self.past + chunk:
            self.valid = mask[:, self.past : self.past + chunk].bool()
        else:
            self.valid = torch.ones(batch, chunk, dtype=torch.bool, device=ref.device)

    def _shaped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[batch, chunk, width]`` (OPT flattens batch and chunk before ``fc2``)."""
        if x.dim() == 2 and self.valid is not None and x.shape[0] == self.valid.numel():
            return x.view(*self.valid.shape, -1)
        return x

    def _bad(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[batch, chunk, width]`` non-finite entries at real tokens, or ``None`` when all finite."""
        if bool(torch.isfinite(x).all()):
            return None
        bad = ~torch.isfinite(x)
        if self.valid is not None and self.valid.shape == bad.shape[:2]:
            bad = bad & self.valid[..., None]  # selection: padding never counts
        return bad if bool(bad.any()) else None

    def _position(self, t: int) -> int:
        return self.past + t

    # -- the MLP activation and output --------------------------------------------------------
    def on_activation(self, layer: int):
        def hook(module, args):
            a = self._shaped(args[0].detach())
            bad = self._bad(a)
            if bad is None:
                return None
            b, t, i = _first_bad(bad)
            n_bad = int(bad[b, t].sum())
            detail = (f"{n_bad} of the layer's {a.shape[-1]} neurons are non-finite there"
                      + (": the layer's input was already non-finite" if n_bad == a.shape[-1] else ""))
            raise NonFiniteError(float(a[b, t, i]), "MLP activation", layer=layer, neuron=i, row=b,
                                 position=self._position(t), detail=detail)

        return hook

    def on_output(self, layer: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            bad = self._bad(self._shaped(out.detach()))
            if bad is None:
                return None
            b, t, _ = _first_bad(bad)
            a = self._shaped(args[0].detach())[b, t].float()
            value = float(self._shaped(out.detach())[b, t][bad[b, t]][0])
            if not bool(torch.isfinite(a).all()):  # finite before the edits, non-finite after
                i = int((~torch.isfinite(a)).nonzero()[0, 0])
                raise NonFiniteError(value, "MLP output", layer=layer, neuron=i, row=b, position=self._position(t),
                                     detail="an intervention made the neuron's activation non-finite")
            w = self.adapter.write_matrix(layer).detach()
            bad_columns = (~torch.isfinite(w)).any(dim=0)
            if bool(bad_columns.any()):
                i = int(bad_columns.nonzero()[0, 0])
                raise NonFiniteError(value, "MLP output", layer=layer, neuron=i, row=b, position=self._position(t),
                                     detail=f"the write vector of neuron {i} holds non-finite weights "
                                            f"({int(bad_columns.sum())} such neurons in layer {layer})")
            bias = getattr(module, "bias", None)
            if bias is not None and not bool(torch.isfinite(bias).all()):
                raise NonFiniteError(value, "MLP output", layer=layer, row=b, position=self._position(t),
                                     detail="the output projection's bias holds non-finite values")
            i = int((a.abs() * w.float().norm(dim=0)).argmax())
            raise NonFiniteError(value, "MLP output", layer=layer, neuron=i, row=b, position=self._position(t),
                                 detail=f"finite activations and weights overflow; the largest |a|·|v| is neuron {i}")

        return hook

    def on_logits(self, module, args, output):
        logits = output.detach()
        if bool(torch.isfinite(logits).all()):
            return None
        bad = ~torch.isfinite(logits)
        if self.valid is not None and logits.dim() == 3 and logits.shape[0] == self.valid.shape[0]:
            k = min(logits.shape[1], self.valid.shape[1])  # logits_to_keep: the last k positions
            real = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
            real[:, logits.shape[1] - k :] = self.valid[:, self.valid.shape[1] - k :]
            bad = bad & real[..., None]
        if not bool(bad.any()):
            return None
        b, t, v = _first_bad(bad) if bad.dim() == 3 else (0, *_first_bad(bad))
        chunk = self.valid.shape[1] if self.valid is not None else logits.shape[1]
        raise NonFiniteError(float(logits[b, t, v] if logits.dim() == 3 else logits[t, v]), "logits", row=b,
                             position=self.past + chunk - logits.shape[1] + t if logits.dim() == 3 else None,
                             detail=f"token id {v}, after finite MLP activations and outputs in every layer "
                                    "(the final norm or the unembedding)")

    # -- install ------------------------------------------------------------------------------
    def install(self) -> None:
        a = self.adapter
        self.handles.append(a.base.register_forward_pre_hook(self.on_base, with_kwargs=True, prepend=True))
        for layer, module in enumerate(a.mlp_outs):
            self.handles.append(module.register_forward_pre_hook(self.on_activation(layer), prepend=True))
            self.handles.append(module.register_forward_hook(self.on_output(layer)))
        head = a.model.get_output_embeddings()
        if head is not None:
            self.handles.append(head.register_forward_hook(self.on_logits))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


_ATTRIBUTE = "_neuronaudit_finite_guard"


def install_finite_checks(adapter_or_model) -> None:
    """Install the checks on a model (or an adapter's model) for good: a stage's loaded model.
    The hooks live on the model, so every adapter of it shares them."""
    model = getattr(adapter_or_model, "model", None) if hasattr(adapter_or_model, "mlp_outs") else adapter_or_model
    guard = getattr(model, _ATTRIBUTE, None)
    if guard is None:
        from neuronaudit.models.adapters import adapter_for

        adapter = adapter_or_model if model is not adapter_or_model else adapter_for(model)
        guard = _Guard(adapter)
        guard.install()
        object.__setattr__(model, _ATTRIBUTE, guard)  # not a submodule nor a parameter
    guard.users += 1


@contextmanager
def finite_checks(adapter_or_model) -> Iterator[None]:
    """The checks for the duration of a block, on a model or an adapter's model; nested blocks
    (and a stage's lasting install) share one set of hooks."""
    model = adapter_or_model.model if hasattr(adapter_or_model, "mlp_outs") else adapter_or_model
    install_finite_checks(adapter_or_model)
    try:
        yield
    finally:
        guard = getattr(model, _ATTRIBUTE)
        guard.users -= 1
        if guard.users == 0:
            guard.remove()
            object.__delattr__(model, _ATTRIBUTE)
