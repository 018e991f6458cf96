"""Per-step overhead of every sampler: what a sampler costs on top of the network.

The denoiser is nearly free (one multiply: D(x, sigma) = x / (sigma^2 + 1), the exact denoiser of unit
Gaussian data), so the time per step is the sampler's own arithmetic, noise and bookkeeping. Latent
4x64x64 (SD at 512x512), batch 1 and 8, 20 steps of the SD Karras schedule, float32, one CPU thread
(so the numbers do not depend on what else the machine runs in parallel; best of --repeats runs).
diffusers' scheduler for the same method runs the usual loop (scale_model_input, a near-free network
eps = 0.1 * x_in, step) where one exists; "-" where none does.
Model evaluations per step are counted, not assumed.

    python bench/samplers.py                 # markdown table on stdout
    python bench/samplers.py --steps 30 --repeats 5
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from diffusekit.core import samplers as S
from diffusekit.core import sigmas as sigma_schedules
from diffusekit.core.schedules import DiscreteSchedule, betas

# canonical id -> (diffusers scheduler class name, config overrides)
DIFFUSERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "uni_pc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def ours(sid: str, batch: int, steps: int, repeats: int) -> tuple[float, float]:
    """(best microseconds per step, model evaluations per step)."""
    schedule = DiscreteSchedule.from_betas(betas("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012))
    if sid == "euler_flow":
        sig = torch.linspace(1.0, 0.0, steps + 1)
    else:
        sig = sigma_schedules.get("karras", steps, schedule=schedule)
    calls = [0]

    def denoiser(x, sigma, **_):
        calls[0] += 1
        return x / (sigma[:, None, None, None] ** 2 + 1)

    best = float("inf")
    for r in range(repeats):
        x = torch.randn(batch, 4, 64, 64, generator=torch.Generator().manual_seed(r)) * float(sig[0])
        gens = [torch.Generator().manual_seed(r * 100 + i) for i in range(batch)]
        calls[0] = 0
        t = time.perf_counter()
        S.SAMPLERS[sid](denoiser, x, sig, generator=gens)
        best = min(best, time.perf_counter() - t)
    return best / steps * 1e6, calls[0] / steps


def theirs(sid: str, batch: int, steps: int, repeats: int) -> tuple[float, float] | None:
    if sid not in DIFFUSERS:
        return None
    try:
        import diffusers
    except ImportError:
        return None
    name, extra = DIFFUSERS[sid]
    cls = getattr(diffusers, name)
    kwargs = {**SD_BETAS, **extra}
    if "use_karras_sigmas" in cls.__init__.__code__.co_varnames:
        kwargs["use_karras_sigmas"] = True
    try:
        sched = cls(**kwargs)
    except ImportError:            # DPMSolverSDEScheduler needs torchsde
        return None
    calls = [0]
    best = float("inf")
    for r in range(repeats):
        sched.set_timesteps(steps)
        x = torch.randn(batch, 4, 64, 64, generator=torch.Generator().manual_seed(r)) * sched.init_noise_sigma
        g = torch.Generator().manual_seed(r)
        calls[0] = 0
        t = time.perf_counter()
        for ts in sched.timesteps:
            x_in = sched.scale_model_input(x, ts)
            calls[0] += 1
            eps = x_in * 0.1                                   # a near-free network
            step = sched.step(eps, ts, x, generator=g) if "generator" in sched.step.__code__.co_varnames \
                else sched.step(eps, ts, x)
            x = step.prev_sample
        best = min(best, time.perf_counter() - t)
    return best / steps * 1e6, calls[0] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="torchsde")   # its Brownian interval warns at sigma_min
    print(f"Per-step sampler overhead, near-free denoiser, latent 4x64x64, {args.steps} Karras steps, fp32, "
          f"1 thread, best of {args.repeats}; us/step (model evaluations per step)\n")
    head = " | ".join(f"ours b{b} | diffusers b{b}" for b in args.batches)
    print(f"| sampler | id | {head} |")
    print("|---|---|" + "---|---|" * len(args.batches))
    for sid, info in S.INFO.items():
        cells = []
        for b in args.batches:
            us, nfe = ours(sid, b, args.steps, args.repeats)
            cells.append(f"{us:,.0f} ({nfe:g})")
            ref = theirs(sid, b, args.steps, args.repeats)
            cells.append("-" if ref is None else f"{ref[0]:,.0f} ({ref[1]:g})")
        print(f"| {info.label} | {sid} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
