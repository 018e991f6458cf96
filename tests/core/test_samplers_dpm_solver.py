"""DPM fast / DPM adaptive (core/samplers/dpm_solver.py) on the exact Gaussian-mixture world, float64.

World, starts and reference as in test_samplers_deterministic.py: GaussianMixture.example() (2-D), 64
starts x = randn * 80, the probability-flow ODE solved by RK4 from sigma 80 to 0.002 (error ~3e-10).
Both samplers integrate from sigmas[0] to the smallest positive sigma, so the reference ends there.

- dpm_fast: order 3 in the number of steps M = NFE // 3 + 1 (measured 2.9 over M = 64..256); it spends
  exactly len(sigmas) - 1 model evaluations and reads only the schedule's ends.
- dpm_adaptive: the error follows the tolerance (measured error / rtol 0.3-0.5 at order 3, 0.9-2.2 at
  order 2 for rtol 2e-3..1e-4 with atol = rtol / 6) and the work grows like rtol^(-1/order) (measured
  log-slopes 0.26 and 0.48), order 3 being the cheaper at tight tolerances.
- eta > 0 (A1111's default for both): samples follow the mixture; doubled noise fails the same check.
"""
import math

import pytest
import torch

from diffusekit.core import noise
from diffusekit.core.mixture import GaussianMixture, reference_solution
from diffusekit.core.samplers import INFO, SAMPLERS, resolve

from test_samplers_stochastic import draw, mixture_failures   # the stochastic samplers' distribution check

F64 = torch.float64
WORLD = GaussianMixture.example()

pytestmark = pytest.mark.usefixtures("one_thread")


def _ends(sigma_max=80.0, sigma_min=0.002, n=3):
    """A schedule whose interior does not matter to these samplers: n + 1 sigmas, ends as given, then 0."""
    inner = torch.linspace(sigma_max, sigma_min, n, dtype=F64)
    return torch.cat([inner, torch.zeros(1, dtype=F64)])


def _rms(a, b) -> float:
    return float((a - b).norm(dim=1).pow(2).mean().sqrt())


def _slope(xs, ys) -> float:
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


class Counted:
    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.denoiser(x, sigma, **kw)


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 80.0
    return x, reference_solution(WORLD, x, 80.0, sigma_end=0.002, steps=1000)


def test_dpm_fast_is_third_order(world):
    x, ref = world
    ms = [64, 128, 256]
    errors = [_rms(SAMPLERS["dpm_fast"](WORLD, x, _ends(n=3 * (m - 1) + 2)), ref) for m in ms]
    assert 2.6 < -_slope(ms, errors) < 3.3, errors


@pytest.mark.parametrize("nfe", range(2, 11))
def test_dpm_fast_spends_its_budget_and_reads_only_the_ends(world, nfe):
    x, _ = world
    model = Counted(WORLD)
    seen = []
    out = SAMPLERS["dpm_fast"](model, x[:4], _ends(n=nfe), callback=seen.append)
    assert model.calls == nfe
    assert [c["i"] for c in seen] == list(range(nfe // 3 + 1))        # one callback per step
    assert seen[0]["sigma"] == pytest.approx(80.0) and seen[-1]["sigma"] > 0.002
    other = _ends(n=nfe)
    other[1:nfe - 1] = 0.002 + (80.0 - 0.002) * torch.linspace(1, 0, nfe, dtype=F64)[1:-1] ** 3   # same ends
    torch.testing.assert_close(SAMPLERS["dpm_fast"](WORLD, x[:4], other), out, rtol=0, atol=1e-12)


def test_dpm_fast_single_evaluation_needs_a_positive_end(world):
    """NFE = 1 is one DPM-Solver-1 (DDIM) step: on [80, 0] there is no positive end to step to (x comes
    back unchanged, as from k-diffusion with sigma_min = sigma_max); on [80, 0.002] it is that step."""
    x, _ = world
    model = Counted(WORLD)
    out = SAMPLERS["dpm_fast"](model, x[:4], torch.tensor([80.0, 0.002], dtype=F64))
    assert model.calls == 1
    torch.testing.assert_close(out, SAMPLERS["ddim"](WORLD, x[:4], torch.tensor([80.0, 0.002], dtype=F64)),
                               rtol=0, atol=1e-12)


def test_dpm_adaptive_error_follows_the_tolerance(world):
    x, ref = world
    rtols = [2e-3, 5e-4, 1e-4]
    work = {}
    for order, ratio in [(3, 0.7), (2, 3.0)]:
        nfe = []
        for rtol in rtols:
            model, seen = Counted(WORLD), []
            out = SAMPLERS["dpm_adaptive"](model, x, _ends(), rtol=rtol, atol=rtol / 6, order=order,
                                           callback=seen.append)
            assert _rms(out, ref) < ratio * rtol, (order, rtol, _rms(out, ref))
            assert model.calls == order * len(seen)                     # `order` evaluations per attempt
            nfe.append(model.calls)
        work[order] = nfe
        slope = _slope([1 / r for r in rtols], nfe)                     # NFE ~ rtol^(-1/order)
        assert 0.7 / order < slope < 1.3 / order, (order, nfe)
    assert work[3][-1] < work[2][-1] / 2


def test_dpm_adaptive_tighter_tolerance_is_more_accurate(world):
    x, ref = world
    errors = [_rms(SAMPLERS["dpm_adaptive"](WORLD, x, _ends(), rtol=r, atol=r / 6), ref) for r in (0.05, 0.01, 0.002)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("sid,steps", [("dpm_fast", 30), ("dpm_adaptive", 10)])
def test_ancestral_variant_samples_the_mixture(sid, steps):
    assert mixture_failures(draw(sid, steps, eta=1.0)) == []
    assert any("spread" in f for f in mixture_failures(draw(sid, steps, eta=1.0, s_noise=2.0)))


@pytest.mark.parametrize("sid", ["dpm_fast", "dpm_adaptive"])
def test_noise_from_the_generator_only_with_eta(sid):
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * 80
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    SAMPLERS[sid](WORLD, x, _ends(n=9), generator=g)                    # eta = 0: the ODE, no draw
    assert torch.equal(g.get_state(), state)
    a = SAMPLERS[sid](WORLD, x, _ends(n=9), eta=1.0, generator=torch.Generator().manual_seed(1))
    b = SAMPLERS[sid](WORLD, x, _ends(n=9), eta=1.0, generator=torch.Generator().manual_seed(1))
    c = SAMPLERS[sid](WORLD, x, _ends(n=9), eta=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    if sid == "dpm_fast":   # fixed steps: one generator per image makes a batch equal its single runs
        gens = noise.generators_for_seeds([10, 11, 12, 13])
        batch = SAMPLERS[sid](WORLD, x, _ends(n=9), eta=1.0, generator=gens)
        single = SAMPLERS[sid](WORLD, x[2:3], _ends(n=9), eta=1.0, generator=noise.generators_for_seeds([12]))
        assert torch.equal(batch[2:3], single)


def test_registry_names_and_knob_errors():
    assert resolve("DPM fast") == "dpm_fast" and resolve("DPM adaptive") == "dpm_adaptive"
    assert INFO["dpm_fast"].default_schedule == INFO["dpm_adaptive"].default_schedule == "uniform"
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        SAMPLERS["dpm_adaptive"](WORLD, x, _ends(), order=1)
    with pytest.raises(ValueError, match="rtol"):
        SAMPLERS["dpm_adaptive"](WORLD, x, _ends(), rtol=0)
    with pytest.raises(ValueError, match="eta"):
        SAMPLERS["dpm_fast"](WORLD, x, _ends(), eta=-1)
    with pytest.raises(ValueError, match="NaN"):
        SAMPLERS["dpm_adaptive"](lambda x, s: x * float("nan"), x + 1, _ends())
    # a schedule with one positive sigma: nothing to integrate
    assert torch.equal(SAMPLERS["dpm_fast"](WORLD, x + 1, torch.tensor([2.0, 0.0], dtype=F64)), x + 1)
    assert torch.equal(SAMPLERS["dpm_adaptive"](WORLD, x + 1, torch.tensor([2.0, 0.0], dtype=F64)), x + 1)
