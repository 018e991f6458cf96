"""Whole txt2img generation, SD 1.5 architecture: diffusekit `Pipeline` vs diffusers `StableDiffusionPipeline`.

One generation = text encode (prompt + empty negative) + 20 Euler steps on the Karras schedule with CFG 7
(the UNet sees cond and uncond as one batch of 2) + VAE decode, on the same random weights: a diffusers
SD 1.5 pipeline (UNet 859.5M, VAE 83.7M, CLIP-L text 123.1M parameters, default random init, seed 0) is
written once with save_pretrained (~4.3 GB, cached in --cache) and both libraries load that folder.
Both start from the same seed-derived noise (handed over as tests/pipelines/test_parity_diffusers.py
documents), so the images should agree; the last column says by how much (uint8 levels).

Each case runs in a fresh subprocess, one after another (diffusers then ours for each size and dtype):
  load s     from_pretrained (ours: plus the sha256 "Model hash" the infotext carries, computed once per model)
  gen s      wall seconds of one whole generation; cpu s = process CPU time (less sensitive to other load)
  peak RSS   resource.getrusage(RUSAGE_SELF).ru_maxrss of that process (weights + activations + runtime)
The ratio is ours / diffusers (below 1 = ours is faster). bf16 means bf16 weights: diffusers then runs its
whole loop in bf16; ours keeps the sampler's latent in fp32 and runs the networks in bf16.

    python bench/txt2img.py                 # 256x256, fp32 and bf16
    python bench/txt2img.py --full          # also 512x512
    python bench/txt2img.py --dtypes fp32   # one precision
    python bench/txt2img.py --device cuda --dtypes fp16 --full   # on a GPU: one warm-up generation, then timed
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
SEED, STEPS, CFG = 1, 20, 7.0

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from diffusekit.pipelines.latents import initial_noise
impl, folder, size, dtype_name, out_npy, prompt, seed, steps, cfg, device = sys.argv[1:11]
size, seed, steps, cfg = int(size), int(seed), int(steps), float(cfg)
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
runs = 2 if device != "cpu" else 1        # a GPU's first call pays for kernel selection: time the second
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # Linux: kB -> MB
t0 = time.perf_counter()
if impl == "diffusers":
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    load = time.perf_counter() - t0
    pipe.scheduler.set_timesteps(steps)
    sigma0 = float(pipe.scheduler.sigmas[0])
    noise, _ = initial_noise((1, 4, size // 8, size // 8), [seed])
    latents = (noise * sigma0 / float(pipe.scheduler.init_noise_sigma)).to(device, dtype)
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            image = pipe(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=cfg, height=size,
                         width=size, latents=latents, output_type="np").images[0]
    image = (image * 255).round().clip(0, 255).astype(np.uint8)
else:
    from diffusekit import GenerationParams, Pipeline
    pipe = Pipeline.from_pretrained(folder, dtype=None if dtype_name == "fp32" else dtype, device=device)
    pipe.parts.hash10                                                            # the infotext's model hash
    load = time.perf_counter() - t0
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        r = pipe.generate(GenerationParams(prompt=prompt, steps=steps, sampler_name="Euler", scheduler="Karras",
                                           cfg_scale=cfg, seed=seed, width=size, height=size))
    image = np.asarray(r.images[0])
gen_wall, gen_cpu = time.perf_counter() - w, time.process_time() - c
np.save(out_npy, image)
print(json.dumps({"load": load, "wall": gen_wall, "cpu": gen_cpu, "rss": rss()}))
"""


def setup(folder: Path) -> None:
    """Write the random-weight SD 1.5 diffusers folder (skipped when it is already there)."""
    if (folder / "model_index.json").is_file():
        return
    import diffusers
    import torch
    import transformers

    from diffusekit.models.tokenizer import CLIPTokenizer

    print(f"writing a random-weight SD 1.5 diffusers folder to {folder} (once) ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768))
    tok_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    tok_dir.mkdir()
    bpe = CLIPTokenizer.from_bpe_gz()
    (tok_dir / "vocab.json").write_text(json.dumps(bpe.encoder), encoding="utf-8")
    merges = sorted(bpe.merge_ranks, key=bpe.merge_ranks.get)
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             timestep_spacing="linspace", use_karras_sigmas=True)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder)


def run_case(impl: str, folder: Path, size: int, dtype: str, out: Path, steps: int = STEPS,
             device: str = "cpu") -> dict:
    args = [impl, str(folder), str(size), dtype, str(out), PROMPT, str(SEED), str(steps), str(CFG), device]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {size} {dtype} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also 512x512 (slow on a CPU)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "diffusekit-bench" / "sd15-random"),
                        help="where the random-weight diffusers folder is kept between runs")
    args = parser.parse_args()
    import numpy as np

    folder = Path(args.cache)
    t = time.perf_counter()
    setup(folder)
    sizes = [256, 512] if args.full else [256]
    rows = []
    work = Path(tempfile.mkdtemp())
    for size in sizes:
        for dtype in args.dtypes:
            res = {}
            for impl in ("diffusers", "ours"):
                print(f"{size}x{size} {dtype} {impl} ...", file=sys.stderr, flush=True)
                res[impl] = run_case(impl, folder, size, dtype, work / f"{impl}.npy", args.steps, args.device)
            a = np.load(work / "ours.npy").astype(np.int16)
            b = np.load(work / "diffusers.npy").astype(np.int16)
            diff = np.abs(a - b)
            rows.append((size, dtype, res["diffusers"], res["ours"], int(diff.max()), float(diff.mean())))
    import torch
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{__import__('os').cpu_count()} CPUs"
    print(f"\nSD 1.5 txt2img, random weights, {args.steps} Euler/Karras steps, CFG {CFG}, batch 1, "
          f"torch {torch.__version__}, {where} "
          f"(total bench time {time.perf_counter() - t:.0f} s)\n")
    print("| size | dtype | diffusers gen s (cpu s) | ours gen s (cpu s) | ratio wall (cpu) | load s diffusers / ours "
          "| peak RSS MB diffusers / ours | image max/mean abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for size, dtype, d, o, dmax, dmean in rows:
        print(f"| {size}x{size} | {dtype} | {d['wall']:.1f} ({d['cpu']:.1f}) | {o['wall']:.1f} ({o['cpu']:.1f}) | "
              f"{o['wall'] / d['wall']:.2f} ({o['cpu'] / d['cpu']:.2f}) | {d['load']:.1f} / {o['load']:.1f} | "
              f"{d['rss']:,.0f} / {o['rss']:,.0f} | {dmax} / {dmean:.2f} |")


if __name__ == "__main__":
    main()
