"""Training throughput: one optimizer step (forward, eps-MSE, backward, AdamW) of our UNet against a
diffusers UNet2DConditionModel of the same size and batch, fp32 and bf16 autocast, side by side.

    python bench/train.py [--batch 16] [--iters 5] [--threads 1] [--config configs/shapes.toml]

Both UNets get the same latent batch, timesteps and text context (a random (B, 77, width) tensor:
the text encoder is ours in both trainers and left out of the ratio). Our full trainer step
(text encoder + UNet, as `diffusekit train` runs it) is printed too. Prints images/s and the
ratio ours / diffusers (> 1 = faster).
"""
from __future__ import annotations

import argparse
import time

import torch

from diffusekit.training.config import load_config
from diffusekit.training.trainer import build_configs, build_models


def diffusers_unet(cfg):
    from diffusers import UNet2DConditionModel
    chans = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    down = tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth)
    up = tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth))
    # diffusers' `attention_head_dim` is the number of heads (a historic misnomer)
    heads = tuple(max(1, c // cfg.num_head_channels) if cfg.num_head_channels > 0 else cfg.num_heads for c in chans)
    return UNet2DConditionModel(
        sample_size=16, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=chans,
        layers_per_block=cfg.num_res_blocks, down_block_types=down, up_block_types=up,
        cross_attention_dim=cfg.context_dim, attention_head_dim=heads, norm_num_groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_in_transformer, flip_sin_to_cos=True, freq_shift=0)


def steps_per_second(step, iters: int) -> float:
    step()  # warm-up (allocations, oneDNN primitive caches)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return iters / (time.perf_counter() - t0)


def make_step(forward, params, x, bf16: bool):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = forward()
        loss = (pred.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/shapes.toml")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    ucfg, vcfg, tcfg = build_configs(cfg)
    size = cfg.data.size // (vcfg.downsample_factor if vcfg else 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, ucfg.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g)
    ctx = torch.randn(a.batch, 77, ucfg.context_dim, generator=g)
    ids = torch.randint(0, 49406, (a.batch, 77), generator=g)
    model, _ = build_models(cfg)
    ref = diffusers_unet(ucfg)
    n_ours = sum(p.numel() for p in model.unet.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"UNet parameters: ours {n_ours:,}  diffusers {n_ref:,}; batch {a.batch}, latents {size}x{size}, "
          f"{a.threads} thread(s)")
    print(f"{'precision':10s} {'ours img/s':>11s} {'diffusers img/s':>16s} {'ratio':>6s} {'ours+text img/s':>16s}")
    for bf16 in (False, True):
        ours = make_step(lambda: model.unet(x, t, ctx), list(model.unet.parameters()), x, bf16)
        theirs = make_step(lambda: ref(x, t, encoder_hidden_states=ctx).sample, list(ref.parameters()), x, bf16)
        full = make_step(lambda: model(x, t, ids), list(model.parameters()), x, bf16)
        a_ips = a.batch * steps_per_second(ours, a.iters)
        b_ips = a.batch * steps_per_second(theirs, a.iters)
        f_ips = a.batch * steps_per_second(full, a.iters)
        print(f"{'bf16' if bf16 else 'fp32':10s} {a_ips:11.1f} {b_ips:16.1f} {a_ips / b_ips:6.2f} {f_ips:16.1f}")


if __name__ == "__main__":
    main()
