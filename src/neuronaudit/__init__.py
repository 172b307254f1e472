"""neuronaudit: audit which MLP neurons of a causal LM control a behaviour.

A neuron ``(l, i)`` is coordinate ``i`` of layer ``l``'s MLP intermediate activation, the input of
the MLP output projection. The package reads and edits neurons with forward pre-hooks on that
module (see :mod:`neuronaudit.interventions`), collects streaming statistics to Parquet
(:mod:`neuronaudit.interventions.capture`), and builds the audit report (:mod:`neuronaudit.report`).
"""

from neuronaudit.errors import NeuronAuditError

__version__ = "0.1.0"
__all__ = ["NeuronAuditError", "__version__"]
