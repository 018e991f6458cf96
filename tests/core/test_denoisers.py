"""Parameterization wrappers: a perfect network gives back x0 exactly; scalings; discrete time mapping."""
import math

import pytest
import torch

from diffusekit.core import denoisers as D
from diffusekit.core import sigmas as S
from diffusekit.core.schedules import DiscreteSchedule, FlowSchedule

F64 = torch.float64


@pytest.fixture(scope="module")
def sd():
    return DiscreteSchedule.from_name("scaled_linear")


def _data(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 5, 5, generator=g, dtype=F64), torch.randn(b, 3, 5, 5, generator=g, dtype=F64)


def _col(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class Perfect:
    """A network that returns `target(x_in)`, recording its inputs."""

    def __init__(self, target):
        self.target, self.calls = target, []

    def __call__(self, x_in, t, **cond):
        self.calls.append((x_in, t, cond))
        return self.target(x_in)


@pytest.mark.parametrize("discrete", [True, False])
def test_eps_v_x0_wrappers_return_x0_from_a_perfect_network(sd, discrete):
    x0, eps = _data()
    sigma = torch.tensor([0.03, 0.7, 3.0, 14.0], dtype=F64)
    x = x0 + _col(sigma, x0) * eps                         # the VE view the samplers use
    a = _col((1 + sigma ** 2).rsqrt(), x0)                 # sqrt(abar)
    s = _col(sigma, x0) * a                                # sqrt(1 - abar)
    x_t = a * x0 + s * eps                                 # what a DDPM network is trained on
    schedule = sd if discrete else None
    targets = {D.EpsDenoiser: eps, D.VDenoiser: a * eps - s * x0, D.X0Denoiser: x0}
    for cls, target in targets.items():
        net = Perfect(lambda _x, target=target: target)
        den = cls(net, schedule)
        torch.testing.assert_close(den(x, sigma), x0, rtol=1e-12, atol=1e-12)
        x_in, t, _ = net.calls[0]
        torch.testing.assert_close(x_in, x_t, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(t, sd.sigma_to_t(sigma) if discrete else sigma.log() / 4)
        assert den.prediction == {D.EpsDenoiser: "eps", D.VDenoiser: "v", D.X0Denoiser: "x0"}[cls]


def test_edm_wrapper_returns_x0_and_table1_scalings():
    x0, eps = _data()
    sigma = torch.tensor([0.002, 0.5, 2.0, 80.0], dtype=F64)
    sd_ = 0.5
    den = D.EDMDenoiser(None, sigma_data=sd_)
    c_skip, c_out, c_in = den.scalings(sigma)
    # at sigma = sigma_data: c_skip = 1/2, c_out = sd / sqrt(2), c_in = 1 / (sd sqrt(2))
    assert float(c_skip[1]) == pytest.approx(0.5) and float(c_out[1]) == pytest.approx(sd_ / math.sqrt(2))
    assert float(c_in[1]) == pytest.approx(1 / (sd_ * math.sqrt(2)))
    x = x0 + _col(sigma, x0) * eps
    f_target = (x0 - _col(c_skip, x0) * x) / _col(c_out, x0)      # the EDM training target F
    net = Perfect(lambda _x: f_target)
    den.inner_model = net
    torch.testing.assert_close(den(x, sigma), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net.calls[0][1], sigma.log() / 4)
    assert (den.sigma_min, den.sigma_max, den.prediction) == (0.002, 80.0, "edm")


def test_flow_wrapper_returns_x0_from_a_perfect_network():
    x0, eps = _data()
    s = torch.tensor([0.05, 0.3, 0.8, 1.0], dtype=F64)
    x = (1 - _col(s, x0)) * x0 + _col(s, x0) * eps
    net = Perfect(lambda _x: eps - x0)                         # v = eps - x0
    den = D.FlowDenoiser(net, shift=3.0)
    torch.testing.assert_close(den(x, s), x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.calls[0][0], x)             # c_in = 1
    torch.testing.assert_close(net.calls[0][1], s * 1000)      # c_noise = s * multiplier
    assert den.sigma_max == 1.0 and den.sigma_min == pytest.approx(3e-3 / 1.002)
    assert den.prediction == "flow" and isinstance(den.schedule, FlowSchedule)
    noise, latent = torch.ones(1, 2), torch.zeros(1, 2)
    assert den.noise_scaling(0.25, noise, latent).tolist() == [[0.25, 0.25]]


def test_discrete_t_at_table_points_are_integer_steps(sd):
    steps = torch.tensor([0, 1, 10, 500, 998, 999])
    net = Perfect(lambda x: torch.zeros_like(x))
    den = D.EpsDenoiser(net, sd)
    x = torch.zeros(6, 1, dtype=F64)
    den(x, sd.sigmas[steps])
    torch.testing.assert_close(net.calls[0][1], steps.to(F64), rtol=0, atol=1e-9)
    # float32 sigmas (what samplers pass): within 1e-3 of a step, float32 time out
    den(x.float(), sd.sigmas[steps].float())
    t32 = net.calls[1][1]
    assert t32.dtype == torch.float32
    torch.testing.assert_close(t32, steps.float(), rtol=0, atol=1e-3)
    assert den.sigma_min == sd.sigma_min and den.sigma_max == sd.sigma_max
    assert float(den.t_to_sigma(torch.tensor(999.0, dtype=F64))) == pytest.approx(sd.sigma_max)


def test_v_and_eps_networks_that_agree_give_the_same_denoiser(sd):
    # any eps network f defines a v network g(x_t, t) = a f - s x0_hat(f); both wrappers must agree
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=F64)

    def eps_net(x_in, t, **_):
        return torch.einsum("ij,bj...->bi...", w, x_in) * (1 + _col(t, x_in) / 1000)

    def v_net(x_in, t, **_):
        sigma = sd.t_to_sigma(t)
        a, s = _col((1 + sigma ** 2).rsqrt(), x_in), _col(sigma * (1 + sigma ** 2).rsqrt(), x_in)
        e = eps_net(x_in, t)
        x0_hat = (x_in - s * e) / a
        return a * e - s * x0_hat

    x, _ = _data()
    sigma = torch.tensor([0.1, 1.0, 5.0, 14.0], dtype=F64)
    torch.testing.assert_close(D.VDenoiser(v_net, sd)(x, sigma), D.EpsDenoiser(eps_net, sd)(x, sigma),
                               rtol=1e-10, atol=1e-10)


def test_sigma_broadcast_cond_passing_and_dtype(sd):
    net = Perfect(lambda x: x)
    den = D.EpsDenoiser(net, sd)
    x = torch.ones(3, 2, dtype=torch.float16)
    ctx = torch.zeros(3, 7)
    out = den(x, 1.0, context=ctx)                              # python float: broadcast to (3,)
    assert out.dtype == torch.float16 and out.shape == (3, 2)
    assert net.calls[0][1].shape == (3,) and net.calls[0][2]["context"] is ctx
    # eps = x_in = x / sqrt(2): D = x - sigma * eps = 1 - 1/sqrt(2)
    assert float(out[0, 0]) == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        den(x, torch.ones(2))


def test_wrappers_are_modules_with_defaults():
    lin = torch.nn.Linear(2, 2)
    den = D.VDenoiser(lambda x, t: lin(x))
    assert den.sigma_min == D.EDM_SIGMA_MIN and den.sigma_max == D.EDM_SIGMA_MAX
    wrapped = D.EpsDenoiser(lin, None, sigma_min=0.1, sigma_max=10.0)
    assert list(wrapped.parameters())                           # the network is a registered submodule
    assert (wrapped.sigma_min, wrapped.sigma_max) == (0.1, 10.0)
    assert "continuous" in repr(wrapped)


def test_flow_sigmas():
    s = D.flow_sigmas(4, shift=3.0, dtype=F64)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64)
    torch.testing.assert_close(s, 3 * u / (1 + 2 * u))
    S.check_sigmas(s)
    # equal to ComfyUI's "simple" schedule over the shifted flow table when steps divides 1000
    torch.testing.assert_close(D.flow_sigmas(20, 3.0, dtype=F64),
                               S.get("simple", 20, schedule=FlowSchedule(3.0), dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(D.flow_sigmas(10), torch.linspace(1, 0, 11))
    for bad in [(0, 1.0), (5, 0.0)]:
        with pytest.raises(ValueError):
            D.flow_sigmas(*bad)



def test_flow_denoiser_time_conversions_are_its_schedules():
    """One home for the flow time map: the wrapper answers what its FlowSchedule answers."""
    den = D.FlowDenoiser(Perfect(lambda x: x), shift=3.0)
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0], dtype=F64)
    torch.testing.assert_close(den.t_to_sigma(t), den.schedule.t_to_sigma(t), rtol=0, atol=0)
    assert float(den.t_to_sigma(torch.tensor(500.0))) == pytest.approx(0.75)     # shift(0.5) with shift 3
    s = torch.tensor([0.1, 0.75], dtype=F64)
    torch.testing.assert_close(den.sigma_to_t(s), den.schedule.sigma_to_t(s), rtol=0, atol=0)
    assert (den.shift, den.multiplier) == (3.0, 1000.0)


def test_data_range_clips_the_x0_estimate_and_only_it():
    """data_range (Ho et al. 2020's clip_denoised): an eps network that is off by 0.1 at sigma 150 puts
    the x0 estimate 15 away; clipped, it lies in [-1, 1], equal to the unclipped estimate where that
    was inside."""
    ddpm = DiscreteSchedule.from_name("linear", beta_start=1e-4, beta_end=0.02)
    assert 150 < ddpm.sigma_max < 160                    # the DDPM schedule's top: 10x SD's 14.6
    x0, eps = _data()
    x0 = x0.clamp(-1, 1)
    sigma = torch.full((4,), 150.0, dtype=F64)
    x = x0 + _col(sigma, x0) * eps
    wrong = Perfect(lambda x_in: eps + 0.1)              # eps error 0.1 everywhere
    free = D.EpsDenoiser(wrong, ddpm)(x, sigma)
    assert torch.allclose(free, x0 - 15.0)               # x0 error = sigma * eps error
    clipped = D.EpsDenoiser(wrong, ddpm, data_range=(-1.0, 1.0))(x, sigma)
    assert clipped.min() >= -1 and clipped.max() <= 1
    assert torch.equal(clipped, free.clamp(-1, 1))
    right = D.EpsDenoiser(Perfect(lambda x_in: eps), ddpm, data_range=(-1.0, 1.0))(x, sigma)
    assert torch.allclose(right, x0)                     # a correct estimate inside the range is untouched
    assert "data_range=(-1.0, 1.0)" in repr(D.EpsDenoiser(wrong, ddpm, data_range=(-1.0, 1.0)))
    with pytest.raises(ValueError, match=r"data_range=\(1.0, -1.0\)"):
        D.EpsDenoiser(wrong, ddpm, data_range=(1.0, -1.0))
