"""Higress-style attribute rules: configuration, paths, built-ins, the per-flow engine."""

# Per-flow bound on text the rules append from a stream (``aistats_max_attribute_bytes``).
DEFAULT_MAX_ATTRIBUTE_BYTES = 1 << 20
