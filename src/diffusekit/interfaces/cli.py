"""The `diffusekit` command line. Thin: parse, call the library, print where things went."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _study_samplers(args) -> int:
    from ..evaluation import study

    cfg = study.StudyConfig(
        samplers=tuple(args.samplers.split(",")) if args.samplers else (),
        schedules=tuple(args.schedules.split(",")) if args.schedules else study.DEFAULT_SCHEDULES,
        steps=tuple(int(s) for s in args.steps.split(",")) if args.steps else study.DEFAULT_STEPS,
        batch=args.batch, dim=args.dim, seed=args.seed, tol=args.tol)
    if args.quick:
        cfg.steps, cfg.batch, cfg.converged_steps = (5, 10, 20, 40), min(cfg.batch, 64), 200
        cfg.schedules = tuple(cfg.schedules[:3])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    samplers = [s for s in (cfg.samplers or study.INFO) if s not in study.EXCLUDED]
    bar = tqdm(total=len(samplers) * len(cfg.schedules), desc="sampler x schedule", unit="pair")

    def progress(label):
        bar.set_postfix_str(label)
        bar.update(1)

    result = study.run_study(cfg, progress=progress)
    bar.close()
    csv_path = study.write_csv(result, out / "sampler_study.csv")
    md_path = out / "sampler_study.md"
    md_path.write_text(study.markdown_report(result))
    written = [csv_path, md_path]
    try:
        written.append(study.plot(result, out / "sampler_study.png", schedule=cfg.schedules[0]))
    except RuntimeError as e:
        print(f"note: {e}", file=sys.stderr)
    print(study.markdown_report(result).split("## Error by steps")[0])
    for p in written:
        print(f"wrote {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusekit", description="Stable-Diffusion-style image generation, from the math up.")
    sub = p.add_subparsers(dest="command", required=True)

    st = sub.add_parser("study", help="studies that explain samplers and schedules")
    st_sub = st.add_subparsers(dest="study", required=True)
    sm = st_sub.add_parser("samplers", help="every sampler x schedule on an exact Gaussian-mixture world: "
                                             "error vs steps, steps to tolerance (table, CSV, plot)")
    sm.add_argument("--samplers", help="comma-separated sampler ids or names (default: all)")
    sm.add_argument("--schedules", help="comma-separated schedule names (default: all SD-range ones)")
    sm.add_argument("--steps", help="comma-separated step counts (default 5..100)")
    sm.add_argument("--batch", type=int, default=256, help="paths per run (default 256)")
    sm.add_argument("--dim", type=int, default=8, help="dimension of the exact world (default 8)")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--tol", type=float, default=1e-2, help="error tolerance for 'steps to tolerance'")
    sm.add_argument("--quick", action="store_true", help="a small version that runs in seconds")
    sm.add_argument("--out", default="out/study", help="output folder (default out/study)")
    sm.set_defaults(func=_study_samplers)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:   # errors that teach: no traceback for bad input
        print(f"diffusekit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
