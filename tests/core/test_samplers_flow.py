"""Every registry sampler on a rectified-flow model, judged on the exact world.

World: `GaussianMixture.example()` (3 components in 2-D) under the flow parameterization
x = (1 - s) x0 + s eps; its ideal denoiser `flow_denoise` goes through the real `FlowDenoiser` as a
velocity network v = (x - D) / s, so the samplers see exactly what a trained SD3 model gives them.

- stochastic samplers (routed through the VE change of variables, `core.samplers.flow`) reproduce the
  mixture's weights, means and spreads from pure noise at s = 1;
- the naive VE steps on the raw flow variables (the sampler functions called directly) fail that check;
- DPM++ 2M SDE equals ComfyUI's rectified-flow (half log-SNR) form of the step, re-derived here;
- ODE samplers on the flow sigmas converge at their order to the exact flow solution;
- the flow schedules: `normal` over a FlowSchedule is diffusers' FlowMatchEuler spacing.
"""
import math

import pytest
import torch
from test_samplers_stochastic import DIST_CASES, STOCHASTIC, mixture_failures

from diffusekit.core import sigmas as S
from diffusekit.core.denoisers import FlowDenoiser, flow_sigmas
from diffusekit.core.mixture import GaussianMixture, reference_solution
from diffusekit.core.samplers import SAMPLERS, deterministic, flow, stochastic
from diffusekit.core.schedules import SD3_SHIFT, FlowSchedule, flow_shift

F64 = torch.float64
WORLD = GaussianMixture.example()
N = 2000

pytestmark = pytest.mark.usefixtures("one_thread")


def velocity(x, t):
    """The world's ideal velocity v = E[eps - x0 | x] = (x - D_flow) / s at time input t = 1000 s."""
    s = (t / 1000).to(x.dtype)
    return (x - WORLD.flow_denoise(x, s)) / s[:, None]


MODEL = FlowDenoiser(velocity, shift=SD3_SHIFT)


def flow_consistency(x, t):
    """Velocity of a flow consistency model: its D is the world's ODE end point from (x, s) (for LCM)."""
    s = (t / 1000).to(x.dtype)
    sig = float(s[0] / (1 - s[0]))
    end = reference_solution(WORLD, x / (1 - s[:, None]), sig, 0.0, steps=60)
    return (x - end) / s[:, None]


def noise(n=N, seed=1):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def draw(fn, steps, model=MODEL, **knobs):
    sig = flow_sigmas(steps, SD3_SHIFT, dtype=F64)
    return fn(model, noise(), sig, generator=torch.Generator().manual_seed(2), **knobs)


# --- the world --------------------------------------------------------------------------------------

def test_flow_world_is_the_ve_world_rescaled():
    x = noise(16) * 3
    for s in (0.01, 0.3, 0.9, 0.999):
        want = WORLD.denoise(x / (1 - s), s / (1 - s))
        torch.testing.assert_close(WORLD.flow_denoise(x, s), want, rtol=0, atol=1e-10)
    mean = (WORLD.weights[:, None] * WORLD.means).sum(0)
    torch.testing.assert_close(WORLD.flow_denoise(x, 1.0), mean.expand(16, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(WORLD.flow_denoise(x, 0.0), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(MODEL(x, torch.full((16,), 0.4, dtype=F64)), WORLD.flow_denoise(x, 0.4))


# --- stochastic samplers ------------------------------------------------------------------------------

@pytest.mark.parametrize("sid", STOCHASTIC)
def test_stochastic_samplers_follow_the_mixture_on_a_flow_model(sid):
    case = dict(DIST_CASES[sid])
    case.pop("name", None)
    if sid == "dpmpp_3m_sde":   # SD3's schedule starts with one huge step in log-SNR (s = 1 -> 0.989); the
        case["steps"] = 50      # 3-step extrapolation over such uneven steps spreads 10-12% wide at 30 steps
    model = FlowDenoiser(flow_consistency) if case.pop("denoiser", None) is not None else MODEL
    out = draw(SAMPLERS[sid], model=model, **case)
    assert out.dtype == F64
    assert mixture_failures(out) == []


@pytest.mark.parametrize("sid", ["euler_ancestral", "dpmpp_2m_sde", "ddpm", "dpmpp_sde"])
def test_naive_ve_steps_on_flow_variables_bias_the_samples(sid):
    """The seed notes' failure: a VE noise re-injection on the raw flow (x, s) keeps too much signal;
    the same sampler through the registry (VE variable) passes (the test above)."""
    steps = DIST_CASES[sid]["steps"]
    naive = draw(stochastic.SAMPLERS[sid], steps)
    assert mixture_failures(naive) != []


@pytest.mark.parametrize("eta,solver_type", [(1.0, "midpoint"), (0.5, "heun")])
def test_dpmpp_2m_sde_is_comfyuis_rectified_flow_step(eta, solver_type):
    """ComfyUI's sample_dpmpp_2m_sde on a CONST (flow) model, from its formulas: lambda = log((1-s)/s),
    alpha_t = 1 - s_t, first sigma 1 moved to percent_to_sigma(1e-4) = shift(1 - 1e-4); the same noise per step."""
    sig = flow_sigmas(12, SD3_SHIFT, dtype=F64)
    x = noise(64)
    zs = [torch.randn(64, 2, generator=torch.Generator().manual_seed(10 + i), dtype=F64) for i in range(12)]
    calls = []

    def noise_sampler(a, b):
        calls.append((a, b))
        return zs[len(calls) - 1]

    ours = SAMPLERS["dpmpp_2m_sde"](MODEL, x.clone(), sig, eta=eta, solver_type=solver_type,
                                    noise_sampler=noise_sampler)
    s = [float(v) for v in sig]
    s[0] = SD3_SHIFT * (1 - 1e-4) / (1 + (SD3_SHIFT - 1) * (1 - 1e-4))   # 0.99997
    lam = lambda v: math.log((1 - v) / v)  # noqa: E731
    ref, old, h_last, k = x.clone(), None, None, 0
    for i in range(len(s) - 1):
        d = WORLD.flow_denoise(ref, s[i])
        if s[i + 1] == 0:
            ref, h = d, None
        else:
            h = lam(s[i + 1]) - lam(s[i])
            h_eta = h * (eta + 1)
            alpha_t = 1 - s[i + 1]
            ref = s[i + 1] / s[i] * math.exp(-h * eta) * ref + alpha_t * -math.expm1(-h_eta) * d
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    ref = ref + alpha_t * (-math.expm1(-h_eta) / (-h_eta) + 1) / r * (d - old)
                else:
                    ref = ref + 0.5 * alpha_t * -math.expm1(-h_eta) / r * (d - old)
            ref = ref + zs[k] * s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta))
            k += 1
        old, h_last = d, h
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)
    assert calls[0] == pytest.approx((s[0], s[1]))     # the noise sampler sees flow levels


def test_callback_reports_flow_latents_and_levels():
    sig = flow_sigmas(6, SD3_SHIFT, dtype=F64)
    seen = []
    out = SAMPLERS["euler_ancestral"](MODEL, noise(8), sig, generator=torch.Generator().manual_seed(0),
                                      callback=seen.append)
    assert [round(e["sigma"], 9) for e in seen][1:] == [round(float(v), 9) for v in sig[1:-1]]
    assert seen[0]["sigma"] == pytest.approx(float(flow_shift(torch.tensor(1 - flow.FIRST_LEVEL_OFFSET), SD3_SHIFT)))
    torch.testing.assert_close(seen[0]["x"], noise(8))                 # the pure-noise latent as given
    for e in seen:                                                     # denoised = D_flow at the flow latent
        torch.testing.assert_close(e["denoised"], WORLD.flow_denoise(e["x"], e["sigma"]), rtol=0, atol=1e-9)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sid,steps,knobs", [("euler", 100, {"s_churn": 20.0}), ("dpm_fast", 60, {"eta": 1.0}),
                                             ("dpm_adaptive", 30, {"eta": 1.0})])
def test_noise_knobs_of_ode_samplers_run_in_the_ve_variable(sid, steps, knobs):
    """Euler's churn and DPM fast / adaptive's eta draw noise: routed like the stochastic samplers, they
    keep the mixture (measured spreads 1.01-1.06)."""
    out = draw(SAMPLERS[sid], steps, **knobs)
    assert mixture_failures(out) == []


# --- ODE samplers: convergence order on the flow world -----------------------------------------------------

T0, S_MIN = 0.99, 0.002


def flow_schedule(n, end):
    """n steps from T0 down to S_MIN evenly in the unshifted time u (s = shift(u), SD3's spacing), then 0
    (end = 0) or stop at S_MIN (end = S_MIN)."""
    inv = lambda s: s / (SD3_SHIFT - (SD3_SHIFT - 1) * s)   # noqa: E731  (the inverse time shift)
    u = torch.linspace(inv(T0), inv(S_MIN), n, dtype=F64)
    s = torch.cat([flow_shift(u, SD3_SHIFT), torch.zeros(1, dtype=F64)])
    return s if end == 0 else s[:-1]


@pytest.fixture(scope="module")
def flow_runs():
    torch.set_num_threads(1)   # module fixtures run before the one_thread fixture
    x = noise(64, seed=0) * T0
    out = {"x": x}
    for end in (0.0, S_MIN):   # the exact flow solution: the VE reference from sigma = T0 / (1 - T0), rescaled
        sig_end = end / (1 - end)
        out[end] = reference_solution(WORLD, x / (1 - T0), T0 / (1 - T0), sig_end, steps=600) / (1 + sig_end)
    return out


def _slope(steps, errors):
    xs, ys = [math.log(n) for n in steps], [-math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


# (sampler, knobs, step counts, end, accepted slope range). Measured on this world (RMS): see the ids.
FLOW_ORDER_CASES = [
    ("euler", {}, [128, 256, 512, 1024], 0.0, (0.85, 1.25)),
    ("euler_flow", {}, [128, 256, 512, 1024], 0.0, (0.85, 1.25)),
    ("ddim", {}, [128, 256, 512, 1024], 0.0, (0.85, 1.25)),
    ("heun", {}, [32, 64, 128, 256], 0.0, (1.8, 2.3)),
    ("dpm_2", {}, [32, 64, 128, 256], 0.0, (1.8, 2.3)),
    ("dpmpp_2m", {}, [64, 128, 256, 512], 0.0, (1.8, 2.3)),
    # LMS (order 4) measures 2.07: its low-order warm-up steps at s ~ 1 dominate, where flow trajectories
    # still bend (a VE trajectory is straight at sigma = 80: there LMS measures 3.4). UniPC 3.06, bh2 3.79
    # on the full schedule (stopping at S_MIN instead, its lower-order final steps dominate).
    ("lms", {}, [32, 64, 128, 256], S_MIN, (1.8, 4.5)),
    ("uni_pc", {}, [32, 64, 128, 256], 0.0, (2.7, 4.5)),
    ("uni_pc_bh2", {}, [32, 64, 128, 256], 0.0, (2.7, 4.5)),
]


@pytest.mark.parametrize("sid,knobs,steps,end,bounds", FLOW_ORDER_CASES, ids=[c[0] for c in FLOW_ORDER_CASES])
def test_ode_samplers_converge_at_their_order_on_a_flow_model(flow_runs, sid, knobs, steps, end, bounds):
    x, ref = flow_runs["x"], flow_runs[end]
    errors = [float((SAMPLERS[sid](MODEL, x.clone(), flow_schedule(n, end), **knobs) - ref).norm(dim=1)
                    .pow(2).mean().sqrt()) for n in steps]
    slope = _slope(steps, errors)
    assert bounds[0] < slope < bounds[1], f"{sid}: errors {errors} give order {slope:.2f}"


def test_every_registry_sampler_runs_on_a_flow_model():
    sig = flow_sigmas(8, SD3_SHIFT, dtype=F64)
    for sid in SAMPLERS:
        out = SAMPLERS[sid](MODEL, noise(4), sig, generator=torch.Generator().manual_seed(0))
        assert out.shape == (4, 2) and torch.isfinite(out).all(), sid


# --- flow schedules -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [4, 8, 20, 28])
def test_normal_on_a_flow_model_is_diffusers_flow_match_euler(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)
    sched.set_timesteps(steps)
    ours = S.get("normal", steps, schedule=FlowSchedule(SD3_SHIFT), dtype=F64)
    torch.testing.assert_close(ours, sched.sigmas.to(F64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [4, 8, 20])
def test_sgm_uniform_and_simple_on_a_flow_model(steps):
    """ComfyUI on ModelSamplingDiscreteFlow: sgm_uniform = shift(linspace(1, shift(1/T), steps + 1)[:-1]), 0;
    simple = shift((T - int(i T / steps)) / T), 0 (= flow_sigmas when steps divides T)."""
    fs = FlowSchedule(SD3_SHIFT)
    t_min = float(flow_shift(torch.tensor(1e-3, dtype=F64), SD3_SHIFT))
    want = torch.cat([flow_shift(torch.linspace(1, t_min, steps + 1, dtype=F64)[:-1], SD3_SHIFT), torch.zeros(1, dtype=F64)])
    torch.testing.assert_close(S.get("sgm_uniform", steps, schedule=fs, dtype=F64), want, rtol=0, atol=1e-12)
    simple = [float(flow_shift(torch.tensor((1000 - int(i * 1000 / steps)) / 1000, dtype=F64), SD3_SHIFT))
              for i in range(steps)] + [0.0]
    torch.testing.assert_close(S.get("simple", steps, schedule=fs, dtype=F64), torch.tensor(simple, dtype=F64),
                               rtol=0, atol=1e-12)
    beta = S.get("beta", steps, schedule=fs, dtype=F64)
    assert float(beta[0]) == 1.0 and float(beta[-1]) == 0.0 and bool((beta[1:-1] < 1).all())
