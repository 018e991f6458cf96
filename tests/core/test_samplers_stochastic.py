"""Stochastic samplers on the exact Gaussian-mixture world (float64) and against diffusers.

- distribution: 2000 samples reproduce the mixture's weights, means and spreads; noise x2 fails it
- batch invariance: a batch with one generator per image equals single runs, bit for bit
- Brownian tree: an SDE sampler's sample barely moves between 50 and 100 steps (fresh noise does)
- closed-form identities (ddpm = Euler a, eta = 0 gives the ODE samplers) and diffusers parity
- registry checks: dtype, callback, NaN latent, ascending sigmas, unknown knob
"""
import math

import pytest
import torch

from diffusekit.core import noise, samplers, sigmas
from diffusekit.core.brownian import BrownianTreeNoiseSampler
from diffusekit.core.denoisers import EpsDenoiser
from diffusekit.core.mixture import GaussianMixture, reference_solution
from diffusekit.core.samplers import stochastic
from diffusekit.core.schedules import DiscreteSchedule

WORLD = GaussianMixture.example()            # 3 components in 2-D, weights 0.5 / 0.3 / 0.2
STOCHASTIC = list(stochastic.SAMPLERS)
SDE = ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: extra intra-op threads only add synchronisation (10x slower on a busy
    2-core machine). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def schedule(steps, name="karras", sigma_min=0.03, sigma_max=80.0):
    return sigmas.get(name, steps, sigma_min=sigma_min, sigma_max=sigma_max, dtype=torch.float64)


def start(n, sig, seed=1, dtype=torch.float64):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype) * sig[0]


def consistency_function(x, sigma):
    """The exact consistency function of the world: the probability-flow ODE solved from sigma to 0.
    An LCM's denoiser is a (learned) consistency function, not the posterior mean."""
    return reference_solution(WORLD, x, float(sigma[0]), 0.0, steps=50)   # RK4 error < 4e-4 from sigma 80


# --- distribution ---------------------------------------------------------------------------------

N = 2000
# moderate step counts: first-order Euler a / DDPM need more steps for their bias to fall below the
# sampling error; the SDE multistep samplers run on their A1111 default (exponential) schedule.
DIST_CASES = {
    "euler_ancestral": dict(steps=100),
    "ddpm": dict(steps=100),
    "dpm_2_ancestral": dict(steps=30),
    "dpmpp_2s_ancestral": dict(steps=30),
    "dpmpp_sde": dict(steps=30),
    "dpmpp_2m_sde": dict(steps=30, name="exponential"),
    "dpmpp_3m_sde": dict(steps=30, name="exponential"),
    "restart": dict(steps=30),
    "lcm": dict(steps=3, denoiser=consistency_function),   # exact at any step count
}


def mixture_statistics(samples):
    """Per component k: z-score of its sampled weight, max over dims of the mean error in standard
    errors, and the sampled spread (RMS distance to mu_k per dim) over the true std."""
    comp = WORLD.component_of(samples)
    w = WORLD.weights
    frac = torch.bincount(comp, minlength=3).double() / len(samples)
    weight_z = (frac - w) / (w * (1 - w) / len(samples)).sqrt()
    mean_se, spread = [], []
    for k in range(3):
        xs = samples[comp == k]
        se = WORLD.stds[k] / math.sqrt(len(xs))
        mean_se.append(float(((xs.mean(0) - WORLD.means[k]).abs() / se).max()))
        spread.append(float((xs - WORLD.means[k]).pow(2).mean().sqrt() / WORLD.stds[k]))
    return weight_z.tolist(), mean_se, spread


def mixture_failures(samples):
    """What is wrong with the samples (empty if they pass): weights within 4 standard errors, means
    within 4 standard errors, spreads within 12% (the discretisation bias of the step counts above
    is below 6%)."""
    weight_z, mean_se, spread = mixture_statistics(samples)
    bad = []
    for k in range(3):
        if abs(weight_z[k]) > 4:
            bad.append(f"weight {k}: z = {weight_z[k]:.2f}")
        if mean_se[k] > 4:
            bad.append(f"mean {k}: {mean_se[k]:.2f} standard errors off")
        if not 0.88 < spread[k] < 1.12:
            bad.append(f"spread {k}: {spread[k]:.3f} of the true std")
    return bad


def draw(sid, steps, name="karras", denoiser=WORLD, **knobs):
    sig = schedule(steps, name)
    return samplers.SAMPLERS[sid](denoiser, start(N, sig), sig, generator=torch.Generator().manual_seed(2),
                                  **knobs)


@pytest.mark.parametrize("sid", STOCHASTIC)
def test_samples_follow_the_mixture(sid):
    out = draw(sid, **DIST_CASES[sid])
    assert out.dtype == torch.float64
    assert mixture_failures(out) == []


@pytest.mark.parametrize("sid,case", [("euler_ancestral", DIST_CASES["euler_ancestral"]),
                                      ("dpmpp_2m_sde", DIST_CASES["dpmpp_2m_sde"])])
def test_doubled_noise_fails_the_same_check(sid, case):
    """The distribution check can fail: s_noise = 2 (noise scaled x2) is caught."""
    out = draw(sid, **case, s_noise=2.0)
    assert any("spread" in f for f in mixture_failures(out))


def test_lcm_with_a_posterior_mean_denoiser_fails_the_check():
    """LCM is exact only for a consistency function: re-noising E[x0 | x] loses variance at every step."""
    assert any("spread" in f for f in mixture_failures(draw("lcm", steps=3)))


# --- batch invariance and step-count stability -----------------------------------------------------

@pytest.mark.parametrize("sid", STOCHASTIC)
def test_batch_equals_single_runs(sid):
    sig = schedule(20)   # 20 steps: restart's default plan adds a restart segment from 20 steps on
    x = start(4, sig, seed=3)
    seeds = [10, 11, 12, 13]
    fn = samplers.SAMPLERS[sid]
    batch = fn(WORLD, x, sig, generator=noise.generators_for_seeds(seeds))
    for i, s in enumerate(seeds):
        single = fn(WORLD, x[i:i + 1], sig, generator=noise.generators_for_seeds([s]))
        assert torch.equal(batch[i:i + 1], single)


def _step_count_ratio(sid, n=32):
    """mean |x(50 steps) - x(100 steps)| for one seed, over mean |x(seed a) - x(seed b)| at 50 steps."""
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = {}
    for steps, base in [(50, 1000), (100, 1000), (50, 2000)]:
        sig = schedule(steps)
        out[steps, base] = samplers.SAMPLERS[sid](WORLD, x * sig[0], sig,
                                                  generator=noise.generators_for_seeds(range(base, base + n)))
    same_seed = (out[50, 1000] - out[100, 1000]).norm(dim=1).mean()
    other_seed = (out[50, 1000] - out[50, 2000]).norm(dim=1).mean()
    return float(same_seed / other_seed)


@pytest.mark.parametrize("sid", SDE)
def test_sde_sample_is_stable_under_step_count(sid):
    """The Brownian-tree property: measured ratios 0.025-0.032; fresh per-step noise gives 0.58."""
    assert _step_count_ratio(sid) < 0.1


def test_fresh_noise_is_not_stable_under_step_count():
    """The control that shows the test above can fail: Euler a draws fresh noise per step."""
    assert _step_count_ratio("euler_ancestral") > 0.3


def test_sde_noise_comes_from_a_brownian_tree_seeded_by_the_generators():
    sig = schedule(10)
    x = start(3, sig)
    gens = noise.generators_for_seeds([1, 2, 3])
    tree = BrownianTreeNoiseSampler(x, float(sig[-2]), float(sig[0]), noise.seeds_from_generators(gens, 3))
    explicit = samplers.SAMPLERS["dpmpp_2m_sde"](WORLD, x, sig, noise_sampler=tree)
    wired = samplers.SAMPLERS["dpmpp_2m_sde"](WORLD, x, sig, generator=noise.generators_for_seeds([1, 2, 3]))
    assert torch.equal(explicit, wired)


# --- closed-form identities -------------------------------------------------------------------------

def test_ddpm_posterior_step_equals_euler_ancestral():
    """DDPM's posterior between sigma and s has VE mean (s/sigma)^2 x + (1 - (s/sigma)^2) D and variance
    s^2 (sigma^2 - s^2) / sigma^2: the Euler-ancestral step (eta = 1) — computed two different ways."""
    sig = schedule(15)
    x = start(64, sig)
    a = samplers.SAMPLERS["ddpm"](WORLD, x, sig, generator=torch.Generator().manual_seed(4))
    b = samplers.SAMPLERS["euler_ancestral"](WORLD, x, sig, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("stochastic_id,knobs,ode_id", [
    ("euler_ancestral", dict(eta=0.0), "euler"),
    ("dpmpp_2m_sde", dict(eta=0.0), "dpmpp_2m"),
    ("dpmpp_sde", dict(eta=0.0), None),          # compared with dpmpp_2s_ancestral(eta=0), both DPM-Solver++(2S)
    ("restart", dict(), "heun"),                  # below 20 steps the default plan has no restarts
])
def test_noise_free_limits_are_the_ode_samplers(stochastic_id, knobs, ode_id):
    sig = schedule(12)
    x = start(16, sig)
    got = samplers.SAMPLERS[stochastic_id](WORLD, x, sig, generator=torch.Generator().manual_seed(0), **knobs)
    if ode_id is None:
        want = samplers.SAMPLERS["dpmpp_2s_ancestral"](WORLD, x, sig, eta=0.0)
    else:
        want = samplers.SAMPLERS[ode_id](WORLD, x, sig)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_restart_plan_defaults():
    """A1111/ComfyUI defaults: >= 20 steps rebuilds Karras with steps - 9 and restarts 9 steps once from
    sigma ~2 down to ~0.1; >= 36 steps restarts steps // 4 steps twice; the step count is kept."""
    for steps, restarts in [(20, 1), (30, 1), (40, 2)]:
        sig = [float(s) for s in schedule(steps, sigma_max=14.6146, sigma_min=0.0292)]
        plan = stochastic._restart_plan(sig, None)
        assert len(plan) == steps
        jumps = [(a, b) for (_, a), (b, _) in zip(plan[:-1], plan[1:]) if b > a]
        assert len(jumps) == restarts
        for low, high in jumps:
            assert 0.05 < low < 0.2 and 1.5 < high < 2.5
    assert stochastic._restart_plan([5.0, 1.0, 0.0], None) == [(5.0, 1.0), (1.0, 0.0)]


# --- parity with diffusers (float32 unless noted) ---------------------------------------------------

CFG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
B = 8


def eps_setup(scheduler):
    """An eps network that is exact for the world, on the scheduler's own table, and its EpsDenoiser."""
    table = DiscreteSchedule(scheduler.alphas_cumprod)

    def eps_model(x_in, t):
        sigma = table.t_to_sigma(torch.as_tensor(t, dtype=torch.float64)).reshape(-1).expand(x_in.shape[0])
        x = x_in.double() * (sigma[:, None] ** 2 + 1).sqrt()
        return ((x - WORLD(x, sigma)) / sigma[:, None]).to(x_in.dtype)

    return eps_model, EpsDenoiser(eps_model, table)


def run_diffusers(scheduler, sample, eps_model, generator=None, noises=None):
    for i, t in enumerate(scheduler.timesteps):
        eps = eps_model(scheduler.scale_model_input(sample, t), t)
        kwargs = {} if generator is None else {"generator": generator}
        if noises is not None:
            kwargs["variance_noise"] = noises[i]
        sample = scheduler.step(eps, t, sample, **kwargs).prev_sample
    return sample


def table_sigmas(scheduler):
    """sigma = sqrt((1 - abar) / abar) at the scheduler's timesteps, then 0 (VP schedulers)."""
    abar = scheduler.alphas_cumprod[scheduler.timesteps.long()]
    return torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1)])


def test_parity_euler_ancestral():
    """Same generator, same draws: diffusers draws randn(shape, generator) per step, as noise.randn does
    for one generator. Tolerance 2e-6 (diffusers computes its coefficients in float32)."""
    from diffusers import EulerAncestralDiscreteScheduler
    sched = EulerAncestralDiscreteScheduler(**CFG, timestep_spacing="trailing")
    sched.set_timesteps(20)
    eps_model, den = eps_setup(sched)
    x = start(B, sched.sigmas, dtype=torch.float32)
    ref = run_diffusers(sched, x, eps_model, generator=torch.Generator().manual_seed(5))
    out = samplers.SAMPLERS["euler_ancestral"](den, x, sched.sigmas, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_parity_dpm_2_ancestral():
    """KDPM2AncestralDiscreteScheduler interleaves sigmas; its distinct values are our schedule."""
    from diffusers import KDPM2AncestralDiscreteScheduler
    sched = KDPM2AncestralDiscreteScheduler(**CFG, timestep_spacing="trailing")
    sched.set_timesteps(20)
    eps_model, den = eps_setup(sched)
    sig = torch.unique_consecutive(sched.sigmas)
    x = start(B, sig, dtype=torch.float32)
    ref = run_diffusers(sched, x, eps_model, generator=torch.Generator().manual_seed(5))
    out = samplers.SAMPLERS["dpm_2_ancestral"](den, x, sig, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, ref, rtol=0, atol=4e-6)


@pytest.mark.parametrize("steps,atol", [(50, 1e-4), (1000, 5e-4)])
def test_parity_ddpm(steps, atol):
    """DDPMScheduler (fixed_small, no clipping) runs in VP coordinates: x_vp = x / sqrt(1 + sigma^2).
    Float32 rounding accumulates over the chain: 2e-5 (50 steps) / 9e-5 (1000 steps) measured."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(**CFG, clip_sample=False, variance_type="fixed_small")
    sched.set_timesteps(steps)
    eps_model, den = eps_setup(sched)
    sig = table_sigmas(sched)
    x_vp = start(B, [1.0], dtype=torch.float32)
    ref = run_diffusers(sched, x_vp, eps_model, generator=torch.Generator().manual_seed(5))
    out = samplers.SAMPLERS["ddpm"](den, x_vp * (1 + sig[0] ** 2).sqrt(), sig,
                                    generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)


def test_parity_lcm():
    """LCMScheduler's boundary condition c_skip x_vp + c_out x0 belongs to the denoiser (wrapped here);
    the sampler is denoise-then-renoise. 4 steps of the 50-step LCM grid."""
    from diffusers import LCMScheduler
    sched = LCMScheduler(**CFG, clip_sample=False)
    sched.set_timesteps(4)
    eps_model, den = eps_setup(sched)
    table = DiscreteSchedule(sched.alphas_cumprod)

    def lcm_denoiser(x, sigma):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(table.sigma_to_t(sigma).round())
        x_vp = x / (sigma[:, None] ** 2 + 1).sqrt()
        return c_out[:, None] * den(x, sigma) + c_skip[:, None] * x_vp

    sample = x_vp = start(B, [1.0], dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        sample, ref = sched.step(eps_model(sample, t), t, sample, generator=gen, return_dict=False)
    sig = table_sigmas(sched)
    out = samplers.SAMPLERS["lcm"](lcm_denoiser, x_vp * (1 + sig[0] ** 2).sqrt(), sig,
                                   generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-6)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_parity_dpmpp_2m_sde(solver_type):
    """diffusers' sde-dpmsolver++ draws plain Gaussian noise (not a Brownian tree): the same pre-drawn
    noise goes to both (diffusers' variance_noise, our noise_sampler). Tolerance 5e-6."""
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(**CFG, algorithm_type="sde-dpmsolver++", solver_order=2,
                                        solver_type=solver_type)
    sched.set_timesteps(20)
    eps_model, den = eps_setup(sched)
    noises = [torch.randn(B, 2, generator=torch.Generator().manual_seed(100 + i)) for i in range(20)]
    x_vp = start(B, [1.0], dtype=torch.float32)
    ref = run_diffusers(sched, x_vp, eps_model, noises=noises)
    pre_drawn = iter(noises)
    out = samplers.SAMPLERS["dpmpp_2m_sde"](den, x_vp * (1 + sched.sigmas[0] ** 2).sqrt(), sched.sigmas,
                                            solver_type=solver_type, noise_sampler=lambda s, s_next: next(pre_drawn))
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-6)


def test_parity_dpmpp_sde():
    """DPMSolverSDEScheduler with our Brownian tree put in place of its torchsde one. Run in float64:
    diffusers re-derives sigma as exp(-(-log sigma)), and in float32 that moves the query time by ~1e-6,
    which a Brownian path (|dW| ~ sqrt(dt)) turns into ~1e-3 differences. What remains (1.8e-6) is the
    network's time input: diffusers computes its timesteps from the unrounded float64 sigmas (up to
    1.3e-3 apart from log-sigma interpolation of the float32 ones); with those aligned the two agree
    to 7e-13."""
    pytest.importorskip("torchsde")
    from diffusers import DPMSolverSDEScheduler
    sched = DPMSolverSDEScheduler(**CFG)
    sched.set_timesteps(20)
    sched.sigmas = sched.sigmas.double()
    eps_model, den = eps_setup(sched)
    sig = torch.unique_consecutive(sched.sigmas)
    x = start(B, sig)
    lo, hi = float(sig[-2]), float(sig[0])
    sched.noise_sampler = BrownianTreeNoiseSampler(x, lo, hi, list(range(B)))
    ref = run_diffusers(sched, x, eps_model)
    out = samplers.SAMPLERS["dpmpp_sde"](den, x, sig, noise_sampler=BrownianTreeNoiseSampler(x, lo, hi, list(range(B))))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


# --- contract checks through the registry -----------------------------------------------------------

@pytest.mark.parametrize("sid", STOCHASTIC)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_callback(sid, dtype):
    sig = schedule(20).to(torch.float32)
    x = start(3, sig, dtype=dtype)
    seen = []
    out = samplers.SAMPLERS[sid](WORLD, x, sig, generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    assert [d["i"] for d in seen] == list(range(20))   # restart's default plan keeps the step count
    assert all(set(d) == {"i", "x", "sigma", "sigma_hat", "denoised"} for d in seen)
    assert all(isinstance(d["sigma"], float) and d["denoised"].shape == x.shape for d in seen)
    if sid != "restart":
        assert [d["sigma"] for d in seen] == pytest.approx(sig[:-1].tolist())


@pytest.mark.parametrize("sid", STOCHASTIC)
def test_registry_rejects_bad_inputs(sid):
    fn = samplers.SAMPLERS[sid]
    sig = schedule(5)
    x = start(2, sig)
    with pytest.raises(ValueError, match="NaN"):
        fn(WORLD, torch.full_like(x, float("nan")), sig)
    with pytest.raises(ValueError, match="descending"):
        fn(WORLD, x, sig.flip(0))
    with pytest.raises(TypeError, match="unknown option"):
        fn(WORLD, x, sig, s_churn=1.0)


def test_knob_errors_teach():
    sig = schedule(5)
    x = start(2, sig)
    with pytest.raises(ValueError, match="'midpoint' or 'heun'"):
        samplers.SAMPLERS["dpmpp_2m_sde"](WORLD, x, sig, solver_type="rk4")
    with pytest.raises(ValueError, match=r"r \(the intermediate"):
        samplers.SAMPLERS["dpmpp_sde"](WORLD, x, sig, r=0.0)
    with pytest.raises(ValueError, match="eta and s_noise"):
        samplers.SAMPLERS["euler_ancestral"](WORLD, x, sig, eta=-1.0)


def test_registry_marks_them_stochastic():
    assert all(samplers.INFO[sid].stochastic for sid in STOCHASTIC)
    assert samplers.get("DPM++ 2M SDE") is samplers.SAMPLERS["dpmpp_2m_sde"]


def test_restart_on_a_schedule_ending_nearer_zero_than_its_restart_point():
    """SD's 'simple' schedule at 20 steps, rebuilt as Karras, ends 0.22 -> 0: the restart point 0.1 is
    nearer the final 0, which cannot bound a restart interval (regression: it raised)."""
    from diffusekit.core import sigmas as sigma_schedules
    from diffusekit.core.mixture import GaussianMixture
    from diffusekit.core.schedules import DiscreteSchedule
    from diffusekit.core.samplers import SAMPLERS

    world = GaussianMixture.example(dim=2)
    s = sigma_schedules.get("simple", 20, schedule=DiscreteSchedule.from_name(), dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
    out = SAMPLERS["restart"](world, x, s, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()
