"""The exact world (diffusekit.core.mixture) checked against independent numerics from scipy.

- `denoise` is E[x0 | x]: in 1-D both integrals of Bayes' rule are done by adaptive quadrature.
- `ode_derivative` is (x - D) / sigma, the probability-flow ODE of Karras et al. 2022, eq. 4.
- `reference_solution` (RK4, 4000 Karras-spaced steps) agrees with scipy's DOP853 at rtol 1e-12 to 1e-9.
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from diffusekit.core.mixture import GaussianMixture, reference_solution


pytestmark = pytest.mark.usefixtures("one_thread")


def _world_1d() -> GaussianMixture:
    return GaussianMixture(means=torch.tensor([[-2.0], [0.5], [3.0]], dtype=torch.float64),
                           stds=torch.tensor([0.4, 0.7, 0.25], dtype=torch.float64),
                           weights=torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64))


def _posterior_mean_by_quadrature(world: GaussianMixture, x: float, sigma: float) -> float:
    """E[x0 | x] = int x0 p(x0) N(x; x0, sigma^2) dx0 / int p(x0) N(x; x0, sigma^2) dx0, by scipy.quad."""
    mus, sds, ws = world.means[:, 0].tolist(), world.stds.tolist(), world.weights.tolist()

    def lik(x0):
        return math.exp(-0.5 * ((x - x0) / sigma) ** 2)   # the 1/(sigma sqrt(2 pi)) cancels in the ratio

    num = den = 0.0
    for m, s, w in zip(mus, sds, ws):   # one prior component at a time, over its own +-12 std window
        def prior_k(u, m=m, s=s, w=w):
            return w / (s * math.sqrt(2 * math.pi)) * math.exp(-0.5 * ((u - m) / s) ** 2)

        lo, hi = m - 12 * s, m + 12 * s
        kw = dict(epsabs=0, epsrel=1e-12, limit=200, points=[min(max(x, lo), hi)])
        num += integrate.quad(lambda u: u * prior_k(u) * lik(u), lo, hi, **kw)[0]
        den += integrate.quad(lambda u: prior_k(u) * lik(u), lo, hi, **kw)[0]
    return num / den


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 4.0, 30.0])
def test_denoise_is_bayes_posterior_mean_in_1d(sigma):
    world = _world_1d()
    xs = [-3.0, -1.1, 0.0, 0.9, 2.2, 3.5]
    got = world.denoise(torch.tensor(xs, dtype=torch.float64).view(-1, 1), sigma)[:, 0].tolist()
    want = [_posterior_mean_by_quadrature(world, x, sigma) for x in xs]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_denoise_limits_and_dtype():
    world = GaussianMixture.example()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # sigma -> inf: the prior mean; sigma -> 0 on a component's mean: that mean
    prior_mean = (world.weights[:, None] * world.means).sum(0)
    torch.testing.assert_close(world.denoise(x, 1e6), prior_mean.expand(8, 2), rtol=0, atol=1e-9)
    torch.testing.assert_close(world.denoise(world.means, 1e-6), world.means, rtol=0, atol=1e-9)
    # a per-row sigma equals row-by-row calls; the result keeps x's dtype
    sig = torch.linspace(0.1, 5, 8, dtype=torch.float64)
    rows = torch.cat([world.denoise(x[i:i + 1], float(sig[i])) for i in range(8)])
    torch.testing.assert_close(world.denoise(x, sig), rows, rtol=0, atol=1e-14)
    assert world.denoise(x.float(), 1.0).dtype == torch.float32


def test_ode_derivative_is_x_minus_d_over_sigma():
    world = GaussianMixture.example()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5
    for sigma in [0.01, 0.7, 12.0]:
        torch.testing.assert_close(world.ode_derivative(x, sigma), (x - world.denoise(x, sigma)) / sigma,
                                   rtol=1e-10, atol=1e-12)
    assert torch.equal(world.ode_derivative(x, 0.0), torch.zeros_like(x))


def _scipy_flow(world: GaussianMixture, x: torch.Tensor, sigma_max: float, sigma_end: float) -> torch.Tensor:
    """The probability-flow ODE in numpy, integrated by DOP853 at rtol = atol = 1e-12 (one system, all rows)."""
    mu, sd, wt = world.means.numpy(), world.stds.numpy(), world.weights.numpy()
    d = mu.shape[1]

    def f(sigma, y):
        pts = y.reshape(-1, 1, d)                                   # (B, 1, D)
        v = sd ** 2 + sigma ** 2                                    # (K,)
        logp = np.log(wt) - 0.5 * ((pts - mu) ** 2).sum(-1) / v - 0.5 * d * np.log(2 * np.pi * v)
        r = np.exp(logp - logp.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)                                # (B, K)
        return (sigma * r[..., None] * (pts - mu) / v[:, None]).sum(1).ravel()

    sol = integrate.solve_ivp(f, (sigma_max, sigma_end), x.numpy().ravel(), method="DOP853",
                              rtol=1e-12, atol=1e-12)
    assert sol.success, sol.message
    return torch.from_numpy(sol.y[:, -1].reshape(x.shape))


@pytest.mark.parametrize("sigma_end", [0.0, 0.5])
def test_reference_solution_matches_scipy_dop853(sigma_end):
    world = GaussianMixture.example()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80.0
    ours = reference_solution(world, x, 80.0, sigma_end=sigma_end)
    torch.testing.assert_close(ours, _scipy_flow(world, x, 80.0, sigma_end), rtol=0, atol=1e-9)


def test_sample_reproduces_weights_and_components():
    world = GaussianMixture.example()
    n = 20000
    x0, comp = world.sample(n, generator=torch.Generator().manual_seed(4))
    assert x0.shape == (n, 2) and x0.dtype == torch.float64
    freq = torch.bincount(comp, minlength=3).double() / n
    # binomial standard error sqrt(w (1 - w) / n) <= 0.0036: 5 standard errors
    torch.testing.assert_close(freq, world.weights, rtol=0, atol=0.018)
    for k in range(3):
        pts = x0[comp == k]
        se = float(world.stds[k]) / math.sqrt(len(pts))
        torch.testing.assert_close(pts.mean(0), world.means[k], rtol=0, atol=5 * se)
        torch.testing.assert_close(pts.std(0), world.stds[k].expand(2), rtol=0.05, atol=0)
    # the components are well separated: component_of recovers the label almost always
    assert (world.component_of(x0) == comp).double().mean() > 0.995


def test_invalid_worlds_are_rejected():
    means = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="stds must be > 0"):
        GaussianMixture(means, torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.5, 0.5]).double())
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(means, torch.ones(2, dtype=torch.float64), torch.tensor([0.5, 0.6], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        GaussianMixture(means, torch.ones(3, dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64))
