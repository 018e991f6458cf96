"""The KSampler graph on a tiny diffusers-made model (diffusers' StableDiffusionPipeline saved with
save_pretrained: tests/pipelines/test_parity_diffusers.py builds it) against diffusers' own denoising loop.

ComfyUI's ddim_uniform schedule at 10 steps is the table's sigmas at t = 901, 801, ..., 1, exactly what
diffusers' EulerDiscreteScheduler uses with "leading" spacing and steps_offset 1, and at integer timesteps
ComfyUI's nearest-timestep UNet call (quantize=True) and diffusers' timesteps coincide; Euler steps, CFG and
the final VAE decode are then the same arithmetic. Their starts differ by convention: ComfyUI starts at
noise * sigma_0 (sigma_0 = sigma(901) is below the model's sigma_max, so no sqrt(1 + sigma^2)), diffusers at
latents * init_noise_sigma = latents * sqrt(sigma_0^2 + 1); the same start is handed over by scaling.
Measured here: the final latents agree to 6.4e-7 of their scale, the decoded images to 6e-8.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from diffusekit.graph import Environment
from diffusekit.graph.executor import RunContext
from diffusekit.graph.nodes.latent import ksampler, vae_decode
from diffusekit.graph.nodes.loaders import checkpoint_loader, clip_text_encode
from diffusekit.graph.sampling import calculate_sigmas, prepare_noise

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "_graph_parity_pipes", Path(__file__).parents[1] / "pipelines" / "test_parity_diffusers.py")
_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_parity)
pytestmark = [_parity.pytestmark, pytest.mark.usefixtures("one_thread")]
pipes = _parity.pipes                          # the module-scoped (diffusers pipeline, our pipeline) fixture

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a red circle on a blue square", "blurry", 42, 10, 5.0, 32


def test_ksampler_ddim_uniform_euler_matches_diffusers_leading_euler(pipes, tmp_path):
    ref, ours = pipes
    env = Environment(output_dir=tmp_path, input_dir=tmp_path, temp_dir=tmp_path,   # the loaded pipeline, by name
                      checkpoints=lambda: {"tiny-diffusers": tmp_path}, loader=lambda path: ours)
    ctx = RunContext(env, {}, "parity", {}, lambda e, d: None, lambda r: None, lambda: False, node_id="3")
    model, clip, vae = checkpoint_loader(ctx, "tiny-diffusers")
    (pos,), (neg,) = clip_text_encode(ctx, PROMPT, clip), clip_text_encode(ctx, NEGATIVE, clip)
    empty = {"samples": torch.zeros(1, 4, SIZE // 2, SIZE // 2), "diffusekit_factor": 2}
    (latent,) = ksampler(ctx, model, SEED, STEPS, CFG, "euler", "ddim_uniform", pos, neg, empty, 1.0)
    (image,) = vae_decode(ctx, latent, vae)

    sigmas = calculate_sigmas(ours, "euler", "ddim_uniform", STEPS)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="leading",
                                                                 steps_offset=1, use_karras_sigmas=False)
    ref.scheduler.set_timesteps(STEPS)
    assert ref.scheduler.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    torch.testing.assert_close(ref.scheduler.sigmas.float(), sigmas.float(), rtol=1e-5, atol=1e-6)
    s0 = float(sigmas[0])
    noise = prepare_noise(empty["samples"], SEED)
    handed = noise * s0 / (s0 * s0 + 1) ** 0.5                # diffusers multiplies by sqrt(s0^2 + 1)
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE,
                 width=SIZE, latents=handed, output_type="latent").images
    scale = ours.scale
    mine = latent["samples"] * scale                          # LATENT holds VAE latents without the scale
    err = ((mine - theirs).abs().max() / theirs.abs().max()).item()
    assert err < 1e-4, err
    pixels = ref.vae.decode(theirs / ref.vae.config.scaling_factor).sample
    theirs_img = ((pixels.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    assert (image - theirs_img).abs().max().item() < 1 / 255

