"""Speed of the UNet on a CUDA GPU: diffusekit `UNetModel` vs diffusers `UNet2DConditionModel`.

The GPU counterpart of bench/unet.py: same random weights in both (ours aliases diffusers'
tensors through the rename table), fp16, batch 2 (one CFG pair), 77-token context, interleaved
runs timed with CUDA events, medians. Layouts: SD 1.5 at 64x64 latents (512 px) and SDXL at
128x128 latents (1024 px; timing only, its ADM input is built differently by the two APIs so
outputs are compared for SD 1.5 alone).

    python bench/unet_gpu.py             # needs a CUDA device and diffusers
"""
from __future__ import annotations

import argparse
import statistics

import torch

from diffusekit.models.convert_unet import unet_config_from_diffusers, unet_state_dict_from_diffusers
from diffusekit.models.unet import UNetModel

SDXL = dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, layers_per_block=2)


def cuda_ms(fn) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    from diffusers import UNet2DConditionModel   # reference: a benchmark-only dependency
    dev, dtype, B = "cuda", torch.float16, args.batch
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, batch {B}, "
          f"warmup {args.warmup}, timed {args.iters} (medians of interleaved runs)")
    rows = []
    for name, kw, side, ctx_dim in (("SD 1.5", dict(cross_attention_dim=768), 64, 768), ("SDXL", SDXL, 128, 2048)):
        torch.manual_seed(0)
        ref = UNet2DConditionModel(**kw).eval().to(dev, dtype)
        cfg = unet_config_from_diffusers(dict(ref.config))
        with torch.device("meta"):
            ours = UNetModel(cfg)
        ours.load_state_dict(unet_state_dict_from_diffusers(ref.state_dict(), cfg), strict=True, assign=True)
        ours.eval()
        g = torch.Generator(dev).manual_seed(1)
        x = torch.randn(B, 4, side, side, generator=g, device=dev, dtype=dtype)
        t = torch.tensor([999.0, 321.5][:B] + [500.0] * max(0, B - 2), device=dev)
        ctx = torch.randn(B, 77, ctx_dim, generator=g, device=dev, dtype=dtype)
        if name == "SDXL":
            te, ids = torch.randn(B, 1280, device=dev, dtype=dtype), torch.tensor([[1024., 1024, 0, 0, 1024, 1024]] * B, device=dev)
            run_ref = lambda: ref(x, t, ctx, added_cond_kwargs={"text_embeds": te, "time_ids": ids}).sample
            y = torch.randn(B, 2816, device=dev, dtype=dtype)
            run_ours = lambda: ours(x, t, ctx, y)
        else:
            run_ref, run_ours = (lambda: ref(x, t, ctx).sample), (lambda: ours(x, t, ctx))
        td, to = [], []
        with torch.inference_mode():
            for i in range(args.warmup + args.iters):
                d, o = cuda_ms(run_ref), cuda_ms(run_ours)
                if i >= args.warmup:
                    td.append(d)
                    to.append(o)
            err = (run_ref().float() - run_ours().float()).abs().max().item() if name != "SDXL" else float("nan")
        md, mo = statistics.median(td), statistics.median(to)
        rows.append((name, side, md, mo, err))
        print(f"  done {name}", flush=True)
        del ref, ours
        torch.cuda.empty_cache()
    print(f"\n{'model':>7} {'latent':>8} | {'diffusers ms':>12} {'ours ms':>8} {'ratio':>6} | {'max|diff|':>9}")
    for name, side, md, mo, err in rows:
        print(f"{name:>7} {side:>4}x{side:<3} | {md:>12.2f} {mo:>8.2f} {mo / md:>6.3f} | {err:>9.2e}")
    print("ratio = ours / diffusers (below 1: ours faster)")


if __name__ == "__main__":
    main()
