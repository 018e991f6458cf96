"""The sampler study: every sampler x schedule on an exact world, error against the converged result.

The world is a Gaussian mixture (`diffusekit.core.mixture`), whose ideal denoiser is closed-form, placed
in SD's noise range (sigma 0.0292 .. 14.6146 of the scaled_linear schedule, so the "normal", "simple",
"sgm_uniform", ... schedules index SD's own table). For each (sampler, schedule, steps):

- deterministic samplers: error = the median over paths of the RMS distance (per dimension) between the
  final sample and the exact solution of the probability-flow ODE from the same start
  (`reference_solution`, RK4 at 4000 steps). The median, because a few paths that start near the
  boundary between two modes land in the other mode under any error, and would dominate a mean;
- SDE samplers (Brownian-tree noise): the same median distance to the same sampler's result at
  `converged_steps` steps from the same seed (they converge strongly, path by path);
- ancestral samplers (fresh noise each step): there is no converged path, so error = the energy distance
  between their samples and exact mixture samples, minus that of a second exact draw (the sampling floor).

"Steps to tolerance" is the smallest step count whose error is below `tol` and stays below it for every
larger count tried. This turns the notes' eyeballing ("DPM++ 2M settles by step 12-13, Euler takes much
longer") into numbers.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..core import sigmas as sigma_schedules
from ..core.mixture import GaussianMixture, reference_solution
from ..core.noise import generators_for_seeds
from ..core.samplers import INFO, SAMPLERS
from ..core.samplers import resolve as resolve_sampler
from ..core.schedules import DiscreteSchedule

DEFAULT_STEPS = (5, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100)
DEFAULT_SCHEDULES = ("karras", "exponential", "normal", "simple", "sgm_uniform", "beta", "kl_optimal",
                     "align_your_steps", "polyexponential", "uniform", "linear_quadratic")
# samplers whose noise is a Brownian tree: their paths converge as the step count grows
BROWNIAN = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"}
# euler_flow: a rectified-flow sampler, and the study's world is variance-exploding. dpm_fast / dpm_adaptive
# read only the schedule's ends and stop at sigma_min without a final denoise (as in A1111), so the study's
# target at sigma = 0 and its steps axis do not apply (tests/core/test_samplers_dpm_solver.py measures them)
EXCLUDED = {"euler_flow", "dpm_fast", "dpm_adaptive"}


@dataclass
class StudyConfig:
    samplers: Sequence[str] = ()            # empty = every registered sampler except EXCLUDED
    schedules: Sequence[str] = DEFAULT_SCHEDULES
    steps: Sequence[int] = DEFAULT_STEPS
    batch: int = 256                        # starting points per run
    dim: int = 8
    seed: int = 0
    tol: float = 1e-2                       # error tolerance for "steps to tolerance", in data units (RMS)
    converged_steps: int = 1000             # reference step count for SDE samplers
    reference_steps: int = 4000             # RK4 steps of the exact ODE solution


@dataclass
class StudyResult:
    rows: list[dict] = field(default_factory=list)   # sampler, schedule, steps, nfe, error, kind
    config: StudyConfig | None = None
    seconds: float = 0.0
    floor: float = 0.0           # energy distance between two exact draws: the ancestral metric's noise

    def steps_to_tolerance(self, tol: float) -> dict[tuple[str, str], int | None]:
        out: dict[tuple[str, str], int | None] = {}
        keys = sorted({(r["sampler"], r["schedule"]) for r in self.rows})
        for key in keys:
            series = sorted((r["steps"], r["error"]) for r in self.rows if (r["sampler"], r["schedule"]) == key)
            found = None
            for i, (n, _) in enumerate(series):
                if all(e < tol for _, e in series[i:]):
                    found = n
                    break
            out[key] = found
        return out


def _energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Szekely's energy distance between two samples (rows are points)."""
    ab = torch.cdist(a, b).mean()
    aa = torch.cdist(a, a).mean()
    bb = torch.cdist(b, b).mean()
    return float(2 * ab - aa - bb)


def _schedule_sigmas(name: str, steps: int, table: DiscreteSchedule) -> torch.Tensor:
    return sigma_schedules.get(name, steps, schedule=table, dtype=torch.float64)


def run_study(config: StudyConfig = StudyConfig(), progress: Callable[[str], None] | None = None) -> StudyResult:
    # the tensors are tiny (batch x dim): one thread avoids thread-pool overhead that dominates otherwise
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_study(config, progress)
    finally:
        torch.set_num_threads(threads)


def _run_study(config: StudyConfig, progress: Callable[[str], None] | None) -> StudyResult:
    t0 = time.perf_counter()
    samplers = [resolve_sampler(s) for s in (config.samplers or INFO)]
    samplers = [s for s in samplers if s not in EXCLUDED]
    for sched in config.schedules:
        sigma_schedules.resolve(sched)      # fail before any work on a bad name
    table = DiscreteSchedule.from_name("scaled_linear")
    world = GaussianMixture.example(dim=config.dim)
    g = torch.Generator().manual_seed(config.seed)
    sigma_max = float(table.sigma_max)
    start = torch.randn(config.batch, config.dim, generator=g, dtype=torch.float64) * sigma_max
    exact = reference_solution(world, start, sigma_max, steps=config.reference_steps)
    truth_a, _ = world.sample(config.batch, torch.Generator().manual_seed(config.seed + 1))
    truth_b, _ = world.sample(config.batch, torch.Generator().manual_seed(config.seed + 2))
    floor = _energy_distance(truth_a, truth_b)
    result = StudyResult(config=config)
    for sid in samplers:
        info = INFO[sid]
        kind = "ode" if not info.stochastic else "sde" if sid in BROWNIAN else "ancestral"
        for sched in config.schedules:
            if progress:
                progress(f"{sid} / {sched}")
            target = exact
            if kind == "sde":
                gens = generators_for_seeds(range(config.seed, config.seed + config.batch))
                sig = _schedule_sigmas(sched, config.converged_steps, table)
                target = SAMPLERS[sid](world, start.clone(), sig, generator=gens)
            for n in config.steps:
                sig = _schedule_sigmas(sched, n, table)
                gens = generators_for_seeds(range(config.seed, config.seed + config.batch))
                calls = [0]

                def counted(x, s, **kw):
                    calls[0] += 1
                    return world(x, s, **kw)

                x = SAMPLERS[sid](counted, start.clone(), sig, generator=gens)
                if kind == "ancestral":
                    err = max(_energy_distance(x, truth_a) - floor, 0.0)
                else:
                    err = float(((x - target) ** 2).mean(1).sqrt().median())
                result.rows.append({"sampler": sid, "label": info.label, "schedule": sched, "steps": len(sig) - 1,
                                    "nfe": calls[0], "error": err, "kind": kind})
    result.seconds = time.perf_counter() - t0
    result.floor = floor
    return result


def write_csv(result: StudyResult, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sampler", "label", "schedule", "steps", "nfe", "error", "kind"])
        w.writeheader()
        w.writerows(result.rows)
    return path


def markdown_report(result: StudyResult, tol: float | None = None) -> str:
    cfg = result.config or StudyConfig()
    tol = cfg.tol if tol is None else tol
    steps = sorted({r["steps"] for r in result.rows})
    lines = [f"# Sampler study on an exact Gaussian-mixture world (dim {cfg.dim}, {cfg.batch} paths, seed {cfg.seed})",
             "", "Error: median over paths of the RMS distance to the converged result (ODE: exact flow solution; SDE: the same sampler at "
             f"{cfg.converged_steps} steps; ancestral: energy distance to exact samples above the sampling floor).",
             "", "## Steps to reach error < %g (— = not within the steps tried)" % tol, ""]
    schedules = list(dict.fromkeys(r["schedule"] for r in result.rows))
    samplers = list(dict.fromkeys(r["sampler"] for r in result.rows))
    reach = result.steps_to_tolerance(tol)
    lines.append("| sampler | kind | " + " | ".join(schedules) + " |")
    lines.append("|---|---|" + "---|" * len(schedules))
    kinds = {r["sampler"]: r["kind"] for r in result.rows}
    for s in samplers:
        cells = [str(reach.get((s, k)) or "—") for k in schedules]
        lines.append(f"| {INFO[s].label} (`{s}`) | {kinds[s]} | " + " | ".join(cells) + " |")
    for sched in schedules[:2]:
        lines += ["", f"## Error by steps, schedule `{sched}`", "",
                  "| sampler | NFE/step | " + " | ".join(str(n) for n in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        for s in samplers:
            errs = {r["steps"]: r["error"] for r in result.rows if r["sampler"] == s and r["schedule"] == sched}
            cells = ["" if n not in errs else "< floor" if kinds[s] == "ancestral" and errs[n] == 0 else f"{errs[n]:.2e}"
                     for n in steps]
            lines.append(f"| {INFO[s].label} | {INFO[s].nfe_per_step} | " + " | ".join(cells) + " |")
    lines += ["", f"Ancestral samplers: the energy distance of {cfg.batch} samples to {cfg.batch} exact samples, minus "
              f"the distance between two exact draws ({result.floor:.2e}, the floor); '< floor' = indistinguishable "
              "from exact samples at this sample size. The ODE samplers' floor near 1e-3 is the last step from SD's "
              "sigma_min 0.0292 to 0, which every sampler but LMS takes as a plain denoise.",
              "", f"Computed in {result.seconds:.1f} s."]
    return "\n".join(lines) + "\n"


def plot(result: StudyResult, path: Path, schedule: str | None = None) -> Path:
    """Error vs model evaluations, log-log, one line per sampler (one schedule)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("the study plot needs matplotlib: pip install 'diffusekit[plot]'") from e
    schedule = schedule or result.rows[0]["schedule"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, kinds, title in ((axes[0], ("ode",), "deterministic"), (axes[1], ("sde", "ancestral"), "stochastic")):
        for s in dict.fromkeys(r["sampler"] for r in result.rows):
            pts = sorted((r["nfe"], r["error"]) for r in result.rows
                         if r["sampler"] == s and r["schedule"] == schedule and r["kind"] in kinds and r["error"] > 0)
            if pts:
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=INFO[s].label)
        ax.axhline((result.config or StudyConfig()).tol, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("model evaluations")
        ax.set_ylabel("error (RMS; energy distance for ancestral)")
        ax.set_title(f"{title} samplers, {schedule} schedule")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines()[1:]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
