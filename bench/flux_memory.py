"""Peak memory of a Flux.1 transformer loaded from a bf16 / fp8 single file and run once, on the CPU.

Writes a random Flux file in ComfyUI's layout (`model.diffusion_model.*`, streamed one tensor at a time, never the
whole model in memory) at full Flux.1 dev size by default (19 double + 38 single blocks, 11.9B parameters: 11.9 GB
in fp8 e4m3fn, 23.8 GB in bf16), then in a fresh subprocess loads it with `load_checkpoint` (dtype=None: the
weights stay as stored, memory-mapped) and runs one forward pass computing in float32 (`Flux.compute_dtype`, what
`Pipeline.from_pretrained` sets on a CPU: each linear layer upcasts its weight as it runs). It reports, in GiB:

  load        resident growth while load_checkpoint runs (mapped pages are not read yet)
  peak RSS    ru_maxrss over the whole run: file-backed pages of the mapping included (reclaimable page cache:
              the kernel drops them under pressure and re-reads them from the file)
  peak anon   the largest RssAnon seen (sampled every 10 ms): the memory that must fit, i.e. activations and the
              float32 copy of the layer being run
  file pages  RssFile after the pass (the mapped weights that were paged in)

    OMP_NUM_THREADS=1 python bench/flux_memory.py --dtype fp8                        # full 11.9B, 12 GB file
    OMP_NUM_THREADS=1 python bench/flux_memory.py --dtype bf16 --double 2 --single 4  # full width, 6 blocks
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffusekit.models import flux
from diffusekit.models.keys import module_shapes

DTYPES = {"fp8": (torch.float8_e4m3fn, "F8_E4M3"), "bf16": (torch.bfloat16, "BF16")}
PREFIX = "model.diffusion_model."


def write_random_flux(path: Path, config: flux.FluxConfig, dtype_name: str, seed: int = 0) -> int:
    """Stream a random N(0, 0.02) Flux state dict (norm gains 1) to a safetensors file; returns its bytes."""
    from diffusekit.models.families import tiny_family
    from diffusekit.models.loading import FAMILY_METADATA_KEY

    from diffusekit.models.clip import CLIPTextModel
    from diffusekit.models.loading import VAE_PREFIX
    from diffusekit.models.t5 import T5EncoderModel
    from diffusekit.models.vae import AutoencoderKL

    dtype, st_name = DTYPES[dtype_name]
    shapes = module_shapes(lambda: flux.Flux(config))
    # the transformer at full size; a toy VAE and toy encoders (kB) complete the file, as the family metadata says
    family = replace(tiny_family("flux-dev" if config.guidance_embed else "flux-schnell"), unet=config)
    small = {VAE_PREFIX + k: v for k, v in AutoencoderKL(family.vae).state_dict().items()}
    for spec, cls in zip(family.text_encoders, (CLIPTextModel, T5EncoderModel)):
        small |= {spec.prefix + k: v for k, v in cls(spec.config).state_dict().items()}
    header, offset = {"__metadata__": {"format": "pt", FAMILY_METADATA_KEY: family.to_json()}}, 0
    names = sorted(shapes)
    for name in names:
        n = torch.Size(shapes[name]).numel() * dtype.itemsize
        header[PREFIX + name] = {"dtype": st_name, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    for name, t in small.items():
        n = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    # one pool of 2^24 random N(0, 0.02) values, cycled through every tensor: the bytes on disk are as many
    # as a real file's (memory is what is measured), without drawing 12e9 normals on a shared CPU
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 24, generator=g).mul_(0.02).to(dtype).view(torch.uint8).numpy().tobytes()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            shape = shapes[name]
            if name.endswith(".scale"):
                f.write(torch.ones(shape).to(dtype).view(torch.uint8).numpy().tobytes())
                continue
            left = torch.Size(shape).numel() * dtype.itemsize
            start = (hash(name) % len(pool)) // dtype.itemsize * dtype.itemsize   # tensors start at different places
            while left:
                piece = pool[start:start + left]
                f.write(piece)
                left -= len(piece)
                start = 0
        for t in small.values():
            f.write(t.float().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return offset


def write_tiny_t5_tokenizer(folder: Path) -> Path:
    """A minimal T5-style tokenizer.json (the file's toy T5 needs one to load; no text is encoded here)."""
    import tokenizers as tk

    tok = tk.Tokenizer(tk.models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581a", -1.0)], unk_id=2))
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace()
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


CHILD = r"""
import resource, sys, threading, time, json
import torch
from diffusekit.models.loading import load_checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
peak_anon = [0]
stop = False
def sample():
    while not stop:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
path, latent, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base_rss = status("VmRSS")
t0 = time.perf_counter()
parts = load_checkpoint(path, family=None, dtype=None, t5_tokenizer=sys.argv[4])
net = parts.unet
net.compute_dtype = torch.float32
load_s = time.perf_counter() - t0
load_rss = status("VmRSS") - base_rss
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 16, latent, latent, generator=g)
ctx = torch.randn(1, tokens, net.config.context_in_dim, generator=g)
y = torch.randn(1, net.config.vec_in_dim, generator=g)
t1 = time.perf_counter()
with torch.inference_mode():
    out = net(x, torch.tensor([700.0]), ctx, y, guidance=3.5)
run_s = time.perf_counter() - t1
stop = True
print(json.dumps(dict(load_rss=load_rss, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss,
                      peak_anon=peak_anon[0], file_pages=status("RssFile"), base_rss=base_rss,
                      weight_dtype=str(net.img_in.weight.dtype), finite=bool(torch.isfinite(out).all()),
                      load_s=load_s, run_s=run_s)))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp8")
    parser.add_argument("--double", type=int, default=19)
    parser.add_argument("--single", type=int, default=38)
    parser.add_argument("--latent", type=int, default=16, help="latent side (16 = 128 px: 64 image tokens)")
    parser.add_argument("--tokens", type=int, default=64, help="T5 tokens")
    parser.add_argument("--dir", default="/tmp/flux-memory", help="where the random file is written (and removed)")
    parser.add_argument("--keep", action="store_true", help="keep the written file")
    args = parser.parse_args()
    config = replace(flux.DEV, depth=args.double, depth_single_blocks=args.single)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"flux-{args.double}-{args.single}-{args.dtype}.safetensors"
    t0 = time.perf_counter()
    size = write_random_flux(path, config, args.dtype) if not path.is_file() else path.stat().st_size
    n = sum(torch.Size(s).numel() for s in module_shapes(lambda: flux.Flux(config)).values())
    print(f"Flux.1 dev width, {args.double} double + {args.single} single blocks: {n / 1e9:.2f}B parameters, "
          f"{args.dtype} file {size / 2**30:.2f} GiB (written in {time.perf_counter() - t0:.0f} s); one forward pass "
          f"at latent {args.latent}x{args.latent} + {args.tokens} text tokens, float32 compute, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.latent), str(args.tokens),
                              str(write_tiny_t5_tokenizer(folder))],
                             capture_output=True, text=True).stdout
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    r = json.loads(out.strip().splitlines()[-1])
    gib = 2**30
    print(f"weights stay {r['weight_dtype']}; load {r['load_s']:.1f} s, forward {r['run_s']:.1f} s, output finite: "
          f"{r['finite']}")
    print(f"{'file GiB':>9} | {'load GiB':>8} {'peak RSS GiB':>12} {'peak anon GiB':>13} {'file pages GiB':>14}")
    print(f"{size / gib:>9.2f} | {r['load_rss'] / gib:>8.2f} {r['peak_rss'] / gib:>12.2f} {r['peak_anon'] / gib:>13.2f} "
          f"{r['file_pages'] / gib:>14.2f}")
    print("(RSS figures are growth over the interpreter's start; peak anon and file pages are absolute)")


if __name__ == "__main__":
    main()
