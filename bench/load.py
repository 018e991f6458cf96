"""Peak memory of `load_checkpoint` on an SD 1.5-size single-file checkpoint.

Writes a random-weight SD 1.5 checkpoint (UNet 859.5M + VAE 83.7M + CLIP-L 123.1M parameters)
in LDM layout without diffusekit metadata (so the family is detected from the keys) to a temp dir, fp16 (~2.1 GB) and fp32 (~4.3 GB), then loads it in a fresh
subprocess per case and reports, from `resource.getrusage(RUSAGE_SELF).ru_maxrss` minus the
process's baseline after imports:
  load   peak RSS while `load_checkpoint` runs (tokenizer included);
  touch  peak RSS after every weight has been read once (first use of memory-mapped weights);
  model  bytes of all parameters and buffers as loaded (the resident size the dtype implies).
The reference case is the usual recipe: build the modules normally (fp32, random init), then
`load_state_dict(safetensors.torch.load_file(path))`, which copies every tensor.

    python bench/load.py [--dir DIR] [--no-fp32] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
from diffusekit.models import load_checkpoint, get_family
from diffusekit.models.unet import UNetModel
from diffusekit.models.vae import AutoencoderKL
from diffusekit.models.clip import CLIPTextModel
import safetensors.torch
path, mode, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
dtype = None if dtype == "none" else getattr(torch, dtype)
maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
base = maxrss()
t0 = time.perf_counter()
if mode == "ours":
    parts = load_checkpoint(path, dtype=dtype, probe_prediction=False)
    modules = [parts.unet, parts.vae, *parts.text_encoders]
else:  # the usual recipe: real modules (random init), then a copying load_state_dict
    fam = get_family("sd1")
    sd = safetensors.torch.load_file(path)
    modules = [UNetModel(fam.unet), AutoencoderKL(fam.vae), CLIPTextModel(fam.text_encoders[0].config)]
    for m, prefix in zip(modules, ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")):
        m.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        if dtype is not None:
            m.to(dtype)
    del sd
seconds = time.perf_counter() - t0
load = maxrss() - base
tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
for t in tensors:  # read every byte once
    t.reshape(-1).view(torch.uint8).max()  # no converted temporary
touch = maxrss() - base
model = sum(t.numel() * t.element_size() for t in tensors)
print(json.dumps({"load": load, "touch": touch, "model": model, "seconds": seconds}))
"""

GEN = r"""
import sys, torch
from diffusekit.models import get_family
from diffusekit.models.loading import _build
from diffusekit.models.weight_files import write_safetensors
from diffusekit.models.unet import UNetModel
from diffusekit.models.vae import AutoencoderKL
from diffusekit.models.clip import CLIPTextModel
fam = get_family("sd1")
g = torch.Generator().manual_seed(0)
modules = [_build(UNetModel, fam.unet), _build(AutoencoderKL, fam.vae), _build(CLIPTextModel, fam.text_encoders[0].config)]
for m in modules:  # one fp16 tensor at a time: the generator never holds an fp32 copy
    m.load_state_dict({k: torch.randn(v.shape, generator=g).mul_(0.02).half() for k, v in m.state_dict().items()},
                      assign=True)
flat = {}
for m, prefix in zip(modules, ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")):
    flat.update({prefix + k: v for k, v in m.state_dict().items()})
write_safetensors(sys.argv[1], flat, {"format": "pt"})  # no diffusekit metadata, like a file from the web
"""


def child(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temp dir, removed)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the 4.3 GB fp32 file")
    ap.add_argument("--no-reference", action="store_true", help="skip the copying reference recipe")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        f16, f32 = Path(tmp) / "sd15-fp16.safetensors", Path(tmp) / "sd15-fp32.safetensors"
        t = time.perf_counter()
        child(GEN, str(f16))
        print(f"wrote {f16.name}: {f16.stat().st_size / 1e9:.3f} GB in {time.perf_counter() - t:.0f} s")
        cases = [(f16, "ours", "none"), (f16, "ours", "bfloat16"), (f16, "ours", "float32")]
        if not args.no_reference:
            cases.append((f16, "reference", "none"))
        if not args.no_fp32:
            child("import sys, torch; from diffusekit.models import load_checkpoint, save_checkpoint;"
                  "save_checkpoint(load_checkpoint(sys.argv[1], dtype=torch.float32, probe_prediction=False),"
                  " sys.argv[2])", str(f16), str(f32))
            print(f"wrote {f32.name}: {f32.stat().st_size / 1e9:.3f} GB")
            cases += [(f32, "ours", "none"), (f32, "ours", "bfloat16"), (f32, "ours", "float16")]
        print(f"{'file':<22}{'loader':<11}{'dtype':<10}{'file GB':>8}{'model GB':>9}{'load GB':>8}"
              f"{'touch GB':>9}{'touch/file':>11}{'touch/model':>12}{'s':>6}")
        for path, mode, dtype in cases:
            r = json.loads(child(CHILD, str(path), mode, dtype))
            size = path.stat().st_size
            print(f"{path.name:<22}{mode:<11}{dtype:<10}{size / 1e9:>8.3f}{r['model'] / 1e9:>9.3f}"
                  f"{r['load'] / 1e9:>8.3f}{r['touch'] / 1e9:>9.3f}{r['touch'] / size:>11.2f}"
                  f"{r['touch'] / r['model']:>12.2f}{r['seconds']:>6.1f}")


if __name__ == "__main__":
    main()
