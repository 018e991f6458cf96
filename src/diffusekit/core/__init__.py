"""Pure math on tensors: schedules, sigmas, denoisers, samplers, guidance, noise, objectives.

Imports only torch. Never imports `diffusekit.models` or anything above it.
"""
