"""Classifier-free guidance: closed-form numbers, one batched call per step, CFG rescale."""
import math

import pytest
import torch

from diffusekit.core import guidance as G


class Toy:
    """D(x, sigma, c) = x / (1 + sigma^2) + c: guidance acts on c alone. Counts calls and batch sizes."""

    sigma_min, sigma_max, prediction = 0.03, 14.6, "eps"

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, c, **extra):
        self.batches.append((x.shape[0], sigma.clone() if torch.is_tensor(sigma) else sigma, c.shape, extra))
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (1 + sig ** 2) + c.reshape(c.shape[0], *([1] * (x.ndim - 1)))


def test_cfg_closed_form_in_one_batched_call():
    toy = Toy()
    x = torch.ones(2, 3)
    sigma = torch.tensor([1.0, 3.0])
    guided = G.cfg(toy, 7.5, {"c": torch.tensor([2.0, 4.0])}, {"c": torch.tensor([1.0, 1.0])})
    out = guided(x, sigma)
    # x/(1+sigma^2) is shared; c part: u + 7.5 (c - u) = 1 + 7.5 * (1, 3) = (8.5, 23.5)
    expected = torch.tensor([[0.5 + 8.5] * 3, [0.1 + 23.5] * 3])
    torch.testing.assert_close(out, expected)
    assert len(toy.batches) == 1
    batch, sig, c_shape, _ = toy.batches[0]
    assert batch == 4 and c_shape == (4,) and sig.tolist() == [1.0, 3.0, 1.0, 3.0]
    guided(x, sigma)
    assert len(toy.batches) == 2                      # one call per step


def test_cfg_scale_one_skips_the_uncond_pass():
    toy = Toy()
    guided = G.cfg(toy, 1.0, {"c": torch.tensor([2.0])}, {"c": torch.tensor([5.0])})
    out = guided(torch.zeros(3, 2), torch.tensor(0.5))
    assert len(toy.batches) == 1 and toy.batches[0][0] == 3
    torch.testing.assert_close(out, torch.full((3, 2), 2.0))   # the batch-1 cond serves all 3 images


def test_cfg_scalar_sigma_and_batch_one_cond_broadcast():
    toy = Toy()
    out = G.cfg(toy, 2.0, {"c": torch.tensor([3.0])}, {"c": torch.tensor([1.0])})(torch.zeros(2, 1), 1.0)
    assert toy.batches[0][0] == 4 and toy.batches[0][1].tolist() == [1.0] * 4
    torch.testing.assert_close(out, torch.full((2, 1), 5.0))   # 1 + 2 * (3 - 1)


def test_cfg_rescale_formula():
    class Fixed:
        def __call__(self, x, sigma, c):
            return c

    cond = torch.tensor([[1.0, 3.0]])
    uncond = torch.tensor([[0.0, 0.0]])
    # guided = 2 * cond = (2, 6); std(cond) = sqrt(2), std(guided) = 2 sqrt(2) -> rescaled (1, 3);
    # phi = 0.7: 0.7 * (1, 3) + 0.3 * (2, 6) = (1.3, 3.9)
    out = G.cfg(Fixed(), 2.0, {"c": cond}, {"c": uncond}, rescale=0.7)(torch.zeros(1, 2), 1.0)
    torch.testing.assert_close(out, torch.tensor([[1.3, 3.9]]))
    full = G.cfg(Fixed(), 2.0, {"c": cond}, {"c": uncond}, rescale=1.0)(torch.zeros(1, 2), 1.0)
    torch.testing.assert_close(full.std(), cond.std())
    # per sample: each row rescaled to its own cond std
    g = torch.Generator().manual_seed(0)
    c2, u2 = torch.randn(3, 4, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    out2 = G.cfg(Fixed(), 5.0, {"c": c2}, {"c": u2}, rescale=1.0)(torch.zeros(3, 4, 4), 1.0)
    torch.testing.assert_close(out2.flatten(1).std(1), c2.flatten(1).std(1))
    with pytest.raises(ValueError, match="phi"):
        G.cfg(Fixed(), 2.0, {"c": cond}, {"c": uncond}, rescale=1.5)


def test_cfg_cond_errors_teach():
    toy = Toy()
    x = torch.zeros(1, 2)
    ctx_c, ctx_u = torch.zeros(1, 154, 8), torch.zeros(1, 77, 8)
    with pytest.raises(ValueError, match="'context'.*same number of chunks"):
        G.cfg(lambda x, s, **k: x, 3.0, {"context": ctx_c}, {"context": ctx_u})(x, 1.0)
    with pytest.raises(ValueError, match="same keys"):
        G.cfg(toy, 3.0, {"c": torch.zeros(1)}, {"c": torch.zeros(1), "y": torch.zeros(1)})(x, 1.0)
    with pytest.raises(ValueError, match="batch 1 or 1"):
        G.cfg(toy, 3.0, {"c": torch.zeros(3)}, {"c": torch.zeros(3)})(x, 1.0)


def test_cfg_forwards_wrapper_attributes_and_extra_args():
    toy = Toy()
    guided = G.cfg(toy, 3.0, {"c": torch.zeros(2)}, {"c": torch.zeros(2)})
    assert (guided.sigma_min, guided.sigma_max, guided.prediction) == (0.03, 14.6, "eps")
    mask = torch.ones(2, 3)
    guided(torch.zeros(2, 3), torch.ones(2), mask=mask, flag=True)
    extra = toy.batches[0][3]
    assert extra["mask"].shape == (4, 3) and extra["flag"] is True


def test_composable_and_prompts():
    toy = Toy()
    conds = [({"c": torch.tensor([2.0])}, 1.0), ({"c": torch.tensor([5.0])}, 0.5)]
    guided = G.composable(toy, 4.0, conds, {"c": torch.tensor([1.0])})
    out = guided(torch.zeros(1, 2), torch.tensor([2.0]))
    # u + sum_i w_i scale (c_i - u) = 1 + 1*4*(2-1) + 0.5*4*(5-1) = 13
    torch.testing.assert_close(out, torch.full((1, 2), 13.0))
    assert len(toy.batches) == 1 and toy.batches[0][0] == 3
    # one cond with weight 1 is plain CFG
    single = G.composable(Toy(), 4.0, conds[:1], {"c": torch.tensor([1.0])})(torch.zeros(1, 2), 2.0)
    plain = G.cfg(Toy(), 4.0, conds[0][0], {"c": torch.tensor([1.0])})(torch.zeros(1, 2), 2.0)
    torch.testing.assert_close(single, plain)
    with pytest.raises(ValueError, match="at least one"):
        G.composable(toy, 4.0, [], {"c": torch.zeros(1)})


def test_cfg_on_a_real_wrapper_guides_eps_identically():
    # for the eps wrapper, guiding x0 equals guiding eps: D = x - sigma eps is affine in eps
    from diffusekit.core.denoisers import EpsDenoiser
    from diffusekit.core.schedules import DiscreteSchedule
    sd = DiscreteSchedule.from_name()
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))

    def net(x_in, t, context):
        return x_in @ w + context

    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    ctx_c, ctx_u = torch.ones(2, 4), -torch.ones(2, 4)
    sigma = torch.tensor([2.0, 2.0])
    out = G.cfg(EpsDenoiser(net, sd), 6.0, {"context": ctx_c}, {"context": ctx_u})(x, sigma)
    x_in = x / math.sqrt(5)
    t = sd.sigma_to_t(sigma)
    eps = net(x_in, t, ctx_u) + 6.0 * (net(x_in, t, ctx_c) - net(x_in, t, ctx_u))
    torch.testing.assert_close(out, x - 2.0 * eps, rtol=1e-5, atol=1e-5)
