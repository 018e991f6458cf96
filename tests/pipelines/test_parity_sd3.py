"""SD3 txt2img parity with diffusers' StableDiffusion3Pipeline on the same tiny random weights.

Setup: a tiny StableDiffusion3Pipeline (SD3Transformer2DModel, a 16-channel AutoencoderKL with SD3's
scale 1.5305 and shift 0.0609, two transformers CLIPTextModelWithProjection, T5EncoderModel, CLIP
tokenizers built from open_clip's BPE file, a T5 tokenizer.json built with `tokenizers`,
FlowMatchEulerDiscreteScheduler(shift=3)) is written by diffusers' save_pretrained and read by
`Pipeline.from_pretrained(folder)`.

Schedule hand-over: ours is "Simple" over the shifted flow table (s_i = shift(1 - i/n) for n | 1000);
diffusers shifts whatever sigmas it is given, so it gets the unshifted u_i = s_i / (shift - (shift - 1) s_i)
and reproduces s_i (to float32 rounding) with its terminal 0 appended. Noise: our latent at s = 1 is the
seed's noise itself; diffusers gets it as `latents=` (init_noise_sigma = 1). Both then take Euler steps
x + (s' - s) v with CFG on v (ours on x0 = x - s v: the same linear combination).
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusekit import GenerationParams, Pipeline
from diffusekit.pipelines.latents import initial_noise

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("sd1_parity", Path(__file__).with_name("test_parity_diffusers.py"))
_sd1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sd1)
pytestmark = [pytest.mark.skipif(_sd1.BPE is None, reason="needs open_clip bpe_simple_vocab_16e6.txt.gz"),
              pytest.mark.usefixtures("one_thread")]

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE, SHIFT = "a red circle on a blue square", "blurry", 42, 8, 5.0, 32, 3.0


def _randomize(*modules, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                if p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
                elif "norm" not in name and "layer_norm" not in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _tiny_sd3(tmp: Path, t5_dir: Path, with_t5: bool = True):
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=16, qk_norm="rms_norm")
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                  shift_factor=0.0609, scaling_factor=1.5305)
    clip_l = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32))
    clip_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=32))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=400, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    _randomize(transformer, vae, clip_l, clip_g, t5)
    tok_l = _sd1.clip_tokenizer_folder(tmp / "tok_l")
    tok_g = transformers.CLIPTokenizer.from_pretrained(str(tmp / "tok_l"), model_max_length=77, pad_token="!")
    ref = diffusers.StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        vae=vae.eval(), text_encoder=clip_l.eval(), tokenizer=tok_l, text_encoder_2=clip_g.eval(), tokenizer_2=tok_g,
        text_encoder_3=t5.eval() if with_t5 else None,
        tokenizer_3=transformers.AutoTokenizer.from_pretrained(str(t5_dir)) if with_t5 else None)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp / "pipe")
    return ref, Pipeline.from_pretrained(tmp / "pipe")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory, t5_tokenizer_dir):
    return _tiny_sd3(tmp_path_factory.mktemp("sd3"), t5_tokenizer_dir)


def _run_both(ref, ours, **extra):
    r = ours.generate(GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler_name="Euler",
                                       scheduler="Simple", cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                                       save_process=True, **extra))
    sig = torch.tensor([d["sigma"] for d in r.process], dtype=torch.float64)
    noise, _ = initial_noise((1, 16, SIZE // 2, SIZE // 2), [SEED])
    assert float(sig[0]) == 1.0 and torch.equal(r.process[0]["x"], noise)       # flow: starts from the noise itself
    unshifted = sig / (SHIFT - (SHIFT - 1) * sig)
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, sigmas=unshifted.tolist(), guidance_scale=CFG,
              height=SIZE, width=SIZE, latents=noise.clone())
    latent = ref(PROMPT, output_type="latent", **kw).images
    ref.scheduler.set_timesteps(sigmas=unshifted.tolist())
    assert torch.allclose(ref.scheduler.sigmas[:-1].double(), sig, atol=1e-6)     # the same schedule
    image = ref(PROMPT, output_type="np", **kw).images[0]                         # (H, W, 3) in [0, 1]
    return r, latent, image


def test_loads_the_diffusers_folder_as_sd3(pipes):
    ref, ours = pipes
    fam = ours.family
    assert fam.name == "sd35-large" and fam.is_mmdit and fam.prediction_type == "flow"   # qk_norm: an SD3.5 layout
    assert (fam.latent_scale, fam.latent_shift, fam.flow_shift) == (1.5305, 0.0609, SHIFT)
    assert [s.kind for s in fam.text_encoders] == ["clip", "clip", "t5"]
    assert [s.pad_id for s in fam.text_encoders] == [49407, 0, 0]       # tokenizer_2 pads with "!" = id 0
    assert ours.size_multiple == 4 and ours.denoiser.schedule.shift == SHIFT
    sd = ref.transformer.state_dict()
    assert torch.equal(ours.unet.joint_blocks[1].x_block.attn.ln_q.weight, sd["transformer_blocks.1.attn.norm_q.weight"])


def test_text_conditioning_matches_diffusers(pipes):
    ref, ours = pipes
    cond, uncond = ours.text.pair(PROMPT, NEGATIVE, STEPS)
    with torch.no_grad():   # as in StableDiffusion3Pipeline.__call__ (with grad, torch picks other kernels: 6e-5 off)
        emb, neg, pooled, neg_pooled = ref.encode_prompt(PROMPT, PROMPT, PROMPT, negative_prompt=NEGATIVE,
                                                         negative_prompt_2=NEGATIVE, negative_prompt_3=NEGATIVE)
    assert cond.at(0).context.shape == emb.shape == (1, 77 + 256, 96)
    for a, b in [(cond.at(0).context, emb), (uncond.at(0).context, neg), (cond.at(0).pooled, pooled),
                 (uncond.at(0).pooled, neg_pooled)]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_txt2img_image_matches_diffusers(pipes):
    ref, ours = pipes
    r, latent, image = _run_both(ref, ours)
    assert r.latents.shape == latent.shape == (1, 16, 16, 16)
    assert ((r.latents - latent).abs().max() / latent.abs().max()) < 1e-4
    mine = np.asarray(r.images[0], dtype=np.float64) / 255
    assert mine.shape == image.shape and image.std() > 0.02                    # a live image, not a flat one
    assert np.abs(mine - image).mean() < 1 / 255
    assert "Steps: 8, Sampler: Euler, Schedule type: Simple, CFG scale: 5.0, Seed: 42" in r.infotexts[0]


def test_without_t5_matches_diffusers_zeros(tmp_path, t5_tokenizer_dir):
    ref, ours = _tiny_sd3(tmp_path, t5_tokenizer_dir, with_t5=False)
    assert ours.parts.text_encoders[2] is None and ours.parts.tokenizers[2] is None
    r, latent, image = _run_both(ref, ours)
    assert ((r.latents - latent).abs().max() / latent.abs().max()) < 1e-4
    cond, _ = ours.text.pair(PROMPT, NEGATIVE, STEPS)
    assert torch.equal(cond.at(0).context[:, 77:], torch.zeros(1, 256, 96))     # T5 block: zeros, as diffusers
