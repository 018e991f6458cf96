"""Every sampler we share with k-diffusion, against k-diffusion's own sampling.py (0.1.1.post1, the code
A1111 runs; loaded alone by the `k_sampling` fixture in tests/conftest.py).

Same denoiser, same noise, float64 (torch's default dtype too, so k-diffusion's internal tensors are
float64): the closed-form 16-d Gaussian-mixture denoiser and a random conv net behind EpsDenoiser, at 5,
10 and 25 steps, every knob both sides have. Noise: each run gets a fresh stream that answers every call
with the next standard normal draw of a seeded generator, passed as `noise_sampler` to both sides (and
to k-diffusion's churn samplers, which call torch.randn_like, through the `k_randn` fixture, as A1111
routes it). Equal streams therefore also mean equal call order and count. Callbacks are compared too.
Measured: the results agree to < 1e-13 of their scale.
"""
import math

import pytest
import torch
from torch import nn

from diffusekit.core import sigmas as sigma_schedules
from diffusekit.core.denoisers import EpsDenoiser
from diffusekit.core.mixture import GaussianMixture
from diffusekit.core.samplers import SAMPLERS
from diffusekit.core.schedules import DiscreteSchedule

F64 = torch.float64
SD = DiscreteSchedule.from_name("scaled_linear")
WORLD = GaussianMixture.example(dim=16)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


class ConvEps(nn.Module):
    """A random eps network on (B, 4, 6, 6) latents with a timestep embedding (weights from seed 0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Conv2d(4, 8, 3, padding=1).to(F64)
        self.emb = nn.Linear(2, 8).to(F64)
        self.out = nn.Conv2d(8, 4, 3, padding=1).to(F64)

    def forward(self, x_in, t):
        e = torch.stack([torch.sin(t / 150), torch.cos(t / 400)], dim=1).to(x_in.dtype)
        h = torch.nn.functional.silu(self.inp(x_in) + self.emb(e)[:, :, None, None])
        return self.out(h) * 0.5 + x_in * 0.3


DENOISERS = {"mixture16": (WORLD, (6, 16)), "conv": (EpsDenoiser(ConvEps(), SD), (3, 4, 6, 6))}


class Stream:
    """A noise sampler answering each call with the next draw of its own generator (call order matters)."""

    def __init__(self, like, seed):
        self.like, self.gen, self.calls = like, torch.Generator().manual_seed(seed), 0

    def __call__(self, *_):
        self.calls += 1
        return torch.randn(self.like.shape, generator=self.gen, dtype=self.like.dtype)


# (our id, knobs). The k-diffusion function is sample_<id>, given the same knobs.
CHURN = [{}, {"s_churn": 2.0}, {"s_churn": 5.0, "s_tmin": 0.1, "s_tmax": 5.0}, {"s_churn": 1.0, "s_noise": 1.003}]
ANCESTRAL = [{}, {"eta": 0.5}, {"eta": 0.0}, {"eta": 1.0, "s_noise": 0.9}]
CASES = (
    [(sid, k) for sid in ("euler", "heun", "dpm_2") for k in CHURN]
    + [(sid, k) for sid in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral") for k in ANCESTRAL]
    + [("lms", {}), ("lms", {"order": 2}), ("lms", {"order": 6}), ("dpmpp_2m", {})]
    + [("dpmpp_sde", k) for k in ANCESTRAL + [{"r": 0.3}, {"r": 0.7, "eta": 0.5}]]
    + [("dpmpp_2m_sde", k) for k in ANCESTRAL + [{"solver_type": "heun"}, {"solver_type": "heun", "eta": 0.3}]]
    + [("dpmpp_3m_sde", k) for k in ANCESTRAL]
    + [("dpm_fast", k) for k in [{}, {"eta": 1.0}, {"eta": 0.5, "s_noise": 0.9}]]
    + [("dpm_adaptive", k) for k in [{}, {"order": 2}, {"rtol": 0.01, "atol": 0.001}, {"h_init": 0.2},
                                     {"pcoeff": 0.1, "icoeff": 0.6, "dcoeff": 0.05}, {"accept_safety": 0.9},
                                     {"eta": 1.0}, {"eta": 0.5, "s_noise": 0.9, "order": 2}]]
)
TAKES_NOISE_SAMPLER = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
                       "dpmpp_3m_sde", "dpm_fast", "dpm_adaptive"}
CHURNS = {"euler", "heun", "dpm_2"}            # k-diffusion: torch.randn_like on every step; ours: noise_sampler
ENDS_ONLY = {"dpm_fast", "dpm_adaptive"}     # k-diffusion's signature: (sigma_min, sigma_max[, n])


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(before)


def _kdiffusion_run(k, route_randn, sid, denoiser, x, sig, knobs, stream, callback):
    fn = getattr(k, f"sample_{sid}")
    kw = dict(knobs, callback=callback, disable=True)
    if sid in TAKES_NOISE_SAMPLER:
        kw["noise_sampler"] = stream
    if sid in ENDS_ONLY:
        ends = dict(sigma_min=sig[sig > 0].min(), sigma_max=sig.max())
        if sid == "dpm_fast":
            ends["n"] = len(sig) - 1
        return fn(denoiser, x, **ends, **kw)
    route_randn(stream)                        # the churn samplers' torch.randn_like
    return fn(denoiser, x, sig, **kw)


@pytest.mark.parametrize("steps", [5, 10, 25])
@pytest.mark.parametrize("name", list(DENOISERS))
@pytest.mark.parametrize("sid,knobs", CASES, ids=[f"{s}{k or ''}" for s, k in CASES])
def test_same_result_as_k_diffusion(k_sampling, k_randn, float64_default, sid, knobs, name, steps):
    denoiser, shape = DENOISERS[name]
    sig = sigma_schedules.get("karras", steps, schedule=SD, dtype=F64)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(steps), dtype=F64) * sig[0]
    theirs_seen, ours_seen = [], []
    theirs_noise, ours_noise = Stream(x, 7), Stream(x, 7)
    want = _kdiffusion_run(k_sampling, k_randn, sid, denoiser, x.clone(), sig, knobs, theirs_noise, theirs_seen.append)
    noisy = {"noise_sampler": ours_noise} if sid in TAKES_NOISE_SAMPLER | CHURNS else {}
    got = SAMPLERS[sid](denoiser, x.clone(), sig, callback=ours_seen.append, **noisy, **knobs)
    scale = max(1.0, float(want.abs().max()))
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13 * scale)
    # the noise actually used: the same draws (the last draw may be one k-diffusion multiplies by 0)
    if sid in ENDS_ONLY or knobs.get("eta") == 0:
        assert ours_noise.calls <= theirs_noise.calls
    else:
        assert ours_noise.calls == theirs_noise.calls
    assert len(ours_seen) == len(theirs_seen) > 0
    for o, t in zip(ours_seen, theirs_seen):
        torch.testing.assert_close(o["denoised"], t["denoised"], rtol=0, atol=1e-13 * scale)
        if sid != "dpm_adaptive":               # k-diffusion reports an adaptive step after it, we before
            assert o["i"] == t["i"]
            assert math.isclose(o["sigma"], float(t["sigma"]), rel_tol=1e-13)
            assert math.isclose(o["sigma_hat"], float(t["sigma_hat"]), rel_tol=1e-13)
            torch.testing.assert_close(o["x"], t["x"], rtol=0, atol=1e-13 * scale)


def test_churn_window_needs_k_diffusions_stream(k_sampling, k_randn, float64_default):
    """The control: with a churn window, our default noise (drawn only on churning steps, from the same
    generator) is not k-diffusion's stream, and the results differ by order 1."""
    denoiser, shape = DENOISERS["mixture16"]
    sig = sigma_schedules.get("karras", 10, schedule=SD, dtype=F64)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64) * sig[0]
    knobs = {"s_churn": 5.0, "s_tmin": 0.1, "s_tmax": 5.0}
    want = _kdiffusion_run(k_sampling, k_randn, "euler", denoiser, x.clone(), sig, knobs, Stream(x, 7), None)
    default = SAMPLERS["euler"](denoiser, x.clone(), sig, generator=torch.Generator().manual_seed(7), **knobs)
    assert float((default - want).abs().max()) > 0.1
