"""Speed of the Flux.1 transformer at full width: diffusekit `Flux` vs diffusers `FluxTransformer2DModel`.

Both hold the same random weights (ours aliases diffusers' tensors through the rename table where the layouts
agree; the fused qkv / linear1 and the swapped final modulation are the only copies) and get the same inputs:
Flux.1 dev's width (3072, 24 heads of 128, RoPE axes 16/56/56, guidance embedder) with a few of its blocks
(default 2 double-stream + 4 single-stream of the 19 + 38: the full model is 11.9B parameters, 48 GB in fp32),
512 T5 tokens (4096 wide), a 768-wide pooled vector, fp32 and bf16 weights. diffusers' 2x2 packing of the
latent and its position ids are built inside its timed call (ours does both inside `forward`). The runs are
interleaved (diffusers and ours in alternating order, then a large matmul, repeated) so load on a shared
machine hits all alike; medians are reported as wall ms and CPU ms, the ratio ours / diffusers on both, the
FLOPs of one call and the achieved GFLOP/s next to a large matmul of the same dtype.

    python bench/flux.py --latent 32 --threads 1            # 256 px (256 image + 512 text tokens), as docs/benchmarks.md
    python bench/flux.py --quick                            # latent 16, 1 double + 1 single block, 1 timed iteration
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusekit.models import flux
from diffusekit.models.convert_flux import flux_config_from_diffusers, flux_state_dict_from_diffusers
from diffusekit.models.flux import Flux

sys.path.insert(0, str(Path(__file__).parent))
from mmdit import interleaved, ours_sharing, print_table  # noqa: E402  (the MMDiT bench's helpers: one copy)
from unet import DTYPES  # noqa: E402


def diffusers_config(double: int, single: int) -> dict:
    return dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def count_flops(config, latent: int, batch: int, tokens: int) -> float:
    with torch.device("meta"):
        model = Flux(config)
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(batch, 16, latent, latent), torch.full((batch,), 500.0),
                  torch.randn(batch, tokens, 4096), torch.randn(batch, 768), torch.full((batch,), 3.5))
    return counter.get_total_flops()


def random_reference(cfg: dict, dtype: torch.dtype, seed: int = 0):
    """diffusers' Flux transformer with N(0, 0.02) weights (unit-gain norms), built without an fp32 copy."""
    from diffusers import FluxTransformer2DModel  # reference: a benchmark-only dependency

    with torch.device("meta"):
        ref = FluxTransformer2DModel(**cfg).to(dtype)
    ref = ref.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if ".norm_" in name and name.endswith("weight") and t.ndim == 1:
                t.fill_(1.0)
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(0.02))
    return ref


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="latent 16, 1 + 1 blocks, 1 timed iteration")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 32 = 256 px)")
    parser.add_argument("--double", type=int, default=None, help="double-stream blocks (default 2; Flux.1 has 19)")
    parser.add_argument("--single", type=int, default=None, help="single-stream blocks (default 4; Flux.1 has 38)")
    parser.add_argument("--tokens", type=int, default=512, help="T5 tokens (dev 512, schnell 256)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--matmul", type=int, default=2048, help="side of the reference square matmul")
    args = parser.parse_args()
    latent = args.latent or (16 if args.quick else 32)
    double = args.double if args.double is not None else (1 if args.quick else 2)
    single = args.single if args.single is not None else (1 if args.quick else 4)
    args.iters = iters = args.iters or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    dcfg = diffusers_config(double, single)
    config = flux_config_from_diffusers(dcfg)
    assert config.hidden_size == flux.DEV.hidden_size and config.axes_dim == flux.DEV.axes_dim
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Flux(config).parameters())
    h = w = latent // 2
    print(f"Flux.1 dev width, {double} double + {single} single blocks ({n_params / 1e9:.2f}B parameters of 11.90B), "
          f"latent {latent}x{latent} ({h * w} image + {args.tokens} text tokens), batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; warmup {args.warmup}, timed {iters} (medians)")
    flops = count_flops(config, latent, args.batch, args.tokens)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        reference = random_reference(dcfg, dtype)
        ours = ours_sharing(reference, config, Flux, flux_state_dict_from_diffusers)
        a = torch.randn(args.matmul, args.matmul, generator=gen).to(dtype)
        b = torch.randn(args.matmul, args.matmul, generator=gen).to(dtype)
        x = torch.randn(args.batch, 16, latent, latent, generator=gen).to(dtype)
        t = torch.linspace(1.0, 0.3215, args.batch)
        ctx = torch.randn(args.batch, args.tokens, 4096, generator=gen).to(dtype)
        pooled = torch.randn(args.batch, 768, generator=gen).to(dtype)
        guidance = torch.full((args.batch,), 3.5)

        def reference_call():
            out = reference(hidden_states=flux.patchify(x, 2), encoder_hidden_states=ctx, pooled_projections=pooled,
                            timestep=t, img_ids=flux.image_ids(h, w), txt_ids=torch.zeros(args.tokens, 3),
                            guidance=guidance).sample
            return flux.unpatchify(out, h, w, 2)

        rows.append((name, *interleaved(reference_call, lambda: ours(x, t * 1000, ctx, pooled, guidance), a, b, args,
                                         name)))
        del reference, ours

    print_table(rows, flops)
    print("(bf16: diffusers rounds t * 1000 and guidance * 1000 to bf16 before the sinusoidal embedding, as BFL's "
          "reference does; ours embeds them in float32 as ComfyUI does, so bf16 outputs differ by more than rounding)")


if __name__ == "__main__":
    main()
