"""Deterministic samplers (ODE solvers of the probability-flow ODE). Filled in by the samplers work."""
SAMPLERS: dict = {}
