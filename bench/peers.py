"""diffusekit against the tools a speed-minded CPU user picks instead, on the same random-weight SD 1.5 model.

One command, every case in a fresh subprocess, one after another, same threads:
  ours       diffusekit `Pipeline` (fp32; bf16 weights)
  diffusers  `StableDiffusionPipeline` (fp32; bf16)
  openvino   optimum-intel `OVStableDiffusionPipeline` on the OpenVINO runtime (fp32 and bf16 inference
             precision hints; int8 = NNCF 8-bit weight compression at export)
  sdcpp      stable-diffusion.cpp through `stable-diffusion-cpp-python` (f32, f16, q8_0 weights)
The model is bench/txt2img.py's random SD 1.5 (UNet 859.5M, VAE 83.7M, CLIP-L 123.1M; seed 0), written once as a
diffusers folder; openvino exports that folder to IR (once per precision kind), sdcpp reads it as one LDM-layout
single file written by diffusekit's `save_checkpoint`. Generation: one prompt + empty negative, Euler on the
Karras schedule, CFG 7 (cond/uncond in one UNet batch of 2 where the tool does that), VAE decode.

Per case:
  image s    wall (and process CPU) seconds of one whole generation at --steps steps, after the model is loaded
  step s     one sampler step = (image at --steps - image at 1 step) / (--steps - 1): the UNet call(s) of a step
  peak RSS   ru_maxrss of the process (weights + activations + runtime)
  diff       max / mean |image - ours fp32 image| in uint8 levels (sdcpp draws its own noise: not comparable)
and, for the whole table, the FLOPs of one UNet step (torch.utils.flop_counter on our UNet, batch 2) and this
CPU's measured matmul peak at the same thread count (fp32 and bf16 2048^3 GEMMs, best of 5), so that every
step time is also a fraction of the hardware limit.

The peers need packages diffusekit does not: install them into a separate environment (they pin their own
transformers/diffusers) and point --peers-python at it:
    python -m venv /tmp/peers && /tmp/peers/bin/pip install -c <(echo torch==2.13.0) torch==2.13.0 \
        optimum-intel openvino nncf diffusers transformers safetensors stable-diffusion-cpp-python
    PYTHONPATH=src python bench/peers.py --peers-python /tmp/peers/bin/python            # 256 px, 20 steps
    PYTHONPATH=src python bench/peers.py --cases ours:fp32 openvino:fp32 --steps 4        # a subset
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from txt2img import CFG, PROMPT, SEED, setup  # noqa: E402  (the shared random SD 1.5 folder)

ALL_CASES = ["ours:fp32", "ours:bf16", "diffusers:fp32", "diffusers:bf16", "openvino:fp32", "openvino:bf16",
             "openvino:int8", "sdcpp:f32", "sdcpp:f16", "sdcpp:q8_0"]
PEERS = ("openvino", "sdcpp")

CHILD = r"""
import json, resource, sys, time
import numpy as np
impl, prec, folder, size, steps_list, threads, out_npy, extra = sys.argv[1:9]
size, threads = int(size), int(threads)
steps_list = [int(s) for s in steps_list.split(",")]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
PROMPT, SEED, CFG = __PROMPT__, __SEED__, __CFG__
res = {}
t0 = time.perf_counter()
if impl in ("ours", "diffusers", "openvino"):
    import torch
    torch.set_num_threads(threads)
    from diffusekit.pipelines.latents import initial_noise
if impl == "ours":
    from diffusekit import GenerationParams, Pipeline
    pipe = Pipeline.from_pretrained(folder, dtype=None if prec == "fp32" else torch.bfloat16)
    res["load"] = time.perf_counter() - t0
    def gen(steps):
        r = pipe.generate(GenerationParams(prompt=PROMPT, steps=steps, sampler_name="Euler", scheduler="Karras",
                                           cfg_scale=CFG, seed=SEED, width=size, height=size))
        return np.asarray(r.images[0])
    if extra == "flops":   # FLOPs of one UNet call at batch 2 (cond + uncond), counted by torch
        from torch.utils.flop_counter import FlopCounterMode

        from diffusekit.models import cpu_ops
        # count on aten's GEMMs and convolutions: the counter does not see mkldnn's fused linear or its packed conv
        fast = cpu_ops._onednn_linear
        cpu_ops._onednn_linear, cpu_ops.Conv2d.fp32_packed = (lambda x, weight, bias: False), False
        unet = pipe.parts.unet
        x = torch.zeros(2, 4, size // 8, size // 8, dtype=next(unet.parameters()).dtype)
        ctx = torch.zeros(2, 77, 768, dtype=x.dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            unet(x, torch.tensor([500.0, 500.0]), ctx)
        res["flops"] = fc.get_total_flops()
        cpu_ops._onednn_linear, cpu_ops.Conv2d.fp32_packed = fast, True   # the timed runs take the fast paths
elif impl in ("diffusers", "openvino"):
    if impl == "diffusers":
        import diffusers
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=torch.float32 if prec == "fp32" else torch.bfloat16, safety_checker=None,
            requires_safety_checker=False)
    else:
        from optimum.intel import OVStableDiffusionPipeline
        hint = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[prec]
        pipe = OVStableDiffusionPipeline.from_pretrained(
            extra, compile=False, ov_config={"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": str(threads),
                                            "CACHE_DIR": ""})
        pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
        pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    res["load"] = time.perf_counter() - t0
    def gen(steps):
        pipe.scheduler.set_timesteps(steps)
        sigma0 = float(pipe.scheduler.sigmas[0])
        noise, _ = initial_noise((1, 4, size // 8, size // 8), [SEED])
        dt = torch.float32 if prec != "bf16" or impl == "openvino" else torch.bfloat16
        latents = (noise * sigma0 / float(pipe.scheduler.init_noise_sigma)).to(dt)
        with torch.no_grad():
            im = pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=CFG, height=size,
                      width=size, latents=latents, output_type="np").images[0]
        return (np.asarray(im, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)
elif impl == "sdcpp":
    from stable_diffusion_cpp import StableDiffusion
    pipe = StableDiffusion(model_path=extra, n_threads=threads, wtype=prec, verbose=False)
    res["load"] = time.perf_counter() - t0
    def gen(steps):
        ims = pipe.generate_image(prompt=PROMPT, negative_prompt="", cfg_scale=CFG, width=size, height=size,
                                  sample_method="euler", scheduler="karras", sample_steps=steps, seed=SEED)
        return np.asarray(ims[0].convert("RGB"))
gen(1)                                        # warm-up: first-call allocations, lazy compilation
for steps in steps_list:
    w, c = time.perf_counter(), time.process_time()
    image = gen(steps)
    res[f"wall{steps}"], res[f"cpu{steps}"] = time.perf_counter() - w, time.process_time() - c
np.save(out_npy, image)
res["rss"] = rss()
print(json.dumps(res))
""".replace("__PROMPT__", repr(PROMPT)).replace("__SEED__", str(SEED)).replace("__CFG__", str(CFG))


def matmul_peak(threads: int) -> dict[str, float]:
    """GFLOP per CPU-second of a 2048^3 GEMM, best of 5, fp32 and bf16, at `threads` torch threads. CPU seconds,
    not wall seconds: on a shared machine they are what the process itself spent (summed over its threads)."""
    import torch
    torch.set_num_threads(threads)
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        a @ b
        best = min(_cpu_timed(lambda: a @ b) for _ in range(5))
        out[name] = 2 * 2048 ** 3 / best / 1e9
    return out


def _cpu_timed(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def _legacy_text_keys(folder: Path) -> Path:
    """The folder with its CLIP text encoder keyed `text_model.*`, as transformers before 5.2x wrote it and as the
    older transformers that optimum-intel pins reads it (it would otherwise initialise the encoder at random);
    the other parts are symlinks."""
    from safetensors.torch import load_file, save_file
    out = folder.parent / f"{folder.name}-legacy-text"
    if (out / "model_index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "text_encoder").mkdir(exist_ok=True)
    (out / "text_encoder" / "config.json").write_bytes((folder / "text_encoder" / "config.json").read_bytes())
    sd = load_file(folder / "text_encoder" / "model.safetensors")
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()},
              out / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    for part in folder.iterdir():
        if part.name != "text_encoder" and not (out / part.name).exists():
            (out / part.name).symlink_to(part.resolve())
    return out


def prepare(impl: str, prec: str, folder: Path, peers_python: str) -> str:
    """The model path a case loads (exported once and cached next to the diffusers folder)."""
    if impl == "openvino":
        kind = "int8" if prec == "int8" else "fp"
        out = folder.parent / f"{folder.name}-openvino-{kind}"
        if not (out / "model_index.json").is_file():
            folder = _legacy_text_keys(folder)
            print(f"exporting the model to OpenVINO IR ({kind}) in {out} (once) ...", file=sys.stderr, flush=True)
            code = ("import sys\nfrom optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig\n"
                    "q = OVWeightQuantizationConfig(bits=8) if sys.argv[3] == 'int8' else None\n"
                    "p = OVStableDiffusionPipeline.from_pretrained(sys.argv[1], export=True, compile=False, "
                    "load_in_8bit=False, quantization_config=q)\np.save_pretrained(sys.argv[2])\n")
            subprocess.run([peers_python, "-c", code, str(folder), str(out), kind], check=True)
        return str(out)
    if impl == "sdcpp":
        out = folder.parent / f"{folder.name}.safetensors"
        if not out.is_file():
            from diffusekit import Pipeline
            from diffusekit.models.loading import save_checkpoint
            print(f"writing the LDM single file {out} (once) ...", file=sys.stderr, flush=True)
            save_checkpoint(Pipeline.from_pretrained(folder).parts, out)
        return str(out)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=ALL_CASES, help=f"impl:precision among {ALL_CASES}")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--peers-python", default=sys.executable,
                        help="the interpreter with optimum-intel/openvino and stable-diffusion-cpp-python")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "diffusekit-bench" / "sd15-random"))
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    bad = [c for c in args.cases if c not in ALL_CASES]
    if bad:
        parser.error(f"unknown case(s) {bad}; valid: {ALL_CASES}")
    import numpy as np

    folder, work = Path(args.cache), Path(tempfile.mkdtemp())
    setup(folder)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                                                    os.environ.get("PYTHONPATH")])))
    results, t_all = {}, time.perf_counter()
    for case in args.cases:
        impl, prec = case.split(":")
        try:
            extra = prepare(impl, prec, folder, args.peers_python)
        except Exception as e:          # a peer that cannot be installed or exported here: say so, go on
            print(f"  {case}: preparing the model failed: {e}", file=sys.stderr)
            continue
        if impl == "ours" and prec == "fp32":
            extra = "flops"
        python = args.peers_python if impl in PEERS else sys.executable
        print(f"{case} ...", file=sys.stderr, flush=True)
        cmd = [python, "-c", CHILD, impl, prec, str(folder), str(args.size), f"1,{args.steps}", str(args.threads),
               str(work / f"{impl}-{prec}.npy"), extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
        if proc.returncode != 0:
            print(f"  {case} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = matmul_peak(args.threads)
    flops = results.get("ours:fp32", {}).get("flops")
    ref = work / "ours-fp32.npy"
    caps = {k: v for k, v in __import__("torch").cpu.get_capabilities().items() if k.startswith(("amx", "avx512"))}
    flags = [k for k in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512_vnni") if caps.get(k)]
    step_flops = f"{flops / 1e9:.0f} GFLOP" if flops else "not counted (no ours:fp32 case)"
    print(f"\nSD 1.5 architecture, random weights, {args.size}x{args.size}, {args.steps} Euler/Karras steps, CFG {CFG}, "
          f"{args.threads} thread(s); CPU flags {flags or 'none of AMX/AVX512-BF16'}; matmul peak fp32 "
          f"{peak['fp32']:.0f} / bf16 {peak['bf16']:.0f} GFLOP per CPU-s; one UNet step (batch 2) = {step_flops}; "
          f"load average {os.getloadavg()[0]:.1f}; bench wall {time.perf_counter() - t_all:.0f} s\n")
    base = results.get("ours:fp32")
    print("| case | image s (cpu s) | step s (cpu s) | vs ours fp32: image wall (cpu) | step GFLOP per CPU-s "
          "(% of same-dtype peak) | load s | peak RSS MB | image diff max / mean |")
    print("|---|---|---|---|---|---|---|---|")
    for case, r in results.items():
        impl, prec = case.split(":")
        n = args.steps
        step = (r[f"wall{n}"] - r["wall1"]) / (n - 1) if n > 1 else r["wall1"]
        step_cpu = (r[f"cpu{n}"] - r["cpu1"]) / (n - 1) if n > 1 else r["cpu1"]
        eff = ""
        if flops and step_cpu > 0:
            gf = flops / step_cpu / 1e9
            pk = peak["fp32" if prec in ("fp32", "f32", "int8") else "bf16"]
            eff = f"{gf:.0f} ({100 * gf / pk:.0f}%)"
        rel = f"{r[f'wall{n}'] / base[f'wall{n}']:.2f} ({r[f'cpu{n}'] / base[f'cpu{n}']:.2f})" if base else "-"
        diff = "-"
        out = work / f"{impl}-{prec}.npy"
        if impl != "sdcpp" and ref.is_file() and out.is_file():
            d = np.abs(np.load(out).astype(np.int16) - np.load(ref).astype(np.int16))
            diff = f"{d.max()} / {d.mean():.2f}"
        print(f"| {case} | {r[f'wall{n}']:.1f} ({r[f'cpu{n}']:.1f}) | {step:.2f} ({step_cpu:.2f}) | {rel} | {eff} | {r['load']:.1f} | "
              f"{r['rss']:,.0f} | {diff} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "peak": peak, "flops": flops, "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
