"""Generation time of the shipped models on the CPU (the issue's bar: one 64x64 `shapes` image at
20 steps in under a second).

One generation = tokenize + encode the prompt and the empty negative, 20 DPM++ 2M Karras steps with
CFG 5 (cond and uncond as one UNet batch of 2), VAE decode (shapes) and PNG-ready uint8. Timed per
model and torch thread count, after one warm-up, median of --n runs with a new seed each. The
weights are stored in fp16; the first column computes in float32 (what `from_pretrained` does on a
CPU), the second in the file's fp16 (emulated on CPUs without AVX512-FP16), for the ratio.

    python bench/shipped.py            # shapes and digits, 1 and 2 threads
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusekit import GenerationParams, Pipeline

PROMPTS = {"shapes": "a large red circle on the left, blue background", "digits": "a handwritten digit seven"}


def median_s(pipe: Pipeline, prompt: str, n: int, size: int) -> float:
    times = []
    for i in range(n + 1):
        p = GenerationParams(prompt=prompt, steps=20, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=5,
                             seed=100 + i, width=size, height=size)
        t = time.perf_counter()
        pipe.generate(p)
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes", "digits"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"median of {args.n} generations after one warm-up; 20 steps DPM++ 2M Karras, CFG 5")
    print(f"{'model':>7} {'size':>5} {'threads':>7} | {'fp32 s':>7} {'fp16 s':>7} {'fp16/fp32':>9}")
    for name in args.models:
        fast, half = Pipeline.from_pretrained(name), Pipeline.from_pretrained(name, dtype=torch.float16)
        size = fast.family.default_size
        for th in args.threads:
            torch.set_num_threads(th)
            a = median_s(fast, PROMPTS[name], args.n, size)
            b = median_s(half, PROMPTS[name], max(1, args.n // 2), size)
            print(f"{name:>7} {size:>5} {th:>7} | {a:>7.3f} {b:>7.3f} {b / a:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
