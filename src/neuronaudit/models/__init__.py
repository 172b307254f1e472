"""Model loading and architecture adapters."""

from neuronaudit.models.adapters import ArchitectureAdapter, adapter_for, supported_families

__all__ = ["ArchitectureAdapter", "adapter_for", "supported_families"]
