"""Deterministic samplers: convergence order on the exact world, parity with diffusers, the contract.

1. Order. World: GaussianMixture.example() (dim 2), 64 starts x = randn * 80, Karras schedule (rho 7)
   0.002 .. 80 in float64; error = RMS over the batch of |x_sampler - x_ref| with x_ref from
   `reference_solution` (RK4, 1000 steps: error ~3e-9). The slope of -log(error) over log(steps) is fit
   by least squares over a range where the error is well above two floors: the reference error, and
   the step into sigma = 0, which every k-diffusion sampler takes as x = D(x, sigma_min) (an O(sigma_min^2)
   error, ~8e-6 RMS here, independent of the step count). UniPC's error falls below that floor within
   ~100 steps, so UniPC is measured on the schedule that stops at sigma_min (the same run minus its last
   step), against the reference to sigma_min.
2. Parity. An eps network `eps_net(x_in, t)` (the exact mixture's eps at sigma = t_to_sigma(t) on SD's
   scaled_linear table) goes through our `EpsDenoiser` and through diffusers' scheduler loops on the
   same sigmas. diffusers is driven with the model called at the noise level the scheduler is at
   (t = sigma_to_t(sigma), unrounded), so the comparison is of the sampler arithmetic alone.
3. Contract: dtype, callback, partial schedules, the registry's input errors.
"""
import math

import pytest
import torch

from diffusekit.core import noise
from diffusekit.core import sigmas as sigma_schedules
from diffusekit.core.denoisers import EpsDenoiser, FlowDenoiser, flow_sigmas
from diffusekit.core.mixture import GaussianMixture, reference_solution
from diffusekit.core.samplers import SAMPLERS, deterministic
from diffusekit.core.schedules import DiscreteSchedule

F64 = torch.float64
IDS = list(deterministic.SAMPLERS)


pytestmark = pytest.mark.usefixtures("one_thread")


def _karras(steps, sigma_min=0.002, sigma_max=80.0):
    return sigma_schedules.get("karras", steps, sigma_min=sigma_min, sigma_max=sigma_max, dtype=F64)


def _slope(steps, errors) -> float:
    """Least-squares slope of -log(error) against log(steps): the measured order of convergence."""
    xs = [math.log(n) for n in steps]
    ys = [-math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def _rms(a, b) -> float:
    return float((a - b).norm(dim=1).pow(2).mean().sqrt())


# --- 1. convergence order on the exact world -------------------------------------------------------------

@pytest.fixture(scope="module")
def world_runs():
    torch.set_num_threads(1)
    world = GaussianMixture.example()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 80.0
    return {"world": world, "x": x,
            0.0: reference_solution(world, x, 80.0, steps=1000),
            0.002: reference_solution(world, x, 80.0, sigma_end=0.002, steps=1000)}


# (sampler, knobs, step counts, end of the schedule, accepted slope range). Measured slopes (RMS):
# euler/ddim 1.05, heun 2.05, dpm_2 2.03, dpmpp_2m 1.99, lms 3.4, uni_pc(3) 3.9, uni_pc(2) 3.07,
# uni_pc(1) 1.97 (UniC raises UniP-p to order p + 1).
ORDER_CASES = [
    ("euler", {}, [256, 512, 1024], 0.0, (0.85, 1.25)),
    ("ddim", {}, [256, 512, 1024], 0.0, (0.85, 1.25)),
    ("heun", {}, [32, 64, 128, 256], 0.0, (1.8, 2.3)),
    ("dpm_2", {}, [32, 64, 128, 256], 0.0, (1.8, 2.3)),
    ("dpmpp_2m", {}, [64, 128, 256, 512], 0.0, (1.8, 2.3)),
    ("lms", {}, [32, 64, 128, 256], 0.0, (3.0, 4.5)),
    ("uni_pc", {}, [32, 64, 128, 256, 512], 0.002, (3.4, 5.0)),
    ("uni_pc_bh2", {}, [32, 64, 128, 256, 512], 0.002, (3.4, 5.0)),
    ("uni_pc", {"order": 2}, [32, 64, 128, 256, 512], 0.002, (2.7, 3.4)),
    ("uni_pc", {"order": 1}, [32, 64, 128, 256, 512], 0.002, (1.8, 2.3)),
]


@pytest.mark.parametrize("sid,knobs,steps,end,bounds", ORDER_CASES,
                         ids=[f"{c[0]}{c[1] or ''}" for c in ORDER_CASES])
def test_convergence_order_on_exact_world(world_runs, sid, knobs, steps, end, bounds):
    world, x, ref = world_runs["world"], world_runs["x"], world_runs[end]
    errors = []
    for n in steps:
        s = _karras(n)
        if end > 0:
            s = s[:-1]                                   # stop at sigma_min, skip the step into 0
        errors.append(_rms(SAMPLERS[sid](world, x.clone(), s, **knobs), ref))
    slope = _slope(steps, errors)
    assert bounds[0] < slope < bounds[1], f"{sid} {knobs}: errors {errors} give order {slope:.2f}"


def test_euler_flow_is_first_order_on_the_flow_world():
    """Rectified flow x_t = (1 - t) x0 + t eps over the same mixture: x_t / (1 - t) is the VE latent at
    sigma = t / (1 - t), so the exact flow solution is `reference_solution` from sigma = t0 / (1 - t0)."""
    world, t0 = GaussianMixture.example(), 0.99
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * t0

    def velocity(xt, t):                                  # the ideal v = (x - E[x0 | x_t]) / t; t = 1000 s
        s = (t / 1000).to(xt.dtype)[:, None]
        return (xt - world.denoise(xt / (1 - s), (s / (1 - s))[:, 0])) / s

    ref = reference_solution(world, x / (1 - t0), t0 / (1 - t0), steps=1000)
    steps = [128, 256, 512, 1024]
    errors = [_rms(SAMPLERS["euler_flow"](FlowDenoiser(velocity), x.clone(),
                                          flow_sigmas(n, shift=3.0, dtype=F64) * t0), ref) for n in steps]
    assert 0.85 < _slope(steps, errors) < 1.25, errors


def test_ddim_eta0_equals_euler():
    world = GaussianMixture.example()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 80
    s = _karras(12)
    torch.testing.assert_close(SAMPLERS["ddim"](world, x, s), SAMPLERS["euler"](world, x, s), rtol=0, atol=1e-12)


def test_lms_coefficients_integrate_the_lagrange_basis_exactly():
    """k-diffusion/diffusers integrate the basis with scipy.quad; ours is closed form: compare."""
    from scipy import integrate

    nodes = [3.7, 5.0, 8.2, 14.6]                          # sigma_i, sigma_{i-1}, ... (descending in time)
    start, end = 3.7, 2.1
    for j in range(4):
        def basis(tau, j=j):
            return math.prod((tau - nodes[k]) / (nodes[j] - nodes[k]) for k in range(4) if k != j)
        want = integrate.quad(basis, start, end, epsrel=1e-13)[0]
        assert math.isclose(deterministic._lms_coefficient(nodes, j, start, end), want, rel_tol=1e-11)
    # the coefficients reproduce the integral of any cubic exactly
    cubic = lambda t: 0.3 * t ** 3 - t ** 2 + 2 * t - 5     # noqa: E731
    got = sum(deterministic._lms_coefficient(nodes, j, start, end) * cubic(nodes[j]) for j in range(4))
    assert math.isclose(got, integrate.quad(cubic, start, end)[0], rel_tol=1e-11)


# --- 2. parity with diffusers ----------------------------------------------------------------------------

SD = DiscreteSchedule.from_name("scaled_linear")
WORLD = GaussianMixture.example()
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _eps_net(x_in, t):
    """An 'eps network' on SD's table: the exact mixture eps at sigma = t_to_sigma(t); x_in = x / sqrt(1 + s^2)."""
    sigma = SD.t_to_sigma(t).to(x_in.dtype)[:, None]
    x = x_in * (sigma ** 2 + 1).sqrt()
    return (x - WORLD.denoise(x, sigma[:, 0])) / sigma


def _diffusers_loop(sched, x_ve, vp: bool):
    """diffusers' own loop (scale_model_input, model, step) with the model at the scheduler's sigma."""
    from diffusers import KDPM2DiscreteScheduler

    sample = x_ve / (1 + sched.sigmas[0] ** 2).sqrt() if vp else x_ve.clone()
    for t in sched.timesteps:
        x_in = sched.scale_model_input(sample, t)
        i = sched.step_index or 0
        sigma = sched.sigmas[i]
        if isinstance(sched, KDPM2DiscreteScheduler) and not sched.state_in_first_order:
            sigma = sched.sigmas_interpol[i]
        eps = _eps_net(x_in, SD.sigma_to_t(sigma.expand(x_in.shape[0])))
        sample = sched.step(eps, t, sample).prev_sample
    return sample


_ZERO = dict(final_sigmas_type="zero")
# (case, diffusers scheduler, its options, our id, our knobs, tolerance). Tolerances: 1e-12 where diffusers
# computes in float64; 1e-4 (values up to ~8) where it rounds the sample to float32 every step (Euler's and
# DPM-Solver++'s "upcast" to float32); 1e-5 for KDPM2, whose midpoint sigmas are computed in float32.
PARITY_CASES = [
    ("euler", "EulerDiscreteScheduler", {}, "euler", {}, 1e-4),
    ("heun", "HeunDiscreteScheduler", {}, "heun", {}, 1e-12),
    ("dpm_2", "KDPM2DiscreteScheduler", {}, "dpm_2", {}, 1e-5),
    ("lms", "LMSDiscreteScheduler", {}, "lms", {}, 1e-12),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2, **_ZERO),
     "dpmpp_2m", {}, 1e-4),
    ("uni_pc_bh2", "UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2", **_ZERO),
     "uni_pc_bh2", {}, 1e-12),
    ("uni_pc_bh2_order2", "UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh2", **_ZERO),
     "uni_pc_bh2", {"order": 2}, 1e-12),
    # diffusers' bh1 step into sigma = 0 computes B(h) * 0 with B(h) = -h = -inf, a NaN: stop at sigma_min.
    ("uni_pc_bh1_sigma_min", "UniPCMultistepScheduler",
     dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"), "uni_pc", {}, 1e-12),
]


@pytest.mark.parametrize("case", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
@pytest.mark.parametrize("karras", [False, True], ids=["default", "karras"])
@pytest.mark.parametrize("steps", [10, 20])
def test_parity_with_diffusers(case, karras, steps):
    import diffusers

    name, cls_name, opts, sid, knobs, tol = case
    if name == "uni_pc_bh1_sigma_min" and karras:
        pytest.skip("with Karras sigmas, final_sigmas_type='sigma_min' repeats the last sigma (a zero step)")
    sched = getattr(diffusers, cls_name)(**SD_BETAS, use_karras_sigmas=karras, **opts)
    if name == "euler" and karras:
        ours = sigma_schedules.get("karras", steps, schedule=SD, dtype=F64)   # our sigmas, handed to diffusers
        sched.set_timesteps(sigmas=ours.tolist())
    else:
        sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.to(F64)                  # fp64 wherever diffusers keeps the sigma
    if hasattr(sched, "sigmas_interpol"):
        sched.sigmas_interpol = sched.sigmas_interpol.to(F64)
    # the distinct sigmas (Heun and KDPM2 store each one twice) are the schedule we run
    sigmas = torch.unique_consecutive(sched.sigmas)
    assert len(sigmas) == steps + 1
    if karras:   # and they are our Karras schedule over diffusers' range (its table is float32: ~1e-5 off ours)
        ours = sigma_schedules.get("karras", steps, sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]), dtype=F64)
        torch.testing.assert_close(sigmas, ours, rtol=1e-6, atol=0)
    x_ve = torch.randn(16, 2, generator=torch.Generator().manual_seed(steps), dtype=F64) * sigmas[0]
    vp = name.startswith(("dpmpp", "uni_pc"))
    want = _diffusers_loop(sched, x_ve, vp)
    got = SAMPLERS[sid](EpsDenoiser(_eps_net, SD), x_ve, sigmas, **knobs)
    if vp:
        got = got / (1 + sigmas[-1] ** 2).sqrt()          # diffusers' sample is x / sqrt(1 + sigma^2)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_parity_with_diffusers(set_alpha_to_one, eta):
    """SD's DDIM config (leading spacing, steps_offset 1). The sigmas are those of diffusers' integer
    timesteps, then the final alpha_bar: 1 (sigma 0) or alpha_bar[0] (sigma 0.0292, a nonzero end). With
    eta > 0 diffusers gets, as variance_noise, the noise our ddim draws from the same seed."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    sched.set_timesteps(15)
    sched.alphas_cumprod = SD.alphas_cumprod.clone()      # the same float64 table on both sides
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=F64) if set_alpha_to_one else SD.alphas_cumprod[0]
    abar = torch.stack([SD.alphas_cumprod[int(t)] for t in sched.timesteps] + [sched.final_alpha_cumprod])
    sigmas = ((1 - abar) / abar).sqrt()
    x_ve = torch.randn(16, 2, generator=torch.Generator().manual_seed(7), dtype=F64) * sigmas[0]
    twin = torch.Generator().manual_seed(11)
    sample = x_ve * abar[0].sqrt()
    for t in sched.timesteps:
        eps = _eps_net(sample, t.to(F64).expand(16))
        z = noise.randn(sample.shape, twin, dtype=F64) if eta > 0 else None
        sample = sched.step(eps, t, sample, eta=eta, variance_noise=z).prev_sample
    got = SAMPLERS["ddim"](EpsDenoiser(_eps_net, SD), x_ve, sigmas, eta=eta,
                           generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(got * abar[-1].sqrt(), sample, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_flow_parity_with_flow_match_euler(shift):
    """FlowMatchEulerDiscreteScheduler(shift) on custom sigmas; it rounds the sample to float32 each
    step ("upcast"), hence 1e-5. The model is a velocity network v(x, t = 1000 sigma) via FlowDenoiser."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    def velocity(x, t):
        return x * torch.cos(t / 300)[:, None] - 0.5 * torch.sin(x) + t[:, None] / 1000

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.0, 21)[:-1].tolist())
    sigmas = sched.sigmas.to(F64)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    sample = x.clone()
    for i, t in enumerate(sched.timesteps):
        sample = sched.step(velocity(sample, (sigmas[i] * 1000).expand(16)), t, sample).prev_sample
    got = SAMPLERS["euler_flow"](FlowDenoiser(velocity), x, sigmas)
    torch.testing.assert_close(got, sample, rtol=0, atol=1e-5)
    # the same ODE as plain Euler on these sigmas (k-diffusion's step with a flow denoiser)
    torch.testing.assert_close(got, SAMPLERS["euler"](FlowDenoiser(velocity), x, sigmas), rtol=0, atol=1e-14)


# --- 3. the contract -------------------------------------------------------------------------------------

def _flow_safe_sigmas(sid, steps=8):
    return flow_sigmas(steps, 3.0, dtype=F64) if sid == "euler_flow" else _karras(steps, 0.01, 20.0)


@pytest.mark.parametrize("sid", IDS)
def test_keeps_dtype_and_calls_back_once_per_step(sid):
    world = GaussianMixture.example()
    s = _flow_safe_sigmas(sid)
    x64 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * s[0]
    seen = []
    out64 = SAMPLERS[sid](world, x64, s, callback=seen.append)
    assert out64.dtype == F64 and out64.device == x64.device
    assert [c["i"] for c in seen] == list(range(8))
    assert [c["sigma"] for c in seen] == s[:-1].tolist()
    assert all(c["sigma_hat"] == c["sigma"] for c in seen)            # no churn by default
    assert all(c["denoised"].shape == x64.shape for c in seen)
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 0.15)]:
        out = SAMPLERS[sid](world, x64.to(dtype), s)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.to(F64), out64, rtol=0, atol=tol * max(1.0, float(out64.abs().max())))


@pytest.mark.parametrize("sid", IDS)
def test_partial_schedules_hand_over(sid):
    """Steps 0..k, then k..n on the same schedule (SDXL refiner, KSamplerAdvanced). Single-step samplers
    give exactly the full run; multistep ones restart their history at k (a first-order step), so they
    only agree closely."""
    world = GaussianMixture.example()
    s = _flow_safe_sigmas(sid, 30)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(5), dtype=F64) * s[0]
    full = SAMPLERS[sid](world, x, s)
    head = SAMPLERS[sid](world, x, sigma_schedules.slice_steps(s, 0, 10))
    assert torch.isfinite(head).all() and not torch.equal(head, full)
    split = SAMPLERS[sid](world, head, sigma_schedules.slice_steps(s, 10))
    if sid in ("euler", "heun", "dpm_2", "ddim", "euler_flow"):
        assert torch.equal(split, full)
    else:   # measured 1-3e-3 of the scale at 30 steps
        torch.testing.assert_close(split, full, rtol=0, atol=0.01 * float(full.abs().max()))
    # handing over to a different sampler works the same way
    mixed = SAMPLERS["heun"](world, head, sigma_schedules.slice_steps(s, 10))
    assert torch.isfinite(mixed).all()


@pytest.mark.parametrize("sid", IDS)
def test_registry_rejects_bad_inputs(sid):
    world = GaussianMixture.example()
    s = _flow_safe_sigmas(sid)
    x = torch.randn(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="NaN"):
        SAMPLERS[sid](world, torch.full((2, 2), float("nan"), dtype=F64), s)
    with pytest.raises(ValueError, match="descending"):
        SAMPLERS[sid](world, x, s.flip(0))
    with pytest.raises(TypeError, match="unknown option"):
        SAMPLERS[sid](world, x, s, not_a_knob=1)


def test_churn_follows_algorithm_2_and_the_generator():
    world = GaussianMixture.example()
    s = _karras(10, 0.01, 20.0)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 20
    for sid in ("euler", "heun", "dpm_2"):
        seen = []
        knobs = dict(s_churn=5.0, s_tmin=0.05, s_tmax=10.0)
        a = SAMPLERS[sid](world, x, s, generator=torch.Generator().manual_seed(1), callback=seen.append, **knobs)
        b = SAMPLERS[sid](world, x, s, generator=torch.Generator().manual_seed(1), **knobs)
        c = SAMPLERS[sid](world, x, s, generator=torch.Generator().manual_seed(2), **knobs)
        assert torch.equal(a, b) and not torch.equal(a, c)
        gamma = min(5.0 / 10, 2 ** 0.5 - 1)
        for info in seen:   # sigma_hat = sigma (1 + gamma) inside [s_tmin, s_tmax], sigma outside
            inside = 0.05 <= info["sigma"] <= 10.0
            assert info["sigma_hat"] == pytest.approx(info["sigma"] * (1 + gamma) if inside else info["sigma"])
        # without churn the generator is never touched
        g = torch.Generator().manual_seed(3)
        state = g.get_state()
        SAMPLERS[sid](world, x, s, generator=g)
        assert torch.equal(g.get_state(), state)


def test_ddim_eta_noise_comes_from_the_generator():
    world = GaussianMixture.example()
    s = _karras(10, 0.01, 20.0)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 20
    a = SAMPLERS["ddim"](world, x, s, eta=1.0, generator=torch.Generator().manual_seed(1))
    b = SAMPLERS["ddim"](world, x, s, eta=1.0, generator=torch.Generator().manual_seed(1))
    c = SAMPLERS["ddim"](world, x, s, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one generator per image: each image's result does not depend on the batch it is in
    gens = noise.generators_for_seeds([10, 11, 12, 13])
    batch = SAMPLERS["ddim"](world, x, s, eta=1.0, generator=gens)
    single = SAMPLERS["ddim"](world, x[2:3], s, eta=1.0, generator=[torch.Generator().manual_seed(12)])
    torch.testing.assert_close(batch[2:3], single, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="eta"):
        SAMPLERS["ddim"](world, x, s, eta=-0.5)


def test_knob_validation_teaches():
    world = GaussianMixture.example()
    s = _karras(4, 0.01, 20.0)
    x = torch.zeros(1, 2, dtype=F64)
    with pytest.raises(ValueError, match="order"):
        SAMPLERS["lms"](world, x, s, order=0)
    with pytest.raises(ValueError, match="order"):
        SAMPLERS["uni_pc"](world, x, s, order=0)
