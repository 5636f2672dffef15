"""Comparison methods in the same framework as DnD (same targets, probes and label files)."""
