"""neuronaudit: audit which MLP neurons of a causal LM control a behaviour.

A neuron ``(l, i)`` is coordinate ``i`` of layer ``l``'s MLP intermediate activation, the input of
the MLP output projection. The package reads and edits neurons with forward pre-hooks on that
module (see :mod:`neuronaudit.interventions`). The package is laid out in rooms that import only
downwards: ``models`` → ``interventions`` → ``evaluation`` → ``methods`` (the algorithms, no file
I/O) → ``report`` → ``stages`` (one per Snakemake rule); the README's Layout section maps them.
"""

from importlib.metadata import PackageNotFoundError, version

from neuronaudit.errors import NeuronAuditError

# The version lives in pyproject.toml only; this reads the installed distribution's metadata, the
# same value neuronaudit.io records in table provenance.
try:
    __version__ = version("neuronaudit")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
__all__ = ["NeuronAuditError", "__version__"]
