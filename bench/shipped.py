"""Generation time of the shipped models on the CPU (the bars: one 64x64 `shapes` image at 20 steps in
under a second; one `shapes-turbo` image at 1 step in under 0.05 s).

One generation = tokenize + encode the prompt (and the empty negative when CFG is on), the model card's
sampler / schedule / CFG (shapes, digits: 20 DPM++ 2M Karras steps, CFG 5, cond and uncond as one UNet
batch of 2; shapes-turbo: LCM, SGM Uniform, CFG 1 = one UNet call per step), VAE decode (shapes) and
PNG-ready uint8. Timed per model, step count and torch thread count, after one warm-up, median of --n
runs with a new seed each. The weights are stored in fp16; the first column computes in float32 (what
`from_pretrained` does on a CPU), the second in the file's fp16 (emulated on CPUs without AVX512-FP16).
The machine's load average is printed: on a shared box the wall medians are upper bounds, and the
"fp32 cpu s" column (this process's CPU seconds per generation, divided by the threads) is the time
an idle core would take.

    python bench/shipped.py                                   # shapes and digits, 1 and 2 threads
    python bench/shipped.py --models shapes-turbo --steps 1 2 4 --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from diffusekit import GenerationParams, Pipeline

PROMPTS = {"shapes": "a large red circle on the left, blue background", "digits": "a handwritten digit seven"}
PROMPTS["shapes-turbo"] = PROMPTS["shapes-flow"] = PROMPTS["shapes"]


def median_s(pipe: Pipeline, prompt: str, n: int, size: int, steps: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one generation at the card's settings (`pipe.defaults`) with `steps`
    steps. The CPU seconds of this process are what one idle core would take on one torch thread, also
    on a shared box (where the wall time waits for the other processes)."""
    d = pipe.defaults
    wall, cpu = [], []
    for i in range(n + 1):
        p = GenerationParams(prompt=prompt, steps=steps, sampler_name=d["sampler_name"], scheduler=d["scheduler"],
                             cfg_scale=d["cfg_scale"], seed=100 + i, width=size, height=size)
        t, c = time.perf_counter(), time.process_time()
        pipe.generate(p)
        if i:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes", "digits"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default: the card's)")
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; median of {args.n} generations after "
          f"one warm-up, each model at its card's sampler, schedule and CFG")
    print(f"{'model':>12} {'sampler':>18} {'cfg':>4} {'steps':>5} {'size':>5} {'threads':>7} | "
          f"{'fp32 s':>7} {'fp32 cpu s':>10} {'fp16 s':>7} {'fp16/fp32':>9}")
    for name in args.models:
        fast, half = Pipeline.from_pretrained(name), Pipeline.from_pretrained(name, dtype=torch.float16)
        size, d = fast.family.default_size, fast.defaults
        for steps in args.steps or [d["steps"]]:
            for th in args.threads:
                torch.set_num_threads(th)
                a, a_cpu = median_s(fast, PROMPTS[name], args.n, size, steps)
                b, _ = median_s(half, PROMPTS[name], max(1, args.n // 2), size, steps)
                label = f"{d['sampler_name']} {d['scheduler']}"
                print(f"{name:>12} {label:>18} {d['cfg_scale']:>4g} {steps:>5} {size:>5} {th:>7} | "
                      f"{a:>7.3f} {a_cpu / th:>10.3f} {b:>7.3f} {b / a:>9.1f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
