"""Speed of the SD3 Medium MMDiT: diffusekit `MMDiT` vs diffusers `SD3Transformer2DModel`.

Both hold the same random weights (ours aliases diffusers' tensors through the rename table where the
layouts agree; the fused qkv and swapped final modulation are the only copies) and get the same inputs:
the SD3 Medium architecture (24 joint blocks, width 1536, 2.03B parameters), the SD3 text context of
77 CLIP + 256 T5 tokens (4096 wide), 2048-wide pooled text, fp32 and bf16 weights. The runs are
interleaved (diffusers and ours, in alternating order, then a large matmul, repeated) so load on a
shared machine hits all of them alike; medians are reported as wall ms and CPU ms (process time, less sensitive to other processes),
the ratio ours / diffusers on both, the FLOPs of one call (FlopCounterMode on the meta device) and the
achieved GFLOP/s next to a large matmul of the same dtype in the same run. Each dtype's model is built
on its own (random normal weights drawn in that dtype), so memory holds one model at a time (8 GB fp32).

    python bench/mmdit.py --latent 32 --batch 1 --threads 1     # 256 px, what docs/benchmarks.md reports
    python bench/mmdit.py --quick                               # latent 16, 1 timed iteration
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusekit.models import mmdit
from diffusekit.models.convert_mmdit import mmdit_config_from_diffusers, mmdit_state_dict_from_diffusers
from diffusekit.models.mmdit import MMDiT

sys.path.insert(0, str(Path(__file__).parent))
from unet import DTYPES, timed  # noqa: E402  (the UNet bench's helpers: one copy)

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)


def count_flops(config, latent: int, batch: int, tokens: int) -> float:
    with torch.device("meta"):
        model = MMDiT(config)
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(batch, 16, latent, latent), torch.full((batch,), 500.0),
                  torch.randn(batch, tokens, 4096), torch.randn(batch, 2048))
    return counter.get_total_flops()


def random_reference(dtype: torch.dtype, seed: int = 0):
    """diffusers' SD3 Medium transformer with N(0, 0.02) weights (unit-gain norms), built without an fp32 copy."""
    from diffusers import SD3Transformer2DModel  # reference: a benchmark-only dependency

    with torch.device("meta"):
        ref = SD3Transformer2DModel(**SD3_MEDIUM).to(dtype)
    ref = ref.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                t.fill_(1.0)
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(0.02))
    return ref


def ours_sharing(reference, config, cls=MMDiT, convert=mmdit_state_dict_from_diffusers) -> torch.nn.Module:
    """Our `cls(config)` built on meta, aliasing the diffusers `reference`'s tensors through `convert`."""
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(convert(reference.state_dict(), config), strict=True, assign=True)
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="latent 16, 1 warmup + 1 timed iteration")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 32 = 256 px)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--matmul", type=int, default=2048, help="side of the reference square matmul")
    args = parser.parse_args()
    latent = args.latent or (16 if args.quick else 32)
    args.iters = iters = args.iters or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = mmdit_config_from_diffusers(SD3_MEDIUM)
    assert config == mmdit.SD3_MEDIUM
    tokens = 77 + 256
    print(f"SD3 Medium MMDiT (2.03B parameters), latent {latent}x{latent} ({(latent // 2) ** 2} image + {tokens} "
          f"text tokens), batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU "
          f"capability {torch.backends.cpu.get_cpu_capability()}; warmup {args.warmup}, timed {iters} (medians)")
    flops = count_flops(config, latent, args.batch, tokens)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        reference = random_reference(dtype)
        ours = ours_sharing(reference, config)
        a = torch.randn(args.matmul, args.matmul, generator=gen).to(dtype)
        b = torch.randn(args.matmul, args.matmul, generator=gen).to(dtype)
        x = torch.randn(args.batch, 16, latent, latent, generator=gen).to(dtype)
        t = torch.linspace(999.0, 321.5, args.batch)
        ctx = torch.randn(args.batch, tokens, 4096, generator=gen).to(dtype)
        pooled = torch.randn(args.batch, 2048, generator=gen).to(dtype)
        run_ref = lambda: reference(hidden_states=x, encoder_hidden_states=ctx,  # noqa: E731
                                    pooled_projections=pooled, timestep=t).sample
        rows.append((name, *interleaved(run_ref, lambda: ours(x, t, ctx, pooled), a, b, args, name)))
        del reference, ours

    print_table(rows, flops)


def interleaved(run_ref, run_ours, a, b, args, name):
    """Median (wall s, CPU s) of diffusers and ours over `args.iters` runs after `args.warmup`, in alternating
    order with a large matmul a @ b after each pair (so machine load hits all alike); returns (diffusers, ours,
    matmul GFLOP/s, max relative difference of the outputs). Shared by bench/flux.py."""
    times = {"diffusers": [], "ours": [], "matmul": []}
    with torch.inference_mode():
        for it in range(args.warmup + args.iters):
            if it % 2 == 0:   # alternate who goes first: no order bias on a busy machine
                (wd, cd, ref_out), (wo, co, our_out) = timed(run_ref), timed(run_ours)
            else:
                (wo, co, our_out), (wd, cd, ref_out) = timed(run_ours), timed(run_ref)
            wm, cm, _ = timed(lambda: a @ b)
            if it >= args.warmup:
                times["diffusers"].append((wd, cd))
                times["ours"].append((wo, co))
                times["matmul"].append((wm, cm))
            print(f"  {name} iteration {it}: diffusers {wd:.2f} s, ours {wo:.2f} s", flush=True)
    err = ((ref_out.float() - our_out.float()).abs().max() / ref_out.float().abs().max()).item()
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    return med["diffusers"], med["ours"], 2 * a.shape[0] ** 3 / med["matmul"][0] / 1e9, err


def print_table(rows, flops: float) -> None:
    print()
    print(f"{'dtype':>5} | {'diffusers ms':>12} {'ours ms':>9} {'ratio':>6} | {'diff cpu ms':>11} {'ours cpu ms':>11} "
          f"{'ratio':>6} | {'TFLOP':>6} {'ours GFLOP/s':>12} {'matmul GFLOP/s':>14} | {'max rel diff':>12}")
    for name, (wd, cd), (wo, co), peak, err in rows:
        print(f"{name:>5} | {wd * 1e3:>12.0f} {wo * 1e3:>9.0f} {wo / wd:>6.3f} | {cd * 1e3:>11.0f} {co * 1e3:>11.0f} "
              f"{co / cd:>6.3f} | {flops / 1e12:>6.3f} {flops / wo / 1e9:>12.1f} {peak:>14.1f} | {err:>12.2e}")
    print("ratio = ours / diffusers (below 1: ours faster); max rel diff = max |ours - diffusers| / max |diffusers|")


if __name__ == "__main__":
    main()
