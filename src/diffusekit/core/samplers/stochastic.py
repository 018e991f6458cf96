"""Stochastic samplers (ancestral and SDE). Filled in by the samplers work."""
SAMPLERS: dict = {}
