"""LoRA training step time: our LoRANetwork (forward hooks on the frozen UNet, training/lora_network.py)
against diffusers + peft (`unet.add_adapter(LoraConfig(...))`) on the same UNet weights, side by side.

    python bench/lora_train.py [--size tiny|sd15] [--latent 32] [--batch 1] [--rank 4] [--iters 3] [--threads 1]

tiny = the shipped `shapes` UNet (16x16 latents, batch 16 by default); sd15 = the SD 1.5 UNet
architecture (860M parameters, random weights; --latent 32 = 256 px images). One step = forward,
eps-MSE, backward, AdamW on the LoRA parameters only, LoRA on the attention projections (to_q, to_k,
to_v, to_out.0) of every attention layer, rank 4, in both. The text context is a random (B, 77, C)
tensor in both. Prints seconds per step (median of --iters after a warm-up) and ours / diffusers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train import diffusers_unet  # noqa: E402  (bench/train.py: the same UNet as a diffusers model)

from diffusekit.models.convert_unet import unet_state_dict_to_diffusers  # noqa: E402
from diffusekit.models.unet import UNetConfig, UNetModel  # noqa: E402
from diffusekit.training.lora_network import LoRANetwork  # noqa: E402


def seconds_per_step(steps, iters: int) -> list[float]:
    """Median seconds of each step function; the steps alternate so that load on a shared machine
    falls on both alike."""
    for step in steps:
        step()                               # warm-up: allocations, oneDNN primitive caches
    times = [[] for _ in steps]
    for _ in range(iters):
        for k, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def make_step(forward, params, target):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = (forward().float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    ap.add_argument("--latent", type=int, default=0, help="latent side (default: 16 tiny, 32 sd15)")
    ap.add_argument("--batch", type=int, default=0, help="default: 16 tiny, 1 sd15")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from peft import LoraConfig

    if a.size == "tiny":
        from diffusekit.models.loading import load_checkpoint
        from diffusekit.pipelines.shipped import resolve_model
        ours = load_checkpoint(resolve_model("shapes"), dtype=torch.float32).unet   # the file is fp16
    else:
        torch.manual_seed(0)
        ours = UNetModel(UNetConfig())        # the dataclass defaults are SD 1.5
    cfg: UNetConfig = ours.config
    latent, batch = a.latent or (16 if a.size == "tiny" else 32), a.batch or (16 if a.size == "tiny" else 1)
    ref = diffusers_unet(cfg)
    ref.load_state_dict(unet_state_dict_to_diffusers(ours.state_dict(), cfg))
    for m in (ours, ref):
        m.requires_grad_(False).train()
    ref.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    net = LoRANetwork(SimpleNamespace(unet=ours, text_encoders=[], family=SimpleNamespace(name="sd1")),
                      rank=a.rank, alpha=a.rank, targets=("attn",)).attach()
    theirs_params = [p for p in ref.parameters() if p.requires_grad]
    n_ours, n_theirs = sum(p.numel() for p in net.parameters()), sum(p.numel() for p in theirs_params)
    assert n_ours == n_theirs, (n_ours, n_theirs)   # the same LoRA layers

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn(batch, cfg.out_channels, latent, latent, generator=g)
    mine, theirs = seconds_per_step([make_step(lambda: ours(x, t, ctx), list(net.parameters()), target),
                                     make_step(lambda: ref(x, t, encoder_hidden_states=ctx).sample, theirs_params,
                                               target)], a.iters)
    print(f"{a.size} UNet ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M), batch {batch}, latent "
          f"{latent}x{latent}, LoRA rank {a.rank} on attention ({n_ours / 1e3:.0f}k params), {a.threads} thread(s)")
    print(f"ours {mine:.3f} s/step   diffusers+peft {theirs:.3f} s/step   ours/diffusers speed {theirs / mine:.2f}x")


if __name__ == "__main__":
    main()
