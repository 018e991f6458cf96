"""Sigma schedules: pinned values, reference formulas (k-diffusion / ComfyUI / A1111), diffusers parity."""
import math

import numpy as np
import pytest
import torch

from diffusekit.core import sigmas as S
from diffusekit.core.schedules import DiscreteSchedule, FlowSchedule

F64 = torch.float64


@pytest.fixture(scope="module")
def sd():
    return DiscreteSchedule.from_name("scaled_linear")


def _diffusers_euler(**config):
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **config)


def test_karras_sd15_20_steps_pinned(sd):
    s = S.get("karras", 20, schedule=sd, dtype=F64)
    assert s.shape == (21,) and float(s[-1]) == 0.0
    expected_head = [14.6146412293, 11.7253648495, 9.3402027518, 7.3836173490, 5.7894117072]
    torch.testing.assert_close(s[:5], torch.tensor(expected_head, dtype=F64), rtol=1e-9, atol=0)
    assert float(s[-2]) == pytest.approx(0.0291671582, abs=1e-9)
    # same numbers from explicit sigma_min/max (the docs/architecture.md example), float32 by default
    s32 = S.get("karras", steps=20, sigma_min=0.0292, sigma_max=14.6146)
    assert s32.dtype == torch.float32
    assert float(s32[0]) == pytest.approx(14.6146) and float(s32[-2]) == pytest.approx(0.0292)


@pytest.mark.parametrize("config,name,opts", [
    ({"use_karras_sigmas": True}, "karras", {}),
    ({"use_exponential_sigmas": True}, "exponential", {}),
    ({"use_beta_sigmas": True}, "beta", {"variant": "a1111"}),
])
@pytest.mark.parametrize("steps", [2, 7, 20])  # diffusers at 1 step uses only t=0
def test_parity_with_diffusers_euler(sd, config, name, opts, steps):
    d = _diffusers_euler(**config)
    d.set_timesteps(steps)
    ours = S.get(name, steps, schedule=sd, **opts)
    # diffusers takes sigma_min from its float32 table: 1.3e-5 relative at the low end
    torch.testing.assert_close(ours, d.sigmas, rtol=2e-5, atol=0)


def test_uniform_is_the_models_linspace_schedule(sd):
    # t = linspace(999, 0, 10) = 999, 888, ..., 0 are integers: exactly table entries
    s = S.get("uniform", 10, schedule=sd, dtype=F64)
    torch.testing.assert_close(s[:-1], sd.sigmas[torch.arange(999, -1, -111)], rtol=1e-12, atol=0)
    # diffusers' Euler interpolates sigma (not log sigma) between steps: ~2e-5 relative apart
    d = _diffusers_euler()
    d.set_timesteps(20)
    torch.testing.assert_close(S.get("uniform", 20, schedule=sd), d.sigmas, rtol=5e-5, atol=0)
    # A1111 Normal = ComfyUI normal = Uniform for a model's own range
    torch.testing.assert_close(S.get("normal", 20, schedule=sd), S.get("uniform", 20, schedule=sd))


def test_sgm_uniform(sd):
    s = S.get("sgm_uniform", 10, schedule=sd, dtype=F64)
    t = torch.linspace(999, 0, 11, dtype=F64)[:-1]                   # 999, 899.1, ..., 99.9
    torch.testing.assert_close(s[:-1], sd.t_to_sigma(t))
    assert float(s[-2]) == pytest.approx(0.3437048175, rel=1e-8)


def test_simple_and_ddim_uniform_pick_table_entries(sd):
    simple = S.get("simple", 20, schedule=sd, dtype=F64)
    torch.testing.assert_close(simple[:-1], sd.sigmas[torch.arange(999, 0, -50)], rtol=0, atol=0)
    ddim = S.get("ddim_uniform", 20, schedule=sd, dtype=F64)
    torch.testing.assert_close(ddim[:-1], sd.sigmas[torch.arange(951, 0, -50)], rtol=0, atol=0)
    # ComfyUI / A1111 keep a fixed stride 1000 // 7 = 142: indices 995, 853, ..., 1 -> 8 steps
    ddim7 = S.get("ddim_uniform", 7, schedule=sd, dtype=F64)
    torch.testing.assert_close(ddim7[:-1], sd.sigmas[torch.arange(995, 0, -142)], rtol=0, atol=0)
    with pytest.raises(ValueError, match="<= 1000"):
        S.get("simple", 1001, schedule=sd)


def test_beta_comfyui_indexes_table_with_scipy_quantiles(sd):
    from scipy import stats
    for steps in (10, 30, 300):
        ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999).astype(int)
        keep = [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
        s = S.get("beta", steps, schedule=sd, dtype=F64)
        torch.testing.assert_close(s[:-1], sd.sigmas[torch.tensor(keep)], rtol=0, atol=0)
    assert S.get("beta", 300, schedule=sd).shape == (294,)          # 7 repeats dropped, as ComfyUI
    # alpha / beta opts reach the quantile
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, 8, endpoint=False), 2.0, 0.5) * 999).astype(int)
    torch.testing.assert_close(S.get("beta", 8, schedule=sd, alpha=2.0, beta=0.5, dtype=F64)[:-1],
                               sd.sigmas[torch.tensor(ts)])


def test_beta_without_schedule_is_the_a1111_range_version():
    from scipy import stats
    s = S.get("beta", 6, sigma_min=0.03, sigma_max=14.6, dtype=F64)
    ppf = stats.beta.ppf(1 - np.linspace(0, 1, 6), 0.6, 0.6)
    np.testing.assert_allclose(s[:-1].numpy(), 0.03 + ppf * (14.6 - 0.03), rtol=1e-12)


def test_exponential_polyexponential_kl_optimal_formulas():
    lo, hi = 0.03, 14.6
    e = S.get("exponential", 10, sigma_min=lo, sigma_max=hi, dtype=F64)
    torch.testing.assert_close(e[:-1].log().diff(), torch.full((9,), math.log(lo / hi) / 9, dtype=F64))
    torch.testing.assert_close(S.get("polyexponential", 10, sigma_min=lo, sigma_max=hi, dtype=F64), e)
    p2 = S.get("polyexponential", 10, sigma_min=lo, sigma_max=hi, rho=2.0, dtype=F64)
    ramp = torch.linspace(1, 0, 10, dtype=F64) ** 2
    torch.testing.assert_close(p2[:-1], (ramp * math.log(hi / lo) + math.log(lo)).exp())
    k = S.get("kl_optimal", 10, sigma_min=lo, sigma_max=hi, dtype=F64)
    torch.testing.assert_close(k[:-1].atan().diff(), torch.full((9,), (math.atan(lo) - math.atan(hi)) / 9,
                                                                 dtype=F64))
    assert S.get("kl_optimal", 1, sigma_min=lo, sigma_max=hi).tolist() == pytest.approx([hi, 0.0])
    kr = S.get("karras", 5, sigma_min=lo, sigma_max=hi, rho=3.0, dtype=F64)
    torch.testing.assert_close(kr[:-1] ** (1 / 3), torch.linspace(hi ** (1 / 3), lo ** (1 / 3), 5, dtype=F64))


def test_linear_quadratic_pinned(sd):
    s = S.get("linear_quadratic", 10, schedule=sd, dtype=F64)
    # first half linear down to (1 - threshold) * sigma_max, then quadratic to 0 (Mochi / ComfyUI)
    torch.testing.assert_close(s[:6], 14.6146412293 * (1 - 0.025 * torch.arange(6, dtype=F64) / 5), rtol=1e-9,
                               atol=0)
    expected_tail = [13.6208456257, 11.8817033194, 9.0318482797, 5.0712805066, 0.0]
    torch.testing.assert_close(s[6:], torch.tensor(expected_tail, dtype=F64), rtol=1e-9, atol=0)
    assert S.get("linear_quadratic", 1, sigma_max=1.0).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="linear_steps"):
        S.get("linear_quadratic", 4, sigma_max=1.0, linear_steps=4)


def test_align_your_steps():
    comfy10 = S.get("align_your_steps", 10, dtype=F64)
    assert comfy10[:-1].tolist() == pytest.approx(S._AYS[("sd15", "comfyui")][:-1], rel=1e-12)
    assert float(comfy10[-1]) == 0.0
    a1111_11 = S.get("align_your_steps", 11, model="sdxl", variant="a1111", dtype=F64)
    assert a1111_11[:-1].tolist() == pytest.approx(S._AYS[("sdxl", "a1111")], rel=1e-12)
    # other counts: log-linear interpolation on an even grid (NVIDIA's how-to, numpy.interp)
    table = np.array(S._AYS[("sd15", "comfyui")])

    def loglinear(n):
        return np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, 11), np.log(table[::-1])))[::-1]

    np.testing.assert_allclose(S.get("align_your_steps", 20, dtype=F64)[:-1].numpy(), loglinear(21)[:-1], rtol=1e-12)
    a20 = S.get("align_your_steps", 20, variant="a1111", dtype=F64)
    table = np.array(S._AYS[("sd15", "a1111")])
    np.testing.assert_allclose(a20[:-1].numpy(), loglinear(20), rtol=1e-12)
    with pytest.raises(ValueError, match="sdxl"):
        S.get("align_your_steps", 10, model="sd3")


@pytest.mark.parametrize("name", S.NAMES)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 50])
def test_every_schedule_descends_to_zero(sd, name, steps):
    s = S.get(name, steps, schedule=sd)
    S.check_sigmas(s)
    assert float(s[-1]) == 0.0 and s.dtype == torch.float32
    if name != "ddim_uniform" or 1000 % steps == 0:
        assert s.shape == (steps + 1,)


@pytest.mark.parametrize("name", ["simple", "normal", "sgm_uniform", "beta", "karras", "ddim_uniform"])
def test_schedules_on_a_flow_model(name):
    fs = FlowSchedule(shift=3.0)
    s = S.get(name, 20, schedule=fs, dtype=F64)
    S.check_sigmas(s)
    assert float(s[-1]) == 0.0
    # ddim_uniform's first pick is table index 951, the others start at sigma_max = 1
    assert float(s[0]) == (pytest.approx(float(fs.sigmas[951])) if name == "ddim_uniform" else pytest.approx(1.0))


def test_zero_terminal_snr_schedule_works():
    zs = DiscreteSchedule.from_name("scaled_linear", zero_terminal_snr=True)
    for name in S.NAMES:
        s = S.get(name, 20, schedule=zs)
        S.check_sigmas(s)


def test_resolve_ids_labels_and_aliases():
    assert S.resolve("Karras") == "karras"
    assert S.resolve("sgm uniform") == "sgm_uniform" and S.resolve("SGMUniform") == "sgm_uniform"
    assert S.resolve("DDIM") == "ddim_uniform" and S.resolve("ddim_uniform") == "ddim_uniform"
    assert S.resolve("ALIGN YOUR STEPS") == "align_your_steps" and S.resolve("Linear Quadratic") == "linear_quadratic"
    assert S.resolve("Automatic") == "automatic"
    assert set(S.DISPLAY_NAMES.values()) - {"automatic"} == set(S.NAMES)
    with pytest.raises(ValueError, match="karras") as e:
        S.resolve("karas")
    assert "Align Your Steps" in str(e.value)


def test_get_validation(sd):
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        S.get("karras", 0, schedule=sd)
    with pytest.raises(ValueError, match="'nope'.*normal"):
        S.get("nope", 10, schedule=sd)
    with pytest.raises(ValueError, match="sigma_min=5.0, sigma_max=1.0"):
        S.get("karras", 10, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="needs sigma_min and sigma_max"):
        S.get("karras", 10)
    with pytest.raises(ValueError, match="schedule=DiscreteSchedule"):
        S.get("normal", 10, sigma_min=0.03, sigma_max=14.6)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rho'\]"):
        S.get("exponential", 10, schedule=sd, rho=3.0)
    with pytest.raises(ValueError, match="default_schedule"):
        S.get("Automatic", 10, schedule=sd)


def test_slice_steps_hands_over_at_a_nonzero_sigma(sd):
    s = S.get("karras", 20, schedule=sd)
    first, second = S.slice_steps(s, 0, 14), S.slice_steps(s, 14)
    assert first.shape == (15,) and second.shape == (7,)
    assert float(first[-1]) == float(second[0]) == float(s[14]) > 0
    torch.testing.assert_close(torch.cat([first, second[1:]]), s)
    assert S.slice_steps(s, 3, 10_000).shape == (18,)       # past the end = the last step
    first[0] = -1.0
    assert float(s[0]) > 0                                  # a copy
    for bad in [(5, 5), (-1, 3), (21, None)]:
        with pytest.raises(ValueError, match="start_step"):
            S.slice_steps(s, *bad)


@pytest.mark.parametrize("bad,msg", [
    (torch.tensor([3.0, 2.0, 2.0, 0.0]), r"sigmas\[1\]=2 <= sigmas\[2\]=2"),
    (torch.tensor([3.0, float("nan"), 0.0]), "finite"),
    (torch.tensor([[3.0, 0.0]]), "1-D"),
    (torch.tensor([3.0]), "at least 2"),
    (torch.tensor([3.0, 1.0, -0.5]), "last sigma"),
])
def test_check_sigmas(bad, msg):
    with pytest.raises(ValueError, match=msg):
        S.check_sigmas(bad)


def test_check_sigmas_accepts_schedules_ending_above_zero():
    s = torch.tensor([14.6, 1.0, 0.03])
    assert S.check_sigmas(s) is s


def test_beta_ppf_matches_scipy():
    from scipy import stats
    for a, b in [(0.6, 0.6), (0.5, 2.0), (3.0, 1.5)]:
        for q in np.linspace(0, 1, 41):
            assert S._beta_ppf(float(q), a, b) == pytest.approx(stats.beta.ppf(q, a, b), abs=1e-13)


def test_schedule_facts_for_interfaces():
    """What the A1111 /schedulers listing needs, from the schedule functions themselves."""
    assert S.label("karras") == "Karras" and S.label("SGM Uniform") == "SGM Uniform" and S.LABELS["ddim_uniform"] == "DDIM"
    assert S.aliases("sgm_uniform") == ["sgmuniform"] and S.aliases("align_your_steps") == ["ays"]
    table = {n for n in S.DISPLAY_NAMES.values() if S.needs_table(n)}
    assert table == {"uniform", "sgm_uniform", "simple", "normal", "ddim_uniform", "beta"}
    assert not S.needs_table("beta", variant="a1111")
    for n in table - {"beta"}:                      # the fact agrees with what `get` demands
        with pytest.raises(ValueError, match="noise table"):
            S.get(n, 4, sigma_min=0.1, sigma_max=10.0)
    assert S.default_options("karras") == {"rho": 7.0} and S.default_options("polyexponential") == {"rho": 1.0}
    assert S.default_options("exponential") == {} and S.default_options("automatic") == {}
    with pytest.raises(ValueError, match="valid ids"):
        S.label("wobbly")
