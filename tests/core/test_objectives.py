"""Training targets, min-SNR weights and offset noise against closed forms."""
import math

import pytest
import torch

from diffusekit.core import objectives as O
from diffusekit.core.denoisers import EpsDenoiser, FlowDenoiser, VDenoiser, X0Denoiser
from diffusekit.core.schedules import DiscreteSchedule

F64 = torch.float64


@pytest.fixture(scope="module")
def sd():
    return DiscreteSchedule.from_name("scaled_linear")


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.randn(3, 2, 4, 4, generator=g, dtype=F64)


def test_discrete_targets_closed_form(sd):
    x0, eps = _data()
    t = torch.tensor([0, 300, 999])
    for pred in ("eps", "v", "x0"):
        pair = O.TrainingTarget(pred, sd)(x0, eps, t)
        torch.testing.assert_close(pair.model_input, sd.q_sample(x0, t, eps))
        assert pair.timestep.tolist() == [0, 300, 999]
        for i, ti in enumerate(t.tolist()):
            a, s = math.sqrt(float(sd.alphas_cumprod[ti])), math.sqrt(1 - float(sd.alphas_cumprod[ti]))
            want = {"eps": eps[i], "x0": x0[i], "v": a * eps[i] - s * x0[i]}[pred]
            torch.testing.assert_close(pair.target[i], want)
            if pred == "v":   # Salimans & Ho: x0 = a x_t - s v, eps = s x_t + a v
                xt, v = pair.model_input[i], pair.target[i]
                torch.testing.assert_close(a * xt - s * v, x0[i])
                torch.testing.assert_close(s * xt + a * v, eps[i])


@pytest.mark.parametrize("pred,wrapper", [("eps", EpsDenoiser), ("v", VDenoiser), ("x0", X0Denoiser)])
def test_target_is_what_the_wrapper_turns_back_into_x0(sd, pred, wrapper):
    x0, eps = _data(1)
    t = torch.tensor([5, 400, 990])
    pair = O.TrainingTarget(pred, sd)(x0, eps, t)
    sigma = sd.sigmas[t]
    den = wrapper(lambda x_in, tt: pair.target, sd)          # a network that learned the target exactly
    torch.testing.assert_close(den(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma), x0, rtol=1e-10, atol=1e-10)
    # called with VE sigmas instead of steps: the same input and target
    by_sigma = O.TrainingTarget(pred, sd)(x0, eps, sigma=sigma)
    torch.testing.assert_close(by_sigma.model_input, pair.model_input)
    torch.testing.assert_close(by_sigma.timestep, t.float(), rtol=0, atol=1e-4)


def test_flow_target(sd):
    x0, eps = _data(2)
    s = torch.tensor([0.1, 0.5, 1.0], dtype=F64)
    pair = O.TrainingTarget("flow")(x0, eps, sigma=s)
    sc = s.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(pair.model_input, (1 - sc) * x0 + sc * eps)
    torch.testing.assert_close(pair.target, eps - x0)
    torch.testing.assert_close(pair.timestep, torch.tensor([100.0, 500.0, 1000.0]))
    den = FlowDenoiser(lambda x_in, tt: pair.target)
    torch.testing.assert_close(den(pair.model_input, s), x0, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        O.TrainingTarget("flow")(x0, eps, sigma=torch.tensor([0.5, 1.5, 0.2]))


def test_min_snr_weights_closed_form():
    snr = torch.tensor([0.0, 0.5, 5.0, 20.0], dtype=F64)
    torch.testing.assert_close(O.min_snr_weights(snr, 5.0, "x0"), torch.tensor([0.0, 0.5, 5.0, 5.0], dtype=F64))
    torch.testing.assert_close(O.min_snr_weights(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.25], dtype=F64))
    torch.testing.assert_close(O.min_snr_weights(snr, 5.0, "v"),
                               torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 21], dtype=F64))
    with pytest.raises(ValueError, match="'eps', 'v', 'x0'"):
        O.min_snr_weights(snr, 5.0, "flow")


def test_snr_and_sampling(sd):
    tt = O.TrainingTarget("eps", sd)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(tt.snr(t), 1 / sd.sigmas[t] ** 2)
    torch.testing.assert_close(tt.snr(sigma=torch.tensor([2.0])), torch.tensor([0.25], dtype=F64))
    assert float(O.TrainingTarget("flow").snr(sigma=torch.tensor(0.5))) == 1.0
    draws = tt.sample(1000, generator=torch.Generator().manual_seed(0))
    assert draws.dtype == torch.long and 0 <= int(draws.min()) and int(draws.max()) <= 999
    again = tt.sample(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    f = O.TrainingTarget("flow").sample(100, generator=torch.Generator().manual_seed(0))
    assert ((f >= 0) & (f < 1)).all()


def test_logit_normal_flow_timesteps():
    """SD3's logit-normal sampling (Esser et al. 2024, eq. 19): logit(s) ~ N(loc, scale^2); its CDF at
    s = 0.5 is Phi(-loc / scale) (checked at loc = 0.5, scale = 1: 0.3085), within 4 standard errors."""
    n = 20000
    s = O.TrainingTarget("flow").sample(n, generator=torch.Generator().manual_seed(0), sampling="logit_normal",
                                        loc=0.5, scale=1.0)
    assert s.dtype == torch.float64 and bool(((s > 0) & (s < 1)).all())
    logit = torch.log(s / (1 - s))
    assert abs(float(logit.mean()) - 0.5) < 4 / n ** 0.5 and abs(float(logit.std()) - 1.0) < 4 * (0.5 / n) ** 0.5
    frac = float((s < 0.5).double().mean())
    assert abs(frac - 0.308538) < 4 * (0.3085 * 0.6915 / n) ** 0.5
    with pytest.raises(ValueError, match="logit_normal"):
        O.TrainingTarget("flow").sample(4, sampling="cosmap")
    with pytest.raises(ValueError, match="flow training"):
        O.TrainingTarget("eps", DiscreteSchedule.from_name()).sample(4, sampling="logit_normal")


def test_weighted_mse():
    pred, target = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert float(O.weighted_mse(pred, target)) == pytest.approx(2.5)            # (1 + 4) / 2
    assert float(O.weighted_mse(pred, target, torch.tensor([1.0, 0.5]))) == pytest.approx(1.5)   # (1 + 2) / 2


def test_offset_noise():
    noise = torch.zeros(2, 3, 4, 4)
    out = O.offset_noise(noise, 0.1, generator=torch.Generator().manual_seed(0))
    # constant over the spatial dims, one N(0, 0.1^2) value per sample and channel
    assert out.shape == noise.shape
    torch.testing.assert_close(out, out[:, :, :1, :1].expand_as(out))
    expected = 0.1 * torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, :, :1, :1], expected)
    big = O.offset_noise(torch.zeros(20000, 1, 1, 1), 0.5, generator=torch.Generator().manual_seed(1))
    assert float(big.std()) == pytest.approx(0.5, rel=0.03)     # ~4 standard errors at n = 20000
    with pytest.raises(ValueError, match=r"\(B, C"):
        O.offset_noise(torch.zeros(5))


def test_target_errors(sd):
    x0, eps = _data()
    with pytest.raises(ValueError, match="eps, v, x0, flow"):
        O.TrainingTarget("score", sd)
    with pytest.raises(ValueError, match="DiscreteSchedule"):
        O.TrainingTarget("v")
    with pytest.raises(ValueError, match="exactly one"):
        O.TrainingTarget("eps", sd)(x0, eps)
    with pytest.raises(ValueError, match="integer steps"):
        O.TrainingTarget("eps", sd)(x0, eps, torch.tensor([0, 1, 1000]))
    with pytest.raises(ValueError, match="same shape"):
        O.TrainingTarget("eps", sd)(x0, eps[:1], torch.tensor([0, 1, 2]))
