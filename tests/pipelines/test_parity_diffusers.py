"""txt2img parity with diffusers' StableDiffusionPipeline on the same tiny random weights.

Setup: a tiny diffusers SD 1.x pipeline (UNet2DConditionModel, AutoencoderKL, transformers CLIPTextModel and a
CLIPTokenizer whose vocab.json/merges.txt are built from open_clip's BPE file) is saved with save_pretrained and
loaded by `Pipeline.from_pretrained(folder)`. Both sides then get the same prompt (no emphasis syntax, so
A1111's weighting is the identity), the same negative prompt, guidance scale, step count and schedule.

Text: diffusers encodes the prompt as one 77-token window (truncating, never chunking) and takes CLIP's last
hidden state after the final LayerNorm; our SD1 family reads the same layer with the same norm, and a prompt
under 75 tokens is one chunk of 77 ids padded with EOS on both sides.

Noise hand-over: our txt2img starts from x = noise * sigmas[0] (k-diffusion's convention, the model's sigma_max
for Karras). diffusers multiplies the `latents=` it is given by `scheduler.init_noise_sigma` and works in its
scheduler's own sample space. So we pass `noise * sigmas[0] * c / init_noise_sigma`, where c converts our
variance-exploding latent into their sample:
- EulerDiscreteScheduler works on the same VE latent (c = 1); with timestep_spacing="linspace" its
  init_noise_sigma is sigma_max itself (with "leading" it would be sqrt(sigma_max^2 + 1): the ratio corrects it);
- DPMSolverMultistepScheduler works on the variance-preserving latent x / sqrt(sigma^2 + 1) (c = that factor,
  init_noise_sigma = 1).
Both end at sigma = 0, where the two spaces coincide, so the final latents compare directly.

Tolerances (fp32, max |difference| relative to the latent's max |value|): Euler + Karras 1e-4 (diffusers keeps
sigmas in float32, we compute step coefficients in float64; measured 9e-7). DPM++ 2M + Karras 5e-4: diffusers
also rounds the timesteps it feeds the UNet to integers (`timesteps.round()` in
DPMSolverMultistepScheduler.set_timesteps) while we feed the exact fractional t of each Karras sigma, a
deliberate difference (measured 1.5e-5 on these weights). Handing over the noise with diffusers' "leading"
convention instead (a factor sqrt(sigma_max^2 + 1) / sigma_max = 1.0023) moves the result by 2e-3.
"""
import json

import pytest
import torch

from diffusekit import GenerationParams, Pipeline
from diffusekit.models.tokenizer import CLIPTokenizer, find_bundled_bpe
from diffusekit.pipelines.latents import initial_noise

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
BPE = find_bundled_bpe()
pytestmark = pytest.mark.skipif(BPE is None, reason="needs open_clip's bpe_simple_vocab_16e6.txt.gz")

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a red circle on a blue square", "blurry", 42, 8, 5.0, 32


def clip_tokenizer_folder(folder):
    """A transformers CLIPTokenizer over vocab.json + merges.txt written from the open_clip BPE file (through
    our reader of it; tests/models/test_tokenizer.py and test_loading.py check that reader against
    OpenAI's vocabulary order independently)."""
    tok = CLIPTokenizer.from_bpe_gz(BPE)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(tok.encoder), encoding="utf-8")
    merges = sorted(tok.merge_ranks, key=tok.merge_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def tiny_diffusers_pipeline(tmp):
    """A tiny random-weight diffusers StableDiffusionPipeline (SD1 layout; tokenizer folder under tmp)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=32)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    with torch.no_grad():                     # diffusers zero-inits some outputs: randomise everything
        for m in (unet, vae):
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu")).eval()
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             timestep_spacing="linspace", use_karras_sigmas=True)
    ref = diffusers.StableDiffusionPipeline(vae=vae.eval(), text_encoder=text, tokenizer=clip_tokenizer_folder(tmp / "tok"),
                                            unet=unet.eval(), scheduler=sched, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    return ref


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(diffusers pipeline, our pipeline) on the same weights."""
    tmp = tmp_path_factory.mktemp("parity")
    ref = tiny_diffusers_pipeline(tmp)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp / "pipe")
    ours = Pipeline.from_pretrained(tmp / "pipe")
    assert ours.family.name == "sd1" and ours.factor == 2
    return ref, ours


def run_both(pipes, sampler, diffusers_scheduler, c_in):
    ref, ours = pipes
    r = ours.generate(GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler_name=sampler,
                                       scheduler="Karras", cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                                       save_process=True))
    sigma0 = r.process[0]["sigma"]
    noise, _ = initial_noise((1, 4, SIZE // 2, SIZE // 2), [SEED])           # what our pipeline started from
    assert torch.allclose(r.process[0]["x"], noise * sigma0)
    ref.scheduler = diffusers_scheduler.from_config(ref.scheduler.config, use_karras_sigmas=True)
    ref.scheduler.set_timesteps(STEPS)
    assert abs(float(ref.scheduler.sigmas[0]) - sigma0) < 1e-5 * sigma0   # the same Karras schedule
    handed = noise * sigma0 * c_in(sigma0) / float(ref.scheduler.init_noise_sigma)
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE,
                 width=SIZE, latents=handed, output_type="latent").images
    return r.latents, theirs


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_euler_karras_final_latent_matches_diffusers(pipes):
    ours, theirs = run_both(pipes, "Euler", diffusers.EulerDiscreteScheduler, lambda s: 1.0)
    assert ours.shape == theirs.shape == (1, 4, 16, 16)
    assert rel_err(ours, theirs) < 1e-4


def test_dpmpp_2m_karras_final_latent_matches_diffusers(pipes):
    ours, theirs = run_both(pipes, "DPM++ 2M", diffusers.DPMSolverMultistepScheduler,
                            lambda s: 1.0 / (s * s + 1.0) ** 0.5)
    assert rel_err(ours, theirs) < 5e-4


def test_the_hand_over_matters(pipes):
    """Control: starting diffusers from noise * sqrt(sigma_max^2 + 1) (its convention for 'leading' spacing)
    instead of noise * sigma_max moves the result far outside the Euler tolerance."""
    ours, theirs = run_both(pipes, "Euler", diffusers.EulerDiscreteScheduler, lambda s: (s * s + 1.0) ** 0.5 / s)
    assert rel_err(ours, theirs) > 1e-3


def test_text_conditioning_matches_and_long_prompts_differ_by_design(pipes):
    """Short prompts: our context equals diffusers' prompt_embeds (CLIP last layer + final norm, EOS padding;
    tolerance 1e-5 relative). Long prompts: diffusers truncates to 77 tokens, we chunk (A1111's rule)."""
    ref, ours = pipes
    cond, uncond = ours.text.pair(PROMPT, NEGATIVE, STEPS)
    emb, neg = ref.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=NEGATIVE)
    assert rel_err(cond.at(0).context, emb) < 1e-5 and rel_err(uncond.at(0).context, neg) < 1e-5
    long = ", ".join(f"word{i}" for i in range(60))                       # > 75 tokens: several chunks
    emb, _ = ref.encode_prompt(long, "cpu", 1, True, negative_prompt="")
    cond, _ = ours.text.pair(long, "", STEPS)
    n = cond.at(0).context.shape[1]
    assert emb.shape[1] == 77 and n > 77 and n % 77 == 0
