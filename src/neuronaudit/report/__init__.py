"""The audit report: the page (:mod:`~neuronaudit.report.page`), one section per stage,
plots, captions and the multi-study comparison. The HTML template and CSS are package data."""
