"""Peak memory (and time) of one whole SDXL generation on a CPU: can a 24 GiB machine without a GPU run it?

Writes a random full-size SDXL single file once (LDM layout, fp16: UNet 2.57B, CLIP-L 123M, OpenCLIP bigG 695M,
VAE 84M parameters; 6.9 GB, weights drawn as N(0, 1 / fan_in) from a cycled pool of normals so that activations
stay finite), then for each case loads it in a fresh subprocess with `Pipeline.from_pretrained` and generates one
1024x1024 image (prompt + empty negative, Euler, CFG 7, --steps steps; peak memory does not depend on the count).
Per case, in GiB: peak RSS (ru_maxrss: includes the file's mapped pages while they are read, which the kernel can
drop), peak anon (the largest RssAnon sampled every 10 ms: the memory that must fit) and the anon peak of each
phase (load, text encode + sampling, VAE decode); seconds for load and generation.

Cases: fp32 (the CPU default: weights upcast), fp32 + --vae-tiling (512 px tiles), bf16 weights, bf16 + tiling,
low-memory (fp32 compute over the file's fp16 UNet weights, one layer upcast at a time), low-memory + tiling.

    OMP_NUM_THREADS=1 python bench/sdxl_memory.py                    # every case, 1 step
    OMP_NUM_THREADS=1 python bench/sdxl_memory.py --cases fp32 fp32+tiling --steps 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = ("fp32", "fp32+tiling", "bf16", "bf16+tiling", "low-memory", "low-memory+tiling")

CHILD = r"""
import json, resource, sys, threading, time
import torch
from diffusekit import GenerationParams, Pipeline

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
phase, peaks, stop = ["load"], {}, [False]
def sample():
    while not stop[0]:
        peaks[phase[0]] = max(peaks.get(phase[0], 0), status("RssAnon"))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
path, case, steps, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dtype = torch.bfloat16 if case.startswith("bf16") else None
t0 = time.perf_counter()
pipe = Pipeline.from_pretrained(path, dtype=dtype, vae_tiling=case.endswith("+tiling"),
                                low_memory=case.startswith("low-memory"))
load_s = time.perf_counter() - t0
real_decode = pipe.decode
def decode(z):
    phase[0] = "decode"
    return real_decode(z)
pipe.decode = decode
phase[0] = "sample"
t1 = time.perf_counter()
res = pipe.generate(GenerationParams(prompt="a photograph of an astronaut riding a horse", negative_prompt="",
                                     steps=steps, sampler_name="Euler", scheduler="Karras", cfg_scale=7.0, seed=1,
                                     width=size, height=size))
gen_s = time.perf_counter() - t1
stop[0] = True
img = res.images[0]
print(json.dumps(dict(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peaks=peaks,
                      load_s=load_s, gen_s=gen_s, size=list(img.size), threads=torch.get_num_threads())))
"""


def write_random_sdxl(path: Path, seed: int = 0) -> int:
    """The random fp16 SDXL file (built module by module in fp16, saved with `save_checkpoint`); its bytes."""
    from diffusekit.models.clip import CLIPTextModel, OpenCLIPTextModel
    from diffusekit.models.families import get_family
    from diffusekit.models.loading import save_checkpoint
    from diffusekit.models.unet import UNetModel
    from diffusekit.models.vae import AutoencoderKL

    fam = get_family("sdxl")
    pool = torch.randn(1 << 24, generator=torch.Generator().manual_seed(seed)).half()
    torch.set_default_dtype(torch.float16)
    try:
        classes = {"clip": CLIPTextModel, "openclip": OpenCLIPTextModel}
        modules = [UNetModel(fam.unet), AutoencoderKL(fam.vae)] + [classes[s.kind](s.config) for s in fam.text_encoders]
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for m in modules:
            for i, (name, p) in enumerate(m.named_parameters()):
                if p.ndim > 1 and "norm" not in name:
                    flat, start = p.view(-1), (i * 7919) % len(pool)
                    for lo in range(0, flat.numel(), len(pool) - start):
                        n = min(len(pool) - start, flat.numel() - lo)
                        flat[lo:lo + n] = pool[start:start + n]
                        start = 0
                    p.mul_(p[0].numel() ** -0.5)
    unet, vae, *encoders = modules
    save_checkpoint({"unet": unet, "vae": vae, "text_encoders": encoders}, path, family=fam, dtype=torch.float16)
    return path.stat().st_size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--file", default="/tmp/sdxl-memory/sdxl-random-fp16.safetensors",
                        help="the random SDXL file (written if missing; kept for the next run)")
    args = parser.parse_args()
    path = Path(args.file)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not path.is_file():
        write_random_sdxl(path)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    mem = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    print(f"SDXL (random weights, fp16 file {path.stat().st_size / 2**30:.2f} GiB), {args.size}x{args.size}, "
          f"{args.steps} Euler step(s), CFG 7; torch {torch.__version__}; machine RAM {mem / 2**30:.1f} GiB")
    gib = 2**30
    print(f"| case | load s | generate s | peak RSS GiB | peak anon GiB | anon: load / sampling / VAE decode GiB |")
    print("|---|---|---|---|---|---|")
    for case in args.cases:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), case, str(args.steps), str(args.size)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| {case} | failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]} |||||")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        p = r["peaks"]
        print(f"| {case} | {r['load_s']:.1f} | {r['gen_s']:.1f} | {r['peak_rss'] / gib:.2f} | "
              f"{max(p.values()) / gib:.2f} | {p.get('load', 0) / gib:.2f} / {p.get('sample', 0) / gib:.2f} / "
              f"{p.get('decode', 0) / gib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
