"""core.consistency: LCM's boundary scalings, the consistency denoiser, the per-row DDIM step of the
teacher, the grid and the pseudo-Huber loss; closed forms, the sampler registry and diffusers."""
from __future__ import annotations

import math

import pytest
import torch

from diffusekit.core import samplers
from diffusekit.core.consistency import (ConsistencyDenoiser, boundary_scalings, ddim_step, pseudo_huber,
                                         timestep_grid)
from diffusekit.core.denoisers import EDMDenoiser, EpsDenoiser, FlowDenoiser, VDenoiser
from diffusekit.core.schedules import DiscreteSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

SCHED = DiscreteSchedule.from_name("scaled_linear", 1000)


class Affine(torch.nn.Module):
    """A network whose output depends on x, t and a context: out = a(t) x + context."""

    def forward(self, x, t, context=None):
        a = torch.cos(t / 300.0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return a * x + (0 if context is None else context)


def test_boundary_scalings_closed_form_and_boundary():
    t = torch.tensor([0.0, 1.0, 41.625, 999.0], dtype=torch.float64)
    c_skip, c_out = boundary_scalings(t)
    st = 10 * t
    torch.testing.assert_close(c_skip, 0.25 / (st ** 2 + 0.25))
    torch.testing.assert_close(c_out, st / (st ** 2 + 0.25).sqrt())
    assert c_skip[0] == 1 and c_out[0] == 0                  # f(x, t=0) = x exactly
    assert c_skip[2] < 2e-6 and abs(float(c_out[2]) - 1) < 1e-6   # beyond a few steps: the x0 estimate


def test_boundary_scalings_match_diffusers_lcm_scheduler():
    from diffusers import LCMScheduler
    sched = LCMScheduler()
    for t in (0, 1, 5, 19, 499, 999):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        ours = boundary_scalings(torch.tensor(float(t), dtype=torch.float64))
        assert math.isclose(float(ours[0]), float(c_skip), rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(float(ours[1]), float(c_out), rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize("wrapper", [EpsDenoiser, VDenoiser])
def test_consistency_denoiser_is_the_composition(wrapper):
    base = wrapper(Affine(), SCHED)
    f = ConsistencyDenoiser(base)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g)
    ctx = torch.randn(4, 3, 5, 5, generator=g)
    sigma = torch.tensor([SCHED.sigma_min, 0.05, 1.3, SCHED.sigma_max])
    t = SCHED.sigma_to_t(sigma)
    b_skip, b_out = boundary_scalings(t)
    want = b_skip.view(-1, 1, 1, 1) * x + b_out.view(-1, 1, 1, 1) * base(x, sigma, context=ctx)
    got = f(x, sigma, context=ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], x[0], rtol=1e-6, atol=1e-5)       # the boundary: t(sigma_min) = 0
    torch.testing.assert_close(got[2:], base(x, sigma, context=ctx)[2:], rtol=1e-5, atol=1e-5)
    assert f.prediction == base.prediction and f.sigma_min == base.sigma_min and f.sigma_max == base.sigma_max


def test_consistency_denoiser_refuses_flow_and_continuous_bases():
    for base in (FlowDenoiser(Affine()), EDMDenoiser(Affine()), VDenoiser(Affine())):
        with pytest.raises(ValueError, match="discrete eps / v denoiser"):
            ConsistencyDenoiser(base)


def test_ddim_step_equals_the_registry_ddim_sampler_row_by_row():
    base = VDenoiser(Affine(), SCHED)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, 6, generator=g) * 3
    ctx = torch.randn(3, 4, 6, 6, generator=g)
    hi = torch.tensor([14.6146, 3.0, 0.4])
    lo = torch.tensor([7.0, 0.5, SCHED.sigma_min])
    got = ddim_step(base(x, hi, context=ctx), x, hi, lo)
    for i in range(3):
        want = samplers.SAMPLERS["ddim"](base, x[i:i + 1], torch.tensor([float(hi[i]), float(lo[i])]),
                                         extra_args={"context": ctx[i:i + 1]})
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)


def test_ddim_step_is_exact_on_the_gaussian_ode_endpoint():
    """Data N(0, s^2): the ideal denoiser is D = x s^2 / (s^2 + sigma^2); the PF-ODE keeps x / sqrt(s^2 +
    sigma^2) fixed. DDIM's step ratio sigma'/sigma is exact only as sigma' -> 0 where both give D."""
    s = 0.7
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(2)) * 5
    sigma = torch.tensor([5.0, 5.0])
    d = x * s * s / (s * s + 25.0)
    torch.testing.assert_close(ddim_step(d, x, sigma, torch.zeros(2)), d)
    # a short step agrees with the exact ODE to first order in the step
    exact = x * math.sqrt(s * s + 4.99 ** 2) / math.sqrt(s * s + 25.0)
    step = ddim_step(d, x, sigma, torch.full((2,), 4.99))
    assert float((step - exact).abs().max()) < 1e-4 * float(x.abs().max())


def test_timestep_grid_hits_sgm_uniform_points():
    grid = timestep_grid(1000, 12)
    assert grid[0] == 0 and grid[-1] == 999 and len(grid) == 13
    for k in (1, 2, 3, 4, 6):   # SGM Uniform at k steps: t = 999 (1 - j / k)
        for j in range(k):
            assert torch.isclose(grid, torch.tensor(999 * (1 - j / k), dtype=torch.float64)).any()
    with pytest.raises(ValueError, match="intervals=0"):
        timestep_grid(1000, 0)


def test_pseudo_huber_limits():
    a = torch.zeros(1000)
    small, big = torch.full((1000,), 1e-5), torch.full((1000,), 3.0)
    c = 1e-3
    assert math.isclose(float(pseudo_huber(small, a, c)), 1e-10 / (2 * c), rel_tol=1e-3)   # ~ d^2 / 2c
    assert math.isclose(float(pseudo_huber(big, a, c)), 3.0 - c, rel_tol=1e-5)              # ~ |d| - c
    assert float(pseudo_huber(a, a, c)) == 0
    with pytest.raises(ValueError, match="c=0"):
        pseudo_huber(a, a, 0)
