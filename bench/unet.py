"""Speed of the SD 1.5 UNet: diffusekit `UNetModel` vs diffusers `UNet2DConditionModel`.

Both models hold the same random weights (ours aliases diffusers' tensors through the rename
table, so memory holds one copy per dtype) and get the same inputs: batch 2, 77-token context,
latents 32x32 and 64x64, fp32 and bf16 weights. The runs are interleaved (diffusers, ours, a
large matmul, repeated) so load on a shared machine hits all of them alike; medians are reported
as wall ms and CPU ms (process time, which is less sensitive to other processes), the ratio
ours / diffusers on both, the FLOPs of one call (counted with FlopCounterMode on the meta
device) and the achieved GFLOP/s next to a large matmul of the same dtype in the same run.

    python bench/unet.py            # 32x32 and 64x64, fp32 and bf16
    python bench/unet.py --quick    # 32x32 only, fewer iterations
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusekit.models import cpu_ops
from diffusekit.models.convert_unet import unet_config_from_diffusers, unet_state_dict_from_diffusers
from diffusekit.models.unet import UNetModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn):
    """(wall seconds, process CPU seconds, result) of one call."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def count_flops(config, size: int, batch: int, tokens: int) -> float:
    with torch.device("meta"):
        model = UNetModel(config)
        x = torch.randn(batch, config.in_channels, size, size)
        context = torch.randn(batch, tokens, config.context_dim)
        with FlopCounterMode(display=False) as counter:
            model(x, torch.full((batch,), 500.0), context)
    return counter.get_total_flops()


def ours_sharing(diffusers_unet, config) -> UNetModel:
    """UNetModel whose parameters are diffusers' tensors (no copy)."""
    with torch.device("meta"):
        model = UNetModel(config)
    model.load_state_dict(unet_state_dict_from_diffusers(diffusers_unet.state_dict(), config),
                          strict=True, assign=True)
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32x32 only, 1 warmup + 3 timed iterations")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="latent sides (default 32 64)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--matmul", type=int, default=2048, help="side of the reference square matmul")
    parser.add_argument("--fp32-linear", choices=["onednn", "mkl"], default="onednn",
                        help="our fp32 GEMMs at inference (linear layers and weight-dominated convolutions): "
                             "oneDNN's (the default path) or MKL's (the path before issue 15): an A/B against "
                             "the same reference")
    parser.add_argument("--fp32-conv", choices=["packed", "gemm"], default="packed",
                        help="our fp32 convolutions at inference: oneDNN with the packed weight, one image per call "
                             "(the default) or the im2col GEMM / stock route (the path before 2026-12-04): an A/B")
    args = parser.parse_args()
    if args.fp32_conv == "gemm":
        cpu_ops.Conv2d.fp32_packed = False
    if args.fp32_linear == "mkl":
        cpu_ops._onednn_linear = lambda x, weight, bias: False
    sizes = args.sizes or ([32] if args.quick else [32, 64])
    warmup = args.warmup if args.warmup is not None else 1
    iters = args.iters if args.iters is not None else (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import UNet2DConditionModel  # reference: a benchmark-only dependency

    torch.manual_seed(0)
    reference = UNet2DConditionModel(cross_attention_dim=768).eval()  # SD 1.5 layout, random init
    config = unet_config_from_diffusers(dict(reference.config))
    print(f"SD 1.5 UNet, {sum(p.numel() for p in reference.parameters()):,} parameters, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; warmup {warmup}, timed {iters} (medians); our fp32 GEMMs "
          f"{args.fp32_linear}, fp32 convolutions {args.fp32_conv}")

    gen = torch.Generator().manual_seed(1)
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        reference.to(dtype)
        ours = ours_sharing(reference, config)
        a = torch.randn(args.matmul, args.matmul, generator=gen).to(dtype)
        b = torch.randn(args.matmul, args.matmul, generator=gen).to(dtype)
        for size in sizes:
            x = torch.randn(args.batch, 4, size, size, generator=gen).to(dtype)
            t = torch.tensor([999.0, 321.5][: args.batch] + [500.0] * max(0, args.batch - 2))
            ctx = torch.randn(args.batch, 77, 768, generator=gen).to(dtype)
            times = {"diffusers": [], "ours": [], "matmul": []}
            with torch.inference_mode():
                for it in range(warmup + iters):
                    wd, cd, ref_out = timed(lambda: reference(x, t, ctx).sample)
                    wo, co, our_out = timed(lambda: ours(x, t, ctx))
                    wm, cm, _ = timed(lambda: a @ b)
                    if it >= warmup:
                        times["diffusers"].append((wd, cd))
                        times["ours"].append((wo, co))
                        times["matmul"].append((wm, cm))
            err = (ref_out.float() - our_out.float()).abs().max().item()
            med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
                   for k, v in times.items()}
            flops = count_flops(config, size, args.batch, 77)
            peak = 2 * args.matmul ** 3 / med["matmul"][0] / 1e9
            rows.append((size, name, med["diffusers"], med["ours"], flops, peak, err))
            print(f"  done {size}x{size} {name}", flush=True)

    print()
    print(f"{'latent':>7} {'dtype':>5} | {'diffusers ms':>12} {'ours ms':>9} {'ratio':>6} | "
          f"{'diff cpu ms':>11} {'ours cpu ms':>11} {'ratio':>6} | {'TFLOP':>6} {'ours GFLOP/s':>12} "
          f"{'matmul GFLOP/s':>14} {'%mm':>5} | {'max|diff|':>9}")
    for size, name, (wd, cd), (wo, co), flops, peak, err in rows:
        achieved = flops / wo / 1e9
        print(f"{size:>4}x{size:<2} {name:>5} | {wd * 1e3:>12.0f} {wo * 1e3:>9.0f} {wo / wd:>6.3f} | "
              f"{cd * 1e3:>11.0f} {co * 1e3:>11.0f} {co / cd:>6.3f} | {flops / 1e12:>6.3f} "
              f"{achieved:>12.1f} {peak:>14.1f} {100 * achieved / peak:>4.0f}% | {err:>9.2e}")
    print("ratio = ours / diffusers (below 1: ours faster); %mm = ours GFLOP/s over a "
          f"{args.matmul}^3 matmul of the same dtype timed in the same loop")


if __name__ == "__main__":
    main()
