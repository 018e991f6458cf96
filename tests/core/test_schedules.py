"""Beta schedules, DiscreteSchedule and the forward process: closed forms and diffusers parity."""
import math

import numpy as np
import pytest
import torch

from diffusekit.core import schedules as S
from diffusekit.core.schedules import DiscreteSchedule, FlowSchedule

SD_SIGMA_MIN, SD_SIGMA_MAX = 0.0291671582, 14.6146412293   # SD 1.x table ends (ComfyUI's AYS table)


@pytest.fixture(scope="module")
def sd():
    return DiscreteSchedule.from_name("scaled_linear")


def test_sd_alphas_cumprod_match_ldm_float64_and_diffusers(sd):
    # LDM / ComfyUI / A1111 build it in float64 (numpy); tolerance 1e-12 relative
    ref = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2)
    np.testing.assert_allclose(sd.alphas_cumprod.numpy(), ref, rtol=1e-12)
    from diffusers import DDPMScheduler
    d = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    # diffusers accumulates the product in float32: <= 1e-6 relative apart (measured 9.5e-7)
    torch.testing.assert_close(sd.alphas_cumprod.float(), d.alphas_cumprod, rtol=1.5e-6, atol=0)
    torch.testing.assert_close(sd.betas.float(), d.betas, rtol=1e-6, atol=0)


def test_sd_sigma_table(sd):
    assert sd.sigmas.dtype == torch.float64 and len(sd) == 1000
    assert sd.sigma_min == pytest.approx(SD_SIGMA_MIN, abs=1e-10)
    assert sd.sigma_max == pytest.approx(SD_SIGMA_MAX, abs=1e-9)
    assert (sd.sigmas[1:] > sd.sigmas[:-1]).all()
    torch.testing.assert_close(sd.sigmas, ((1 - sd.alphas_cumprod) / sd.alphas_cumprod).sqrt())


@pytest.mark.parametrize("name,diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_other_beta_schedules_match_diffusers(name, diffusers_name):
    from diffusers import DDPMScheduler
    ours = S.betas(name, 1000)
    ref = DDPMScheduler(beta_schedule=diffusers_name).betas
    torch.testing.assert_close(ours.float(), ref, rtol=2e-6, atol=1e-9)
    if name == "linear":
        assert float(ours[0]) == pytest.approx(1e-4) and float(ours[-1]) == pytest.approx(0.02)
    else:
        assert float(ours.max()) == pytest.approx(0.999)   # the cap of Nichol & Dhariwal


def test_beta_schedule_errors():
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        S.betas("quadratic")
    with pytest.raises(ValueError, match="beta_start"):
        S.betas("linear", 1000, s=0.1)
    with pytest.raises(ValueError, match="timesteps"):
        S.betas("linear", 0)


def test_zero_terminal_snr_matches_diffusers():
    from diffusers import DDPMScheduler, EulerDiscreteScheduler
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale
    b = S.rescale_zero_terminal_snr(S.betas("scaled_linear"))
    # the same algorithm fed float64 betas: equal to rounding
    torch.testing.assert_close(b, diffusers_rescale(S.betas("scaled_linear")), rtol=1e-10, atol=1e-15)
    # diffusers' scheduler runs it in float32 (small betas lose ~2e-4 relative): compare alpha-bars
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=True)
    torch.testing.assert_close(torch.cumprod(1 - b, 0).float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert float(b[-1]) == 1.0
    zs = DiscreteSchedule.from_name("scaled_linear", zero_terminal_snr=True)
    assert float(zs.alphas_cumprod[-1]) == 0.0
    # first alpha-bar kept; the sigma table floors the last alpha-bar at 2**-24 like diffusers' Euler
    assert float(zs.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, rel=1e-12)
    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   rescale_betas_zero_snr=True)
    assert zs.sigma_max == pytest.approx(math.sqrt((1 - 2 ** -24) / 2 ** -24), rel=1e-12)
    assert zs.sigma_max == pytest.approx(float(euler.sigmas.max()), rel=1e-6)


def test_sigma_t_interpolation(sd):
    t_int = torch.tensor([0.0, 1.0, 500.0, 998.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sd.sigma_to_t(sd.t_to_sigma(t_int)), t_int, rtol=0, atol=1e-9)
    # halfway between steps, log sigma is the mean of the neighbours'
    half = sd.t_to_sigma(torch.tensor(10.5, dtype=torch.float64))
    assert float(half) == pytest.approx(math.sqrt(float(sd.sigmas[10] * sd.sigmas[11])), rel=1e-12)
    # out of range clamps (k-diffusion)
    assert float(sd.sigma_to_t(torch.tensor(1e-4))) == 0.0
    assert float(sd.sigma_to_t(torch.tensor(100.0))) == 999.0
    # float32 in, float32 out; equal to diffusers' _sigma_to_t (its table in float32: atol 1e-3 steps)
    from diffusers import EulerDiscreteScheduler
    d = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sig = np.array([0.03, 0.1, 0.5, 1.0, 3.7, 10.0, 14.6])
    log_sigmas = np.log(((1 - d.alphas_cumprod.numpy()) / d.alphas_cumprod.numpy()) ** 0.5)
    ours = sd.sigma_to_t(torch.tensor(sig, dtype=torch.float32))
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), d._sigma_to_t(sig, log_sigmas), atol=1e-3)


def test_q_step_chain_matches_q_sample_in_distribution(sd):
    # x_k after q_step at t = 0..k has mean sqrt(abar_k) x0 and variance 1 - abar_k
    k, n = 200, 20000
    x0 = torch.full((n, 1), 1.5, dtype=torch.float64)
    mean_only = x0.clone()
    g = torch.Generator().manual_seed(0)
    x = x0.clone()
    for t in range(k + 1):
        x = sd.q_step(x, t, torch.randn(n, 1, generator=g, dtype=torch.float64))
        mean_only = sd.q_step(mean_only, t, torch.zeros_like(mean_only))
    abar = float(sd.alphas_cumprod[k])
    # noise-free chain: prod sqrt(1 - beta) = sqrt(abar), exactly up to rounding
    assert float(mean_only[0]) == pytest.approx(1.5 * math.sqrt(abar), rel=1e-12)
    # Monte Carlo, 20000 samples: within ~5 standard errors
    var = 1 - abar
    assert float(x.mean()) == pytest.approx(1.5 * math.sqrt(abar), abs=5 * math.sqrt(var / n))
    assert float(x.var()) == pytest.approx(var, rel=5 * math.sqrt(2 / n))
    one_shot = sd.q_sample(x0, torch.full((n,), k), torch.randn(n, 1, generator=g, dtype=torch.float64))
    assert float(one_shot.mean()) == pytest.approx(float(x.mean()), abs=8 * math.sqrt(var / n))


def test_q_sample_closed_form(sd):
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 499, 999])
    out = sd.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        a = float(sd.alphas_cumprod[ti])
        torch.testing.assert_close(out[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i])
    # the VE view: x_t / sqrt(abar) = x0 + sigma * noise
    torch.testing.assert_close(out[1] / math.sqrt(float(sd.alphas_cumprod[499])),
                               x0[1] + float(sd.sigmas[499]) * noise[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="0, 999"):
        sd.q_sample(x0, torch.tensor([0, 1, 1000]), noise)


def test_posterior_matches_gaussian_conditioning(sd):
    # q(x_{t-1} | x_t, x0) from Bayes: prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}), likelihood
    # N(sqrt(alpha_t) x_{t-1}, beta_t)  =>  precision 1/(1-abar_{t-1}) + alpha_t/beta_t
    x0 = torch.tensor([[0.7], [-1.2], [0.3]], dtype=torch.float64)
    xt = torch.tensor([[0.1], [2.0], [-0.4]], dtype=torch.float64)
    t = torch.tensor([1, 400, 999])
    post = sd.posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        ap, beta = float(sd.alphas_cumprod[ti - 1]), float(sd.betas[ti])
        prec = 1 / (1 - ap) + (1 - beta) / beta
        mean = (math.sqrt(ap) * float(x0[i]) / (1 - ap) + math.sqrt(1 - beta) * float(xt[i]) / beta) / prec
        assert float(post.mean[i]) == pytest.approx(mean, rel=1e-10)
        assert float(post.variance[i]) == pytest.approx(1 / prec, rel=1e-10)
        assert float(post.log_variance[i]) == pytest.approx(math.log(1 / prec), rel=1e-10)
    big = sd.posterior_mean_variance(x0, xt, t, variance="beta")
    torch.testing.assert_close(big.variance.reshape(-1), sd.betas[t])
    torch.testing.assert_close(big.mean, post.mean)
    # t = 0: the mean is x0, beta~_0 = 0 and its log is clipped to log beta~_1
    p0 = sd.posterior_mean_variance(x0, xt, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(p0.mean, x0)
    assert float(p0.variance[0]) == 0.0
    assert float(p0.log_variance[0]) == pytest.approx(math.log(float(sd.posterior_variance[1])))
    with pytest.raises(ValueError, match="beta_tilde"):
        sd.posterior_mean_variance(x0, xt, t, variance="large")


def test_posterior_matches_diffusers_ddpm_variance(sd):
    from diffusers import DDPMScheduler
    d = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    d.set_timesteps(1000)
    for t in (1, 10, 500, 999):
        assert float(sd.posterior_variance[t]) == pytest.approx(float(d._get_variance(t)), rel=5e-5)  # float32 there


def test_discrete_schedule_validation():
    with pytest.raises(ValueError, match="decreasing"):
        DiscreteSchedule(torch.tensor([0.5, 0.6, 0.4]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiscreteSchedule(torch.tensor([1.0, 0.5, 0.4]))


def test_flow_schedule_table():
    fs = FlowSchedule(shift=3.0)
    assert fs.sigma_max == 1.0
    assert fs.sigma_min == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), rel=1e-12)
    assert float(fs.sigma_to_t(torch.tensor(0.5))) == 500.0
    assert float(fs.t_to_sigma(torch.tensor(500.0))) == pytest.approx(0.75)   # shift(0.5) = 1.5/2
    assert float(S.flow_shift(torch.tensor(0.5), 1.0)) == 0.5
