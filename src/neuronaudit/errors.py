"""The one exception type users see: a one-line message naming the bad value."""

from __future__ import annotations


class NeuronAuditError(Exception):
    """Bad input (config, prompt file, model path, architecture, dose).

    The CLI prints ``neuronaudit: error: <message>`` and exits with status 2, so the message must
    be a single line that names the offending value.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class NonFiniteError(NeuronAuditError):
    """A NaN or infinity where a number was computed (an activation, an MLP output, a logit, a
    gradient, a statistic), stopped where it first appeared.

    The message names the stage (filled in by the CLI from the subcommand), the site, the layer
    and neuron, and the prompt: the row of the batch until the code that knows the prompts names
    it with :meth:`at`.
    """

    def __init__(self, value: float, site: str, *, layer: int | None = None, neuron: int | None = None,
                 row: int | None = None, position: int | None = None, detail: str = ""):
        self.value, self.site, self.layer, self.neuron = value, site, layer, neuron
        self.row, self.position, self.detail = row, position, detail
        self.stage: str | None = None
        self.prompt: str | None = None
        self.context: str = ""
        super().__init__(self._message())

    def at(self, prompt: str | None = None, context: str = "", stage: str | None = None) -> NonFiniteError:
        """Name the prompt (and what ran on it, e.g. a dose) and the stage; returns ``self``. An
        outer caller knows more: its prompt name replaces an inner one, its context is added."""
        if prompt is not None:
            self.prompt = str(prompt)
        if context:
            self.context = f"{self.context}; {context}" if self.context else context
        if stage is not None:
            self.stage = stage
        self.args = (self._message(),)
        return self

    def _message(self) -> str:
        where = [f"layer {self.layer}" if self.layer is not None else None,
                 f"neuron {self.neuron}" if self.neuron is not None else None,
                 f"prompt {self.prompt}" if self.prompt is not None
                 else (f"batch row {self.row}" if self.row is not None else None),
                 f"token {self.position}" if self.position is not None else None]
        text = f"{_number(self.value)} in the {self.site}"
        located = ", ".join(w for w in where if w)
        if located:
            text += f" at {located}"
        if self.context:
            text += f" ({self.context})"
        if self.detail:
            text += f": {self.detail}"
        if self.stage:
            text = f"{self.stage}: {text}"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self._message()


def _number(value: float) -> str:
    v = float(value)
    return "nan" if v != v else ("inf" if v > 0 else "-inf") if v in (float("inf"), float("-inf")) else repr(v)
