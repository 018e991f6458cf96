"""KSampler's arithmetic as ComfyUI's: schedules, noise, the start at sigma_max, integer timesteps,
KSamplerAdvanced hand-over, batches, and the area-weighted conditioning average."""
import pytest
import torch

from diffusekit.core import sigmas as sigma_schedules
from diffusekit.graph.sampling import (SCHEDULERS, ConditionedDenoiser, calculate_sigmas, ksample, prepare_noise,
                                       sampler_names)
from diffusekit.graph.values import ModelRef

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(graph_models):
    from diffusekit import Pipeline
    return Pipeline.from_pretrained(graph_models / "tiny.safetensors")


@pytest.fixture(scope="module")
def conds(pipe):
    enc = pipe.text
    c = enc.encode_chunks(enc.chunks("a red circle"))
    u = enc.encode_chunks(enc.chunks(""))
    return [[c.context, {"pooled_output": None}]], [[u.context, {"pooled_output": None}]]


def test_schedules_follow_comfyui_set_steps(pipe):
    s = calculate_sigmas(pipe, "euler", "normal", 20)
    assert len(s) == 21 and float(s[-1]) == 0
    assert float(s[0]) == pytest.approx(pipe.schedule.sigma_max, rel=1e-6)
    assert float(s[19]) == pytest.approx(pipe.schedule.sigma_min, rel=1e-6)
    half = calculate_sigmas(pipe, "euler", "karras", 10, denoise=0.5)           # int(10 / 0.5) = 20 steps, last 11
    assert torch.equal(half, calculate_sigmas(pipe, "euler", "karras", 20)[-11:])
    two = calculate_sigmas(pipe, "dpm_2", "karras", 10)                          # 11 steps, penultimate dropped
    eleven = sigma_schedules.get("karras", 11, schedule=pipe.schedule)
    assert len(two) == 11 and torch.equal(two, torch.cat([eleven[:-2], eleven[-1:]]))
    assert calculate_sigmas(pipe, "euler", "normal", 10, denoise=0.0).numel() == 0


def test_noise_is_one_cpu_generator_for_the_batch():
    latent = torch.zeros(2, 4, 8, 8)
    n = prepare_noise(latent, 42)
    assert torch.equal(n, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(42)))
    assert torch.equal(prepare_noise(latent[:1], 42)[0], n[0])                 # row 0 = the single image
    assert torch.equal(prepare_noise(latent[:1], 42, batch_index=[1])[0], n[1])


class Spy:
    """Records the UNet's inputs (x, timesteps) of every call."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(lambda m, args: self.calls.append(
            (args[0].detach().clone(), args[1].detach().clone())))

    def close(self):
        self.handle.remove()


def test_the_unet_sees_unit_noise_first_and_integer_timesteps(pipe, conds):
    """ComfyUI starts at noise * sqrt(1 + sigma_max^2) when sigma_0 is the model's sigma_max, so the UNet's
    first input x / sqrt(1 + sigma^2) is the seed's unit noise; timesteps are nearest integers."""
    pos, neg = conds
    spy = Spy(pipe.unet)
    try:
        ksample(ModelRef(pipe, "tiny"), 7, 4, 5.0, "euler", "karras", pos, neg, {"samples": torch.zeros(1, 4, 4, 4)})
    finally:
        spy.close()
    assert len(spy.calls) == 4                                 # cond + uncond in one UNet call per step
    x_in, t = spy.calls[0]
    noise = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(x_in[:1], noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_in[1:], noise, rtol=1e-5, atol=1e-5)
    assert t.tolist() == [999.0, 999.0]
    assert all(bool((tt == tt.round()).all()) for _, tt in spy.calls)


def test_two_advanced_samplers_in_sequence_equal_one_run(pipe, conds):
    """KSamplerAdvanced 0..k with leftover noise, then k..end without adding noise, is the same Euler
    trajectory as one KSampler over all steps (same seed)."""
    pos, neg = conds
    model, empty = ModelRef(pipe, "tiny"), {"samples": torch.zeros(1, 4, 4, 4)}
    whole = ksample(model, 3, 8, 4.0, "euler", "normal", pos, neg, empty)
    first = ksample(model, 3, 8, 4.0, "euler", "normal", pos, neg, empty, start_step=0, last_step=3)
    second = ksample(model, 3, 8, 4.0, "euler", "normal", pos, neg, first, disable_noise=True, start_step=3,
                     last_step=10000)
    torch.testing.assert_close(second["samples"], whole["samples"], rtol=1e-5, atol=1e-5)
    early = ksample(model, 3, 8, 4.0, "euler", "normal", pos, neg, empty, start_step=0, last_step=3,
                    force_full_denoise=True)
    assert not torch.allclose(early["samples"], first["samples"])           # the end set to 0: denoised there
    untouched = ksample(model, 3, 8, 4.0, "euler", "normal", pos, neg, first, start_step=8)
    assert torch.equal(untouched["samples"], first["samples"])


def test_image_0_of_a_batch_is_the_single_image(pipe, conds):
    pos, neg = conds
    model = ModelRef(pipe, "tiny")
    one = ksample(model, 11, 3, 4.0, "euler", "normal", pos, neg, {"samples": torch.zeros(1, 4, 4, 4)})
    two = ksample(model, 11, 3, 4.0, "euler", "normal", pos, neg, {"samples": torch.zeros(2, 4, 4, 4)})
    torch.testing.assert_close(two["samples"][:1], one["samples"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(two["samples"][0], two["samples"][1])


class ContextMean:
    """A toy denoiser: the x0 prediction is the context's mean everywhere (so entries are told apart)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, context, **_):
        self.calls += 1
        return context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).expand_as(x).clone()


def test_area_entries_are_averaged_with_feathered_weights(pipe):
    full = torch.full((1, 77, 8), 1.0)
    box = torch.full((1, 77, 8), 3.0)
    neg = torch.full((1, 77, 8), -2.0)
    inner = ContextMean()
    branches = [[[full, {}], [box, {"area": (64, 64, 0, 0), "strength": 1.0}]], [[neg, {}]]]
    d = ConditionedDenoiser(inner, branches, pipe, 4, (128, 128))              # 32x32 latent, box 16x16 top-left
    x = torch.zeros(2, 4, 32, 32)
    out = d(x, torch.ones(2), torch.tensor([0.0, 1.0]))
    assert inner.calls == 2                                     # full-area cond + uncond batched, box on its own
    torch.testing.assert_close(out[0, :, 0, 0], torch.full((4,), 2.0))          # inside, away from inner edges
    torch.testing.assert_close(out[0, :, 20:, 20:], torch.full((4, 12, 12), 1.0))   # outside the box
    w = 1 / 8                                                   # the box's last row fades to 1/8 of its weight
    torch.testing.assert_close(out[0, 0, 15, 0], torch.tensor((1 + 3 * w) / (1 + w)))
    torch.testing.assert_close(out[1], torch.full((4, 32, 32), -2.0))             # the negative ignores the box


@pytest.mark.parametrize("name", sampler_names())
def test_every_listed_sampler_runs(pipe, conds, name):
    pos, neg = conds
    out = ksample(ModelRef(pipe, "tiny"), 5, 4, 3.0, name, "karras", pos, neg, {"samples": torch.zeros(1, 4, 4, 4)})
    assert out["samples"].shape == (1, 4, 4, 4) and torch.isfinite(out["samples"]).all()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_listed_scheduler_runs(pipe, conds, scheduler):
    pos, neg = conds
    s = calculate_sigmas(pipe, "euler", scheduler, 6)
    assert float(s[-1]) == 0 and bool((s[1:] < s[:-1]).all())
    out = ksample(ModelRef(pipe, "tiny"), 5, 6, 3.0, "euler", scheduler, pos, neg, {"samples": torch.zeros(1, 4, 4, 4)})
    assert torch.isfinite(out["samples"]).all()


def test_prompt_weights_interpolate_from_the_empty_prompt_as_comfyui(pipe):
    """(word:1.5): that token's state is empty + 1.5 (state - empty), the rest untouched; [word] is text."""
    from diffusekit.graph.nodes.loaders import encode_comfy
    from diffusekit.pipelines import prompts as P
    enc = pipe.text
    weighted = encode_comfy(enc, "a (red:1.5) circle").context
    plain = encode_comfy(enc, "a red circle").context
    empty = enc.encode_chunks([P.empty_chunk()]).context
    red = 1 + enc.chunks("a")[0].tokens.index(P.EOS_ID)               # BOS, "a", then "red"
    expected = plain.clone()
    expected[0, red] = empty[0, red] + 1.5 * (plain[0, red] - empty[0, red])
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weighted, plain)
    bracket = encode_comfy(enc, "a [red] circle")                     # ComfyUI: brackets are plain text
    assert all(w == 1.0 for c in enc.chunks(r"a \[red\] circle") for w in c.weights)
    torch.testing.assert_close(bracket.context, enc.encode_chunks(enc.chunks(r"a \[red\] circle")).context)


def test_ksampler_refuses_a_flow_model_instead_of_sampling_it_as_eps():
    from diffusekit import Pipeline
    from diffusekit.graph.sampling import comfy_denoiser
    with pytest.raises(ValueError, match="'flow' model"):
        comfy_denoiser(Pipeline.from_pretrained("shapes-flow"))
