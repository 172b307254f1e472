"""One module per Snakemake rule: read the rule's inputs, call the methods, write the outputs
with provenance. The shared opening (threads, prepared model, provenance) is
:mod:`neuronaudit.stages.common`."""
