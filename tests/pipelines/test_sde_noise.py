"""SDE noise as AUTOMATIC1111 and ComfyUI draw it (GenerationParams.sde_noise, pipelines/sde_noise.py).

The references are written here from the published algorithms: k-diffusion's BrownianTreeNoiseSampler /
BatchedBrownianTree over torchsde.BrownianTree (k_diffusion/sampling.py), built as A1111's
create_noise_sampler builds it (one tree per image seed, bounds from the schedule, tree on the latent's
device) or as ComfyUI's dpmpp_*sde build it (one CPU tree over the batch from the sampler seed), and
k-diffusion's sample_dpmpp_2m_sde / sample_dpmpp_sde loops in float32 tensor ops. The noise each sampler
call receives must equal the reference's value for value (tolerance 0); final latents agree with the
float32 reference loops to 1e-5 of their scale (our samplers compute coefficients in float64).
"""
import functools
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchsde

from diffusekit import GenerationParams
from diffusekit.core import noise as core_noise
from diffusekit.core import samplers
from diffusekit.core import sigmas as sigma_schedules
from diffusekit.core.mixture import GaussianMixture
from diffusekit.interfaces.cli import main as cli_main
from diffusekit.interfaces.cli import params_from_infotext
from diffusekit.interfaces.server.schemas import (Limits, RequestError, Txt2ImgRequest, to_generation_params,
                                                  validate_params)
from diffusekit.pipelines import sde_noise
from diffusekit.pipelines.infotext import parse_infotext, read_infotext

SMALL = dict(prompt="a red circle", width=32, height=32, steps=4, cfg_scale=5.0)
SAMPLER_IDS = {"DPM++ 2M SDE": "dpmpp_2m_sde", "DPM++ SDE": "dpmpp_sde"}

# the references query torchsde exactly as k-diffusion does, including the times just past the tree's
# rounded ends, where torchsde warns and clamps (ComfyUI #4645)
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


# ------------------------------------------------------------------ references (k-diffusion, as published)
class KDiffusionTreeNoise:
    """k-diffusion's BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed) (+ ComfyUI's cpu=True): t = sigma;
    the tree sorts (t0, t1) and starts from w0 = zeros_like(x); a list of seeds gives one torchsde tree of one
    image's shape per seed, an int one tree over the batch; a query returns
    sign * (W(later) - W(earlier)) / sqrt|t1 - t0| on the 0-d float32 sigma tensors."""

    def __init__(self, x, sigma_min, sigma_max, seed, cpu=False):
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        t0, t1, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w0 = torch.zeros_like(x)
        self.batched = isinstance(seed, list)
        if self.batched:
            w0 = w0[0]
        self.cpu = cpu
        put = (lambda t: t.cpu()) if cpu else (lambda t: t)
        self.trees = [torchsde.BrownianTree(put(t0), put(w0), put(t1), entropy=s)
                      for s in (seed if self.batched else [seed])]

    def __call__(self, sigma, sigma_next):
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        a, b, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        if self.cpu:
            w = torch.stack([tree(a.cpu().float(), b.cpu().float()).to(a.dtype).to(a.device) for tree in self.trees])
        else:
            w = torch.stack([tree(a, b) for tree in self.trees])
        w = w * (self.sign * sign)
        return (w if self.batched else w[0]) / (t1 - t0).abs().sqrt()


def a1111_reference(x, sigmas, seeds):
    """A1111 create_noise_sampler: sigmas[sigmas > 0].min(), sigmas.max(), the batch's image seeds."""
    return KDiffusionTreeNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=list(seeds))


def comfyui_reference(x, sigmas, seed):
    """ComfyUI dpmpp_*sde: BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=True)."""
    return KDiffusionTreeNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed, cpu=True)


@torch.no_grad()
def kd_dpmpp_2m_sde(model, x, sigmas, noise, eta=1.0):
    """k-diffusion sample_dpmpp_2m_sde (midpoint), float32 tensor ops."""
    s_in = x.new_ones([x.shape[0]])
    old, h_last, h = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old is not None:
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (h / h_last) * (denoised - old)
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
        old, h_last = denoised, h
    return x


@torch.no_grad()
def kd_dpmpp_sde(model, x, sigmas, noise, eta=1.0, r=0.5):
    """k-diffusion sample_dpmpp_sde, float32 tensor ops: noise at (sigma_fn(t), sigma_fn(s)) and
    (sigma_fn(t), sigma_fn(t_next)), t = -log sigma, s = t + r h."""
    s_in = x.new_ones([x.shape[0]])
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda s: s.log().neg())

    def ancestral(frm, to):
        up = min(to, eta * (to ** 2 * (frm ** 2 - to ** 2) / frm ** 2) ** 0.5)
        return (to ** 2 - up ** 2) ** 0.5, up

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        sd, su = ancestral(sigma_fn(t), sigma_fn(s))
        s_ = t_fn(sd)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(sigma_fn(t), sigma_fn(s)) * su
        denoised_2 = model(x_2, sigma_fn(s) * s_in)
        sd, su = ancestral(sigma_fn(t), sigma_fn(t_next))
        t_next_ = t_fn(sd)
        denoised_d = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(sigma_fn(t), sigma_fn(t_next)) * su
    return x


KD_LOOPS = {"dpmpp_2m_sde": kd_dpmpp_2m_sde, "dpmpp_sde": kd_dpmpp_sde}


def comfyui_sde_queries(sigmas, r=0.5):
    """The (sigma, sigma_next) pairs ComfyUI's half-log-SNR sample_dpmpp_sde asks its noise sampler for."""
    out = []
    for i in range(len(sigmas) - 1):
        if sigmas[i + 1] > 0:
            lam_s, lam_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            out += [(sigmas[i], (lam_s + r * (lam_t - lam_s)).neg().exp()), (sigmas[i], sigmas[i + 1])]
    return out


# ------------------------------------------------------------------ recording the pipeline's sampler calls
class Logged:
    """A noise sampler that keeps every answer."""

    def __init__(self, inner):
        self.inner, self.answers = inner, []

    def __call__(self, sigma, sigma_next):
        z = self.inner(sigma, sigma_next)
        self.answers.append(z.clone())
        return z


@pytest.fixture
def record(monkeypatch):
    """install(sid): the registry's sampler `sid` runs as before and each call is kept: denoiser, x, sigmas,
    knobs, the noise sampler it got (logged), and its result."""
    calls = []

    def install(sid):
        real = samplers.SAMPLERS[sid]

        @functools.wraps(real)                     # the pipeline reads the sampler's knobs from its signature
        def recorded(denoiser, x, sigmas, **kw):
            c = SimpleNamespace(denoiser=denoiser, x=x.clone(), sigmas=sigmas.clone(), real=real, noise=None,
                                knobs={k: v for k, v in kw.items() if k not in ("callback", "noise_sampler")},
                                has_noise_sampler="noise_sampler" in kw)
            if c.has_noise_sampler:
                kw = {**kw, "noise_sampler": Logged(kw["noise_sampler"])}
                c.noise = kw["noise_sampler"]
            c.out = real(denoiser, x, sigmas, **kw).clone()
            calls.append(c)
            return c.out

        monkeypatch.setitem(samplers.SAMPLERS, sid, recorded)
        return calls

    return install


def stream(noise, queries):
    return [noise(a, b).clone() for a, b in queries]


def assert_same_stream(got, want):
    assert len(got) == len(want) > 0
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and torch.equal(g, w), k          # tolerance 0


# ------------------------------------------------------------------ A1111
@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "DPM++ SDE"])
def test_a1111_mode_is_k_diffusion_fed_by_a1111s_torchsde_trees(sd1_pipe, record, sampler):
    calls = record(SAMPLER_IDS[sampler])
    r = sd1_pipe.generate(GenerationParams(seed=21, batch_size=2, sampler_name=sampler, sde_noise="a1111", **SMALL))
    (c,) = calls
    assert torch.equal(c.out.cpu(), r.latents)
    # the k-diffusion loop, fed by A1111's trees (seeds = the batch's image seeds 21, 22)
    ref = Logged(a1111_reference(c.x, c.sigmas, [21, 22]))
    expected = KD_LOOPS[SAMPLER_IDS[sampler]](c.denoiser, c.x, c.sigmas, ref)
    assert_same_stream(c.noise.answers, ref.answers)                   # the same noise, value for value
    scale = float(expected.abs().max())
    assert float((c.out - expected).abs().max()) <= 1e-5 * scale       # float64 vs float32 coefficients
    # a different noise source shows: our default tree gives another image
    default = c.real(c.denoiser, c.x, c.sigmas, **c.knobs)
    assert float((default - expected).abs().max()) > 1e-2 * scale


def test_a1111_batch_equals_single_runs(sd1_pipe, record):
    calls = record("dpmpp_2m_sde")
    p = GenerationParams(seed=30, batch_size=2, sampler_name="DPM++ 2M SDE", sde_noise="a1111", **SMALL)
    batch = sd1_pipe.generate(p)
    singles = [sd1_pipe.generate(p.copy(seed=30 + i, batch_size=1)) for i in range(2)]
    for i, single in enumerate(singles):
        # each image's noise is its own tree's, whatever the batch (tolerance 0) ...
        assert_same_stream([z[i:i + 1] for z in calls[0].noise.answers], calls[1 + i].noise.answers)
        # ... so the images agree up to the UNet's batch-size rounding (a pixel may move by one level)
        diff = np.abs(np.asarray(single.images[0], np.int16) - np.asarray(batch.images[i], np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01, i
        assert torch.allclose(single.latents[0], batch.latents[i], rtol=0, atol=1e-5 * float(batch.latents.abs().max()))


def test_a1111_img2img_tree_spans_the_whole_schedule(sd1_pipe, record):
    """A1111 bounds the tree by the full `steps` schedule even though img2img runs only its tail; ComfyUI by
    the sigmas it samples."""
    calls = record("dpmpp_2m_sde")
    sd1_pipe.generate(GenerationParams(seed=4, sampler_name="DPM++ 2M SDE", **SMALL))     # the full schedule
    full = calls[0].sigmas
    init = sd1_pipe.generate(GenerationParams(seed=9, **SMALL)).images[0]
    common = dict(seed=5, sampler_name="DPM++ 2M SDE", init_images=[init], denoising_strength=0.5, **SMALL)
    sd1_pipe.generate(GenerationParams(sde_noise="a1111", **common))
    sd1_pipe.generate(GenerationParams(sde_noise="comfyui", **common))
    a1111, comfy = calls[1], calls[2]
    assert len(a1111.sigmas) < len(full) and float(a1111.sigmas[0]) < float(full[0])
    queries = list(zip(a1111.sigmas[:-2], a1111.sigmas[1:-1]))
    assert_same_stream(a1111.noise.answers, stream(a1111_reference(a1111.x, full, [5]), queries))
    assert_same_stream(comfy.noise.answers, stream(comfyui_reference(comfy.x, comfy.sigmas, 5), queries))
    assert not torch.equal(a1111.noise.answers[0], comfy.noise.answers[0])


# ------------------------------------------------------------------ ComfyUI
@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "DPM++ SDE"])
def test_comfyui_mode_is_one_cpu_tree_over_the_batch(sd1_pipe, record, sampler):
    calls = record(SAMPLER_IDS[sampler])
    p = GenerationParams(seed=21, batch_size=2, sampler_name=sampler, sde_noise="comfyui", **SMALL)
    batch = sd1_pipe.generate(p)
    c = calls[0]
    sig = c.sigmas
    if sampler == "DPM++ SDE":
        queries = comfyui_sde_queries(sig)
    else:
        queries = list(zip(sig[:-2], sig[1:-1]))
    assert_same_stream(c.noise.answers, stream(comfyui_reference(c.x, sig, 21), queries))
    if sampler == "DPM++ 2M SDE":
        expected = kd_dpmpp_2m_sde(c.denoiser, c.x, sig, comfyui_reference(c.x, sig, 21))
        assert float((c.out - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    # image 1 shares the batch's tree (seeded 21), so it is not the single image of seed 22
    second = sd1_pipe.generate(p.copy(seed=22, batch_size=1))
    assert not torch.equal(calls[1].noise.answers[0][0], c.noise.answers[0][1])
    assert not np.array_equal(np.asarray(second.images[0]), np.asarray(batch.images[1]))


def test_one_image_on_the_cpu_draws_the_same_in_both_modes(sd1_pipe):
    """torchsde seeds each tree node alike, so for one image A1111's per-image tree and ComfyUI's batch tree
    hold the same values (txt2img: same bounds too)."""
    common = dict(seed=8, sampler_name="DPM++ 2M SDE", **SMALL)
    a = sd1_pipe.generate(GenerationParams(sde_noise="a1111", **common))
    b = sd1_pipe.generate(GenerationParams(sde_noise="comfyui", **common))
    assert torch.equal(a.latents, b.latents)


def test_dpmpp_sde_query_times_follow_each_tool():
    sig = torch.tensor([14.614641189575195, 4.0, 0.5, 0.0292, 0.0])
    mid = float(torch.exp(torch.tensor(0.5 * (np.log(14.614641189575195) + np.log(4.0)))))   # ours, float64
    kd = sde_noise.DpmppSdeTimes(sig, "a1111")
    comfy = sde_noise.DpmppSdeTimes(sig, "comfyui")
    t, t_next = sig[0].log().neg(), sig[1].log().neg()
    kd_mid = float((t + (t_next - t) * 0.5).neg().exp())
    assert kd(float(sig[0]), mid) == (float(t.neg().exp()), kd_mid)
    assert kd(float(sig[0]), float(sig[1])) == (float(t.neg().exp()), float(t_next.neg().exp()))
    assert float(t.neg().exp()) != float(sig[0])                       # 14.614640 vs 14.614641: an ulp apart
    assert comfy(float(sig[0]), mid) == (float(sig[0]), kd_mid)
    assert comfy(float(sig[0]), float(sig[1])) == (float(sig[0]), float(sig[1]))
    assert kd(3.0, 2.0) == (3.0, 2.0)                                   # not a step of the schedule: unchanged


# ------------------------------------------------------------------ DPM++ SDE's r, against k-diffusion itself
WORLD16 = GaussianMixture.example(dim=16, dtype=torch.float32)


def _r_case(seed=3):
    sig = sigma_schedules.get("karras", 8, sigma_min=0.0292, sigma_max=14.6146)       # float32, as the tools
    return torch.randn(2, 16, generator=torch.Generator().manual_seed(seed)) * sig[0], sig


@pytest.mark.parametrize("r", [0.3, 0.7])
def test_dpmpp_sde_r_reaches_a1111s_tree(k_sampling, r):
    """A1111 runs k-diffusion's sample_dpmpp_sde(r=...) on create_noise_sampler's trees (seeds 21, 22). With r
    passed to the query times, ours on a1111_noise_sampler(r=r) gets the same noise, value for value, and the
    same result (float64 vs float32 coefficients: 1e-5); built at r = 1/2 (the old bug) the noise differs."""
    x, sig = _r_case()
    theirs = Logged(k_sampling.BrownianTreeNoiseSampler(x, sig[sig > 0].min(), sig.max(), seed=[21, 22]))
    want = k_sampling.sample_dpmpp_sde(WORLD16, x, sig, r=r, noise_sampler=theirs, disable=True)
    ours = Logged(sde_noise.a1111_noise_sampler(x, sig, [21, 22], "dpmpp_sde", r=r))
    got = samplers.SAMPLERS["dpmpp_sde"](WORLD16, x, sig, r=r, noise_sampler=ours)
    assert_same_stream(ours.answers, theirs.answers)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    at_half = Logged(sde_noise.a1111_noise_sampler(x, sig, [21, 22], "dpmpp_sde"))
    samplers.SAMPLERS["dpmpp_sde"](WORLD16, x, sig, r=r, noise_sampler=at_half)
    assert not torch.equal(at_half.answers[0], theirs.answers[0])


@pytest.mark.parametrize("r", [0.3, 0.7])
def test_dpmpp_sde_r_reaches_comfyuis_tree(r):
    x, sig = _r_case()
    ours = Logged(sde_noise.comfyui_noise_sampler(x, sig, 21, "dpmpp_sde", r=r))
    samplers.SAMPLERS["dpmpp_sde"](WORLD16, x, sig, r=r, noise_sampler=ours)
    assert_same_stream(ours.answers, stream(comfyui_reference(x, sig, 21), comfyui_sde_queries(sig, r)))


# ------------------------------------------------------------------ churn noise as A1111 draws it
CHURN = dict(s_churn=3.0, s_tmin=0.5, s_tmax=5.0)    # a window: some of SMALL's 4 steps churn, some do not


def test_a1111_churn_noise_is_k_diffusions_randn_on_every_step(sd1_pipe, record, k_randn, k_sampling):
    """A1111 runs k-diffusion's sample_euler / heun / dpm_2, whose randn_like (every step, churning or not)
    A1111 routes to the image's generator. In "a1111" mode we draw the same: k-diffusion's loop fed by the
    images' generators (seeds 21, 22, after the initial noise) gives our latent; the default mode does not."""
    calls = record("euler")
    p = GenerationParams(seed=21, batch_size=2, sampler_name="Euler", sde_noise="a1111", **CHURN, **SMALL)
    result = sd1_pipe.generate(p)
    c = calls[0]
    assert c.has_noise_sampler and {k: c.knobs[k] for k in CHURN} == CHURN
    gens = core_noise.generators_for_seeds([21, 22])
    assert torch.allclose(core_noise.randn(c.x.shape, gens) * c.sigmas[0], c.x)    # A1111's initial noise
    k_randn(lambda like: core_noise.randn_like(like, gens))
    want = k_sampling.sample_euler(c.denoiser, c.x, c.sigmas, disable=True, **CHURN)
    scale = float(want.abs().max())
    assert float((c.out - want).abs().max()) <= 1e-5 * scale
    assert len(c.noise.answers) == len(c.sigmas) - 1                  # a draw on every step
    assert "SDE noise: a1111" in result.infotexts[0]
    default = sd1_pipe.generate(p.copy(sde_noise="diffusekit"))
    assert float((calls[1].out - want).abs().max()) > 1e-2 * scale
    assert not calls[1].has_noise_sampler and "SDE noise" not in default.infotexts[0]
    # ComfyUI's own sample_euler draws only on the steps that churn: its mode is our default
    comfy = sd1_pipe.generate(p.copy(sde_noise="comfyui"))
    assert torch.equal(comfy.latents, default.latents) and "SDE noise" not in comfy.infotexts[0]


def test_a1111_mode_without_churn_changes_nothing(sd1_pipe):
    common = dict(seed=5, sampler_name="Heun", **SMALL)
    a = sd1_pipe.generate(GenerationParams(sde_noise="a1111", **common))
    b = sd1_pipe.generate(GenerationParams(**common))
    assert torch.equal(a.latents, b.latents) and "SDE noise" not in a.infotexts[0]


# ------------------------------------------------------------------ default, errors, infotext, interfaces
PINNED = {  # uint8 pixel sums and latent sums of seed 11, 12 before sde_noise existed (default mode)
    "DPM++ 2M SDE": ((290628, 280213), (-266.4361637234688, -413.6048097014427)),
    "DPM++ SDE": ((292194, 285450), (-233.8001625686884, -366.09795212745667)),
}


@pytest.mark.parametrize("sampler", sorted(PINNED))
def test_default_mode_is_unchanged(sd1_pipe, record, sampler):
    calls = record(SAMPLER_IDS[sampler])
    r = sd1_pipe.generate(GenerationParams(seed=11, batch_size=2, sampler_name=sampler, **SMALL))
    assert not calls[0].has_noise_sampler                               # the sampler's own Brownian tree
    pixel_sums, latent_sums = PINNED[sampler]
    # the fp32 GEMMs' summation order differs between CPU kinds and GEMM libraries (MKL, oneDNN): a pixel or
    # two may round to the next uint8 value (seen: one sum 1 off the pin; the two seeds are 1e4 apart)
    got = [int(np.asarray(im, dtype=np.int64).sum()) for im in r.images]
    assert all(abs(g - p) <= 8 for g, p in zip(got, pixel_sums)), (got, pixel_sums)
    # 1e-5: the same rounding (an AMD EPYC with MKL: 1.7e-6 off the pin)
    assert np.allclose([float(z.double().sum()) for z in r.latents], latent_sums, rtol=1e-5, atol=0)
    assert "SDE noise" not in r.infotexts[0]


def test_bad_mode_names_the_valid_ones(sd1_pipe):
    with pytest.raises(ValueError) as e:
        sd1_pipe.generate(GenerationParams(sde_noise="k-diffusion", sampler_name="DPM++ 2M SDE", **SMALL))
    assert "sde_noise='k-diffusion'" in str(e.value)
    assert all(f"'{m}'" in str(e.value) for m in ("diffusekit", "a1111", "comfyui"))


def test_without_torchsde_the_error_says_how_to_install_it(sd1_pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)                  # `import torchsde` now fails
    with pytest.raises(sde_noise.TorchsdeMissingError, match="pip install torchsde") as e:
        sd1_pipe.generate(GenerationParams(sde_noise="a1111", sampler_name="DPM++ SDE", **SMALL))
    assert isinstance(e.value, RuntimeError)                            # the CLI prints it as one line
    sd1_pipe.generate(GenerationParams(sde_noise="a1111", sampler_name="Euler a", **SMALL))   # no SDE: no need
    sd1_pipe.generate(GenerationParams(sampler_name="DPM++ SDE", **SMALL))                  # default: no need


def test_infotext_carries_the_mode_and_reproduces_the_image(sd1_pipe):
    p = GenerationParams(seed=14, sampler_name="DPM++ 2M SDE", sde_noise="comfyui", **SMALL)
    first = sd1_pipe.generate(p)
    text = first.infotexts[0]
    assert "SDE noise: comfyui" in text
    fields, notes = params_from_infotext(parse_infotext(text))
    assert fields["sde_noise"] == "comfyui" and notes == []
    again = sd1_pipe.generate(GenerationParams(**fields))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))
    other = sd1_pipe.generate(p.copy(sampler_name="Euler a"))           # no Brownian noise: not written
    assert "SDE noise" not in other.infotexts[0]


def test_cli_flag_and_a1111_note(tiny_sd1, tmp_path, capsys):
    argv = ["generate", "a red circle", "--model", str(tiny_sd1), "--seed", "3", "--sampler", "DPM++ 2M SDE",
            "--width", "32", "--height", "32", "--steps", "3", "--out", str(tmp_path / "a")]
    assert cli_main(argv + ["--sde-noise", "a1111"]) == 0
    path = capsys.readouterr().out.split()[0]
    assert "SDE noise: a1111" in read_infotext(path)
    assert cli_main(["generate", "--from", path, "--model", str(tiny_sd1), "--out", str(tmp_path / "b")]) == 0
    again = capsys.readouterr().out.split()[0]
    assert np.array_equal(np.asarray(read_image(again)), np.asarray(read_image(path)))
    with pytest.raises(SystemExit):
        cli_main(argv + ["--sde-noise", "k-diffusion"])
    assert "a1111" in capsys.readouterr().err
    a1111_text = ("x\nSteps: 3, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 32x32, "
                  "RNG: CPU, Version: v1.10.1")
    _, notes = params_from_infotext(parse_infotext(a1111_text))
    assert any("--sde-noise a1111" in n for n in notes)


def read_image(path):
    from PIL import Image
    with Image.open(path) as im:
        return im.copy()


def test_server_request_field():
    assert to_generation_params(Txt2ImgRequest(sde_noise="a1111")).sde_noise == "a1111"
    assert to_generation_params(Txt2ImgRequest()).sde_noise == "diffusekit"
    with pytest.raises(RequestError, match="sde_noise='x'"):
        validate_params(to_generation_params(Txt2ImgRequest(sde_noise="x", steps=4)), Limits())
