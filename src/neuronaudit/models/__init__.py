"""Models: sources (resolved without loading weights), architecture declarations, adapters that
map standard sites onto Hugging Face modules, loading and the KV cache's argument names."""
