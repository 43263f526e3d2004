"""Adapters for the training frameworks FSAM is driven by (each imports its framework lazily,
so none is a dependency)."""
