"""Peak-memory growth of one SD 1.5-sized forward on the CPU, to calibrate `pipelines/cost.py`.

    OMP_NUM_THREADS=1 python bench/memory_calibration.py vae 256 1     # VAE decode of one 256x256 image
    OMP_NUM_THREADS=1 python bench/memory_calibration.py unet 512 2    # UNet on a 64x64 latent, batch 2

Random weights (the shapes decide the memory); peak RSS after the forward minus before it. Run each case
in its own process. Results: docs/benchmarks.md ("Memory of a request").
"""
import resource
import sys
import time

import torch

from diffusekit.models.unet import UNetConfig, UNetModel
from diffusekit.models.vae import AutoencoderKL, VAEConfig


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(what: str, side: int, batch: int) -> None:
    torch.set_num_threads(1)
    with torch.no_grad():
        if what == "vae":
            model = AutoencoderKL(VAEConfig()).eval()
            z = torch.randn(batch, 4, side // 8, side // 8)
            base, t = rss(), time.time()
            model.decode(z)
        else:
            model = UNetModel(UNetConfig()).eval()
            x, ctx = torch.randn(batch, 4, side // 8, side // 8), torch.randn(batch, 77, 768)
            base, t = rss(), time.time()
            model(x, torch.full((batch,), 500.0), ctx)
    print(f"{what} {side}x{side} batch {batch}: +{(rss() - base) / 2**20:.0f} MB in {time.time() - t:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
