"""Flux.1 txt2img parity with diffusers' FluxPipeline on the same tiny random weights.

Setup: a tiny FluxPipeline (FluxTransformer2DModel, a 16-channel AutoencoderKL with Flux's scale 0.3611
and shift 0.1159, a transformers CLIPTextModel (no projection: its pooler output is `y`), a T5EncoderModel,
a CLIP tokenizer built from open_clip's BPE file, a T5 tokenizer.json built with `tokenizers`,
FlowMatchEulerDiscreteScheduler) is written by diffusers' save_pretrained and read by
`Pipeline.from_pretrained(folder)`.

dev: the scheduler has diffusers' `use_dynamic_shifting` (mu linear in the image tokens, 0.5 at 256 and 1.15
at 4096, shift exp(mu)); FluxPipeline's own sigmas linspace(1, 1/n, n) shifted by exp(mu) plus 0 are our
"Simple" schedule over the flow table of that shift (n | 1000), so both sides run their defaults. The
distilled guidance (3.5 in diffusers' call, ours by default) is the network's input; no CFG batch.
schnell: no guidance input, shift 1, T5 over 256 tokens. True CFG (negative prompt, cfg_scale > 1) is
diffusers' `true_cfg_scale` (CFG on v; ours on x0 = x - s v: the same linear combination).
Noise: our latent at s = 1 is the seed's noise; diffusers gets it packed into 2x2 patches as `latents=`.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusekit import GenerationParams, Pipeline
from diffusekit.models import flux
from diffusekit.pipelines.latents import initial_noise

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("sd3_parity", Path(__file__).with_name("test_parity_sd3.py"))
_sd3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sd3)
_sd1 = _sd3._sd1
pytestmark = [pytest.mark.skipif(_sd1.BPE is None, reason="needs open_clip bpe_simple_vocab_16e6.txt.gz"),
              pytest.mark.usefixtures("one_thread")]

PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red circle on a blue square", "blurry", 42, 8, 32


def _tiny_flux(tmp: Path, t5_dir: Path, dev: bool):
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=40, pooled_projection_dim=32, guidance_embeds=dev, axes_dims_rope=(4, 6, 6))
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                  shift_factor=0.1159, scaling_factor=0.3611)
    clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu"))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=400, d_model=40, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    _sd3._randomize(transformer, vae, clip_l, t5)
    sched = (diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                       base_image_seq_len=256, max_image_seq_len=4096) if dev else
             diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))
    ref = diffusers.FluxPipeline(
        transformer=transformer.eval(), scheduler=sched, vae=vae.eval(), text_encoder=clip_l.eval(),
        tokenizer=_sd1.clip_tokenizer_folder(tmp / "tok_l"), text_encoder_2=t5.eval(),
        tokenizer_2=transformers.AutoTokenizer.from_pretrained(str(t5_dir)))
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp / "pipe")
    return ref, Pipeline.from_pretrained(tmp / "pipe")


@pytest.fixture(scope="module")
def dev(tmp_path_factory, t5_tokenizer_dir):
    return _tiny_flux(tmp_path_factory.mktemp("flux-dev"), t5_tokenizer_dir, dev=True)


def _run_both(ref, ours, max_length, **extra):
    r = ours.generate(GenerationParams(**{**ours.defaults, "prompt": PROMPT, "steps": STEPS, "seed": SEED,
                                          "width": SIZE, "height": SIZE, "save_process": True, **extra}))
    noise, _ = initial_noise((1, 16, SIZE // 2, SIZE // 2), [SEED])
    assert float(r.process[0]["sigma"]) == 1.0 and torch.equal(r.process[0]["x"], noise)
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=flux.patchify(noise, 2),
              max_sequence_length=max_length, generator=torch.Generator().manual_seed(0))
    if "negative_prompt" in extra:
        kw |= dict(negative_prompt=extra["negative_prompt"], true_cfg_scale=extra["cfg_scale"])
    packed = ref(PROMPT, output_type="latent", **kw).images
    latent = flux.unpatchify(packed, SIZE // 4, SIZE // 4, 2)
    sig = torch.tensor([d["sigma"] for d in r.process], dtype=torch.float64)
    assert torch.allclose(ref.scheduler.sigmas[:-1].double(), sig, atol=1e-6)     # the same (shifted) schedule
    image = ref(PROMPT, output_type="np", **kw).images[0]                           # (H, W, 3) in [0, 1]
    return r, latent, image


def _same_image(r, latent, image):
    assert r.latents.shape == latent.shape == (1, 16, SIZE // 2, SIZE // 2)
    assert ((r.latents - latent).abs().max() / latent.abs().max()) < 1e-4
    mine = np.asarray(r.images[0], dtype=np.float64) / 255
    assert mine.shape == image.shape and image.std() > 0.02                      # a live image, not a flat one
    assert np.abs(mine - image).mean() < 1 / 255


def test_loads_the_diffusers_folder_as_flux_dev(dev):
    ref, ours = dev
    fam = ours.family
    assert fam.name == "flux-dev" and fam.is_flux and fam.takes_guidance and fam.prediction_type == "flow"
    assert (fam.latent_scale, fam.latent_shift, fam.dynamic_shift) == (0.3611, 0.1159, (0.5, 1.15))
    assert [(s.kind, s.max_length) for s in fam.text_encoders] == [("clip", 77), ("t5", 512)]
    assert ours.size_multiple == 4 and ours.defaults["cfg_scale"] == 1.0
    sd = ref.transformer.state_dict()
    assert torch.equal(ours.unet.single_blocks[1].linear2.weight, sd["single_transformer_blocks.1.proj_out.weight"])


def test_text_conditioning_matches_diffusers(dev):
    ref, ours = dev
    cond, _ = ours.text.pair(PROMPT, "", STEPS)
    with torch.no_grad():
        emb, pooled, _ = ref.encode_prompt(PROMPT, PROMPT, max_sequence_length=512)
    assert cond.at(0).context.shape == emb.shape == (1, 512, 40)
    torch.testing.assert_close(cond.at(0).context, emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.at(0).pooled, pooled, atol=1e-5, rtol=1e-5)


def test_dev_image_matches_diffusers(dev):
    ref, ours = dev
    r, latent, image = _run_both(ref, ours, 512)            # diffusers' guidance_scale default is 3.5, as ours
    _same_image(r, latent, image)
    assert ("Steps: 8, Sampler: Euler, Schedule type: Simple, CFG scale: 1.0, Distilled CFG Scale: 3.5, Seed: 42"
            in r.infotexts[0])


def test_dev_true_cfg_with_a_negative_prompt_matches_diffusers(dev):
    ref, ours = dev
    r, latent, image = _run_both(ref, ours, 512, negative_prompt=NEGATIVE, cfg_scale=2.5)
    _same_image(r, latent, image)


def test_schnell_image_matches_diffusers(tmp_path, t5_tokenizer_dir):
    ref, ours = _tiny_flux(tmp_path, t5_tokenizer_dir, dev=False)
    assert ours.family.name == "flux-schnell" and not ours.family.takes_guidance
    assert ours.family.dynamic_shift is None and ours.family.flow_shift == 1.0
    assert ours.defaults["steps"] == 4
    r, latent, image = _run_both(ref, ours, 256)
    _same_image(r, latent, image)
    assert "Distilled CFG Scale" not in r.infotexts[0]
