"""Interventions on MLP neurons (and residual additions): hooks and edits, streaming capture, dose sweeps, scoring and
generation under a plan. Everything here runs the model; nothing here reads the config."""

from neuronaudit.interventions.hooks import (
    ForwardContext,
    InterventionPlan,
    NeuronEdit,
    NeuronHooks,
    ResidualEdit,
    StopForward,
)

__all__ = ["ForwardContext", "InterventionPlan", "NeuronEdit", "NeuronHooks", "ResidualEdit", "StopForward"]
