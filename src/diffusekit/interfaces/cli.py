"""The `diffusekit` command line. Thin: parse, call the library, print where things went.

    diffusekit generate PROMPT [--model shapes] [--steps 20] [--sampler "DPM++ 2M"] [--scheduler Karras] ...
    diffusekit generate --from IMAGE.png         the image again, bit for bit (ours; A1111's with RNG: CPU)
    diffusekit info IMAGE.png                     its generation parameters (ours or A1111's)
    diffusekit info MODEL                         a checkpoint's family, spaces and shapes (no weights read)
    diffusekit compare PROMPT --samplers "Euler,DPM++ 2M" --schedulers "Normal,Karras" [--video]
    diffusekit train CONFIG [--resume]
    diffusekit serve [--host 127.0.0.1] [--port 7860] [--model shapes] [--lora-dir DIR] [--embeddings-dir DIR]
                     [--max-pixel-steps N] [--max-memory-mb MB]
    diffusekit workflow FILE.json [--out DIR]     a ComfyUI API-format workflow (or a PNG carrying one)
    diffusekit study samplers [--quick]

Bad input is one line on stderr and exit status 2, never a traceback (`diffusekit --debug ...` shows it).
Progress bars go to stderr when it is a terminal; the paths of what was written go to stdout.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .cli_info import cmd_info

DEFAULT_MODEL = "shapes"
DTYPES = ("fp32", "bf16", "fp16")
PROCESS_MODES = ("auto", "preview", "decode")

# infotext keys that say where an image came from, not how to make it (the rest: pipelines.infotext.FIELDS)
_INFOTEXT_META = {"Prompt", "Negative prompt", "Model", "Model hash", "Version", "RNG", "ENSD", "Refiner"}

# generate/compare flag (argparse dest) -> GenerationParams field; None = not given on the command line
FLAG_FIELDS = {
    "negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler_name", "scheduler": "scheduler",
    "cfg_scale": "cfg_scale", "seed": "seed", "subseed": "subseed", "subseed_strength": "subseed_strength",
    "width": "width", "height": "height", "batch_size": "batch_size", "n_iter": "n_iter", "clip_skip": "clip_skip",
    "denoising_strength": "denoising_strength", "mask_blur": "mask_blur", "eta": "eta", "cfg_rescale": "cfg_rescale",
    "hires_scale": "hr_scale", "hires_steps": "hr_second_pass_steps", "hires_upscaler": "hr_upscaler",
    "refiner": "refiner_checkpoint", "refiner_switch_at": "refiner_switch_at", "sde_noise": "sde_noise",
    "guidance": "guidance",
}


def _note(text: str) -> None:
    print(f"diffusekit: note: {text}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- shared pieces
def params_from_infotext(fields: dict) -> tuple[dict, list[str]]:
    """GenerationParams fields from a parsed A1111 infotext (`parse_infotext`), and notes on what will not be
    reproduced. Values that are not numbers where numbers belong are a ValueError naming the key."""
    from ..pipelines.infotext import params_from_fields, read_keys
    out: dict = {"prompt": fields.get("Prompt", ""), "negative_prompt": fields.get("Negative prompt", "")}
    out |= params_from_fields(fields)
    if "hr_scale" in out:
        out["enable_hr"] = True
    notes = []
    rng = fields.get("RNG", "GPU")
    if rng != "CPU":
        notes.append(f"the image's noise came from A1111's {rng} generator (RNG: {rng}); diffusekit draws noise on "
                     "the CPU (A1111's RNG: CPU), so the same seed gives a different image")
    ours = fields.get("Version", "").startswith("diffusekit")
    if "SDE" in fields.get("Sampler", "") and "SDE noise" not in fields and not ours:
        notes.append("A1111 and ComfyUI draw the SDE samplers' noise from torchsde's Brownian tree: add "
                     "--sde-noise a1111 (or comfyui) to draw the same")
    if fields.get("ENSD", "0") not in ("0", ""):
        notes.append(f"ENSD {fields['ENSD']} (eta noise seed delta) is not supported: ancestral samplers will differ")
    used = read_keys() | _INFOTEXT_META
    unused = [k for k in fields if k not in used]
    if unused:
        notes.append(f"infotext keys not used: {', '.join(unused)}")
    return out, notes


def _open_image(path: str, flag: str):
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()
    except UnidentifiedImageError:
        raise ValueError(f"{flag} {path}: not an image Pillow can read") from None


def _csv(text: str | None, kind, flag: str) -> list | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{flag} {text!r}: give a comma-separated list")
    out = []
    for t in items:
        try:
            out.append(kind(t))
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {t!r} is not a{'n integer' if kind is int else ' number'}") from None
    return out


def _next_index(folder: Path, prefix: str = "") -> int:
    """A1111's file numbering: one more than the highest `<prefix>NNNNN-...` already in the folder."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d{{5,}})[-.]")
    found = [int(m.group(1)) for f in folder.iterdir() if (m := pattern.match(f.name))] if folder.is_dir() else []
    return max(found, default=-1) + 1


def _check_names(params) -> None:
    """Sampler and schedule names, checked before a model is loaded."""
    from ..core import sigmas as sigma_schedules
    from ..pipelines.pipeline import split_sampler_name

    _, scheduler = split_sampler_name(params.sampler_name, params.scheduler)
    sigma_schedules.resolve(scheduler)


def _model_facts(args) -> tuple[int, dict]:
    """(latent factor, the settings the model's card recommends) of the model `args` names, read from its
    header and card without loading weights: the defaults and the size checks of generate / compare."""
    from ..models import read_family
    from ..pipelines.shipped import recommended, resolve_model

    path = resolve_model(args.model or DEFAULT_MODEL)
    return read_family(path).latent_factor, recommended(path)


def _load_pipeline(args):
    import torch

    from ..pipelines.pipeline import Pipeline

    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return Pipeline.from_pretrained(args.model or DEFAULT_MODEL, device=args.device, dtype=dtype,
                                    lora_dir=getattr(args, "lora_dir", None),
                                    embeddings_dir=getattr(args, "embeddings_dir", None),
                                    vae_tiling=getattr(args, "vae_tiling", False),
                                    low_memory=getattr(args, "low_memory", False))


class StepBars:
    """Progress fed by the pipeline's per-step callback: one bar per sampling pass (steps, ETA) on a
    terminal; elsewhere a line per pass (and one every 10 s of a long pass). leave=False: a bar that
    clears itself, and no lines (an outer progress reports)."""

    def __init__(self, leave: bool = True):
        self.bar, self.leave = None, leave

    def __call__(self, info) -> None:
        from ..progress import progress

        if self.bar is None or info.step == 0:
            self.close()
            desc = info.pass_name if info.job_count == 1 else f"{info.pass_name} {info.job_no + 1}/{info.job_count}"
            self.bar = progress(info.steps, desc, "step", leave=self.leave, lines=self.leave)
        self.bar.set_postfix_str(f"sigma {info.sigma:.3g}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------- generate
def _generate_params(args) -> tuple[object, list[str], dict]:
    """GenerationParams: the model card's settings, then the --from image's infotext, then the flags given."""
    from ..pipelines.infotext import parse_infotext, read_infotext
    from ..pipelines.params import GenerationParams
    from ..pipelines.shipped import SHIPPED

    fields, notes, source = {}, [], {}
    if args.from_image:
        if not Path(args.from_image).is_file():
            raise FileNotFoundError(f"--from {args.from_image}: no such file")
        text = read_infotext(args.from_image)
        if not text:
            raise ValueError(f"--from {args.from_image}: the image carries no generation parameters "
                             "(no PNG 'parameters' text chunk or EXIF UserComment)")
        source = parse_infotext(text)
        fields, notes = params_from_infotext(source)
        notes = [n for n in notes if not (args.sde_noise and "--sde-noise" in n)]
    elif args.prompt is None:
        raise ValueError("give a PROMPT (\"\" makes an unconditional image) or --from IMAGE")
    if args.from_image and args.model is None and source.get("Model") in SHIPPED:
        args.model = source["Model"]
    factor, recommended = _model_facts(args)
    fields = {**recommended, **fields}
    if args.prompt is not None:
        fields["prompt"] = args.prompt
    for dest, name in FLAG_FIELDS.items():
        value = getattr(args, dest)
        if value is not None:
            fields[name] = value
    if args.hires_scale is not None:
        fields["enable_hr"] = True
    if args.init_image:
        init = _open_image(args.init_image, "--init-image")
        fields["init_images"] = [init]
        for side, v in (("width", init.width), ("height", init.height)):   # default: the init image's size
            fields.setdefault(side, max(8, v // factor * factor))
    if args.mask:
        if not args.init_image:
            raise ValueError(f"--mask {args.mask}: inpainting needs --init-image too")
        fields["mask"] = _open_image(args.mask, "--mask")
    if args.from_image and not args.init_image and "Denoising strength" in source and "Hires upscale" not in source:
        what = "inpainting" if "Mask blur" in source else "img2img"
        raise ValueError(f"--from {args.from_image}: the image was made by {what} (Denoising strength "
                         f"{source['Denoising strength']}): pass the same --init-image"
                         f"{' and --mask' if what == 'inpainting' else ''} to reproduce it")
    if args.from_image and "Refiner" in source and not args.refiner:
        raise ValueError(f"--from {args.from_image}: the image was made with the refiner {source['Refiner']!r}: "
                         "pass --refiner PATH to that checkpoint")
    if (args.denoising_strength is not None and not args.init_image and args.hires_scale is None
            and not fields.get("enable_hr")):
        notes.append("--denoising-strength applies to img2img (--init-image) and the hires pass (--hires-scale); "
                     "ignored here")
    if not args.save_process and (args.process_mode is not None or args.fps is not None):
        raise ValueError("--process-mode and --fps describe the denoising video: add --save-process")
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps {args.fps}: must be > 0 (the notes use 1 frame per step per second)")
    params = GenerationParams(**fields)
    params.save_process = bool(args.save_process)
    params.validate(factor=factor)
    _check_names(params)
    return params, notes, source


class _FirstInterrupt:
    """Ctrl-C during generation: the first one asks the pipeline to stop after the current step, so the
    images (the last x0 estimate, as A1111's Interrupt) are still saved; a second one aborts at once.
    Installed only in the main thread (signal handlers cannot be set elsewhere), and not at all when SIGINT
    is ignored at start (a background job: `cmd &`, nohup), as well-behaved programs do; on exit the previous
    handler, whatever it was, is put back."""

    def __init__(self):
        self._set, self._installed, self._old = False, False, None

    def is_set(self) -> bool:
        return self._set

    def _handler(self, signum, frame):
        if self._set:
            raise KeyboardInterrupt
        self._set = True
        _note("interrupted: saving the image(s) after this step (Ctrl-C again to abort without saving)")

    def __enter__(self):
        import signal
        import threading
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
            self._old = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc):
        import signal
        if self._installed:   # None: the previous handler was not set from Python; SIG_DFL restores that
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._old is None else self._old)
            self._installed = False
        return False


def cmd_generate(args) -> int:
    from ..media.process import write_process_video
    from ..pipelines.infotext import save_png_with_infotext

    params, notes, source = _generate_params(args)
    for n in notes:
        _note(n)
    pipe = _load_pipeline(args)
    want = source.get("Model hash")
    if want and pipe.parts.hash10 and want != pipe.parts.hash10:
        _note(f"{args.from_image} was made with model {source.get('Model', '?')!r} (hash {want}); this is "
              f"{pipe.name!r} (hash {pipe.parts.hash10}), so the image will differ: pass --model with that checkpoint")
    bars = StepBars()
    stop = _FirstInterrupt()
    try:
        with stop:
            result = pipe.generate(params, callback=bars, should_stop=stop.is_set)
    finally:
        bars.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = _next_index(out)
    for i, (img, seed, text) in enumerate(zip(result.images, result.seeds, result.infotexts)):
        stem = f"{index + i:05d}-{seed}"
        print(save_png_with_infotext(img, out / f"{stem}.png", text))
        if params.save_process:
            for path in write_process_video(pipe, result, out / f"{stem}-process", index=i,
                                            mode=args.process_mode or "auto", fps=args.fps or 1.0):
                print(path)
    if result.interrupted:
        _note("the run was interrupted: the images hold the last x0 estimate")
    return 0


# ---------------------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    from ..media.compare import compare, plan, write_comparison
    from ..pipelines.params import GenerationParams
    from ..progress import progress as progress_bar

    if not args.video and (args.process_mode is not None or args.fps is not None):
        raise ValueError("--process-mode and --fps describe the comparison video: add --video")
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps {args.fps}: must be > 0 (the notes use 1 frame per step per second)")
    factor, recommended = _model_facts(args)
    flags = {name: getattr(args, dest) for dest, name in FLAG_FIELDS.items()
             if hasattr(args, dest) and getattr(args, dest) is not None}
    base = GenerationParams(prompt=args.prompt, **{**recommended, **flags})
    base.validate(factor=factor)
    base = base.copy(seed=base.resolved_seed())
    lists = dict(samplers=_csv(args.samplers, str, "--samplers"), schedulers=_csv(args.schedulers, str, "--schedulers"),
                 steps_list=_csv(args.steps_list, int, "--steps-list"), cfg_list=_csv(args.cfg_list, float, "--cfg-list"))
    models = _csv(args.models, str, "--models")
    if models and not args.axes.startswith("models-"):
        raise ValueError(f"--models compares models: use --axes models-x-steps or models-x-samplers (got {args.axes})")
    by_model = args.axes.startswith("models-")
    if by_model and args.model:
        raise ValueError("--axes models-x-*: name the models with --models A,B (not --model)")
    cells = plan(base, args.axes, models=models, **lists)[0]            # every name checked before loading
    if by_model:
        from ..media.compare import DEFAULTS
        pipe = {m: _load_pipeline(argparse.Namespace(**{**vars(args), "model": m})) for m in models or DEFAULTS["models"]}
    else:
        pipe = _load_pipeline(args)
    bar = progress_bar(sum(len(r) for r in cells), "compare", "image", interval=0)   # a line per finished cell
    steps = StepBars(leave=False)

    def progress(label):
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    try:
        comp = compare(pipe, base, args.axes, video=args.video, process_mode=args.process_mode or "auto",
                       progress=progress, callback=steps, **lists)
    finally:
        steps.close()
        bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"compare-{_next_index(out, 'compare-'):05d}-{base.seed}"
    for path in write_comparison(comp, stem, fps=args.fps or 1.0):
        print(path)
    return 0


# ---------------------------------------------------------------------------------------- train / serve
def cmd_train(args) -> int:
    try:
        from ..training.trainer import train_from_config
    except ModuleNotFoundError as e:
        if e.name not in ("diffusekit.training.trainer", "diffusekit.training"):
            raise
        raise RuntimeError("training is not in this install (diffusekit.training.trainer is missing)") from None
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"{args.config}: no such config file")
    result = train_from_config(args.config, resume=args.resume)
    if result is not None:
        print(result)
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    if args.api_auth is not None and ":" not in args.api_auth:
        raise ValueError(f"--api-auth {args.api_auth!r}: expected user:password")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: must be from 1 to 65535")
    if args.queue_size < 0:
        raise ValueError(f"--queue-size {args.queue_size}: must be >= 0")
    kwargs = dict(host=args.host, port=args.port, model=args.model, models_dir=args.models_dir,
                  api_auth=args.api_auth, queue_size=args.queue_size)
    if args.device is not None:
        kwargs["device"] = args.device
    if args.lora_dir is not None:
        kwargs["lora_dir"] = args.lora_dir
    if args.embeddings_dir is not None:
        kwargs["embeddings_dir"] = args.embeddings_dir
    for name in ("max_pixel_steps", "max_memory_mb"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    serve(**kwargs)
    return 0


# ---------------------------------------------------------------------------------------- workflow
def read_workflow(path: Path) -> dict:
    """An API-format workflow from a .json file or from a PNG's `prompt` chunk (ComfyUI's and ours)."""
    if path.suffix.lower() == ".png":
        from PIL import Image
        with Image.open(path) as img:
            text = img.info.get("prompt")
        if not text:
            raise ValueError(f"{path}: the PNG carries no ComfyUI `prompt` chunk")
    else:
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]                     # a POST /prompt body
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ValueError(f"{path} is ComfyUI's editor format; export it with \"Save (API Format)\" (or pass a PNG)")
    return data


def cmd_workflow(args) -> int:
    from ..graph import Environment, GraphExecutor, validate_prompt

    prompt = read_workflow(Path(args.file))
    out = Path(args.out)
    env = Environment(models_dir=args.models_dir, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                      output_dir=out, input_dir=args.input_dir or Path(args.file).resolve().parent,
                      temp_dir=out / "temp", device=args.device or "cpu")
    checked = validate_prompt(prompt, env)
    if not checked.ok:
        lines = [f"node {n} ({e['class_type']}): {err['message']}: {err['details']}"
                 for n, e in checked.node_errors.items() for err in e["errors"]]
        raise ValueError("; ".join([checked.error["message"] + (": " + checked.error["details"] if not lines else "")]
                                   + lines))
    progress = _Progress(enabled=sys.stderr.isatty())

    def send(event, data):
        if event == "executing" and data.get("node") is not None:
            progress.label = f"node {data['node']} {prompt[data['node']]['class_type']}"
        elif event == "progress":
            progress.step(data["value"], data["max"])

    record = GraphExecutor(env).run(prompt, "cli", checked.outputs, send=send)
    progress.close()
    if not record.success:
        e = record.error or {}
        raise RuntimeError(f"node {e.get('node_id')} ({e.get('node_type')}) failed: {e.get('exception_message')}")
    for node, ui in record.outputs.items():
        for f in ui.get("images", []):
            print(env.folder(f["type"]) / f["subfolder"] / f["filename"])
    return 0


class _Progress:
    """One self-rewriting stderr line: the running node and its sampling step."""

    def __init__(self, enabled: bool):
        self.enabled, self.label = enabled, ""

    def step(self, value: int, total: int) -> None:
        if self.enabled:
            print(f"\r{self.label}: step {value}/{total}   ", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


# ---------------------------------------------------------------------------------------- study
def _study_samplers(args) -> int:
    from ..evaluation import study

    cfg = study.StudyConfig(
        samplers=tuple(args.samplers.split(",")) if args.samplers else (),
        schedules=tuple(args.schedules.split(",")) if args.schedules else study.DEFAULT_SCHEDULES,
        steps=tuple(int(s) for s in args.steps.split(",")) if args.steps else study.DEFAULT_STEPS,
        batch=args.batch, dim=args.dim, seed=args.seed, tol=args.tol)
    if args.quick:
        cfg.steps, cfg.batch, cfg.converged_steps = (5, 10, 20, 40), min(cfg.batch, 64), 200
        cfg.schedules = tuple(cfg.schedules[:3])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ..progress import progress

    samplers = [s for s in (cfg.samplers or study.INFO) if s not in study.EXCLUDED]
    bar = progress(len(samplers) * len(cfg.schedules), "sampler x schedule", "pair")

    def progress(label):
        bar.set_postfix_str(label)
        bar.update(1)

    result = study.run_study(cfg, progress=progress)
    bar.close()
    csv_path = study.write_csv(result, out / "sampler_study.csv")
    md_path = out / "sampler_study.md"
    md_path.write_text(study.markdown_report(result))
    written = [csv_path, md_path]
    try:
        written.append(study.plot(result, out / "sampler_study.png", schedule=cfg.schedules[0]))
    except RuntimeError as e:
        print(f"note: {e}", file=sys.stderr)
    print(study.markdown_report(result).split("## Error by steps")[0])
    for p in written:
        print(f"wrote {p}")
    return 0


# ---------------------------------------------------------------------------------------- parser
def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"a shipped model name (default {DEFAULT_MODEL!r}), a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; 'cuda' for a GPU)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights' precision (default fp32)")
    p.add_argument("--lora-dir", default=None,
                   help="folder of LoRA .safetensors files that <lora:NAME:WEIGHT> in the prompt names")
    p.add_argument("--embeddings-dir", default=None,
                   help="folder of textual-inversion embeddings (.pt/.bin/.safetensors); a file's name written in "
                        "the prompt or negative prompt stands for its vectors (A1111's embeddings/)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode / encode images larger than 512 px in overlapping 512 px tiles (less peak memory "
                        "at 1024 px and up; diffusers' enable_vae_tiling)")
    p.add_argument("--low-memory", action="store_true",
                   help="CPU, fp32: keep an fp16 / bf16 file's UNet weights as stored and upcast one layer at a "
                        "time (SDXL's UNet in 5 GB instead of 10; ComfyUI's manual cast)")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (the CFG uncond text)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model card's, 5 for the shipped models; else 7)")
    p.add_argument("--guidance", type=float, default=None,
                   help="Flux.1 dev's distilled guidance, a model input (Forge's 'Distilled CFG Scale'; default 3.5); "
                        "other models ignore it. With Flux keep --cfg-scale 1 (the default there): > 1 adds true CFG")
    p.add_argument("--seed", type=int, default=None, help="-1 = random (default); image i uses seed + i")
    p.add_argument("--width", type=int, default=None, help="a multiple of the model's VAE factor (8 for SD, 4 for shapes; default: the native size)")
    p.add_argument("--height", type=int, default=None, help="a multiple of the model's VAE factor (8 for SD, 4 for shapes; default: the native size)")
    p.add_argument("--clip-skip", type=int, default=None, help="A1111 'Clip skip' (default 1)")


def cmd_eval(args) -> int:
    from ..evaluation.evaluate import format_markdown, run_from_args
    from ..progress import progress

    bar = None

    def advance(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress(total, "eval", "image")
        bar.update(done - bar.n)

    try:
        result = run_from_args(args, progress=advance)
    finally:
        if bar is not None:
            bar.close()
    print(format_markdown(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusekit", description="Stable-Diffusion-style image generation, from the math up.")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    from ..version import __version__
    p.add_argument("--version", action="version", version=f"diffusekit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="txt2img / img2img / inpainting; PNGs carry A1111's parameters",
                       description="Write PNGs named NNNNN-SEED.png carrying the A1111 infotext, and print their paths.")
    g.add_argument("prompt", nargs="?", default=None,
                   help='the prompt (A1111 syntax: (word:1.2), [from:to:when], BREAK); "" = unconditional')
    _model_flags(g)
    _sampling_flags(g)
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model card's, else 20)")
    g.add_argument("--sampler", default=None,
                   help='A1111 name or id: "Euler", "DPM++ 2M", dpmpp_2m, ... (default: the model card\'s, else DPM++ 2M)')
    g.add_argument("--scheduler", default=None,
                   help='sigma schedule: Karras, Normal, Exponential, ..., "Automatic" = the sampler\'s own '
                        '(default: the model card\'s, Karras for the shipped models; else Automatic)')
    g.add_argument("--batch-size", type=int, default=None, help="images per batch (default 1)")
    g.add_argument("--n-iter", type=int, default=None, help="batches (default 1)")
    g.add_argument("--subseed", type=int, default=None, help="A1111 variation seed")
    g.add_argument("--subseed-strength", type=float, default=None, help="variation strength in [0, 1]")
    g.add_argument("--eta", type=float, default=None, help="ancestral / DDIM eta (default: the sampler's)")
    g.add_argument("--cfg-rescale", type=float, default=None, help="CFG rescale phi in [0, 1] (Lin et al. 2023)")
    g.add_argument("--sde-noise", choices=("diffusekit", "a1111", "comfyui"), default=None,
                   help="SDE samplers' Brownian noise: diffusekit (default) or torchsde's tree seeded as A1111 / ComfyUI "
                        "do, to reproduce their CPU renders (needs torchsde)")
    g.add_argument("--init-image", default=None, help="img2img: the starting image")
    g.add_argument("--denoising-strength", type=float, default=None,
                   help="img2img / hires strength in [0, 1] (default 0.75): 0 returns the image, 1 ignores it")
    g.add_argument("--mask", default=None, help="inpainting: white = repaint (same size as --init-image)")
    g.add_argument("--mask-blur", type=int, default=None, help="mask blur in pixels (default 4)")
    g.add_argument("--hires-scale", type=float, default=None, help="hires fix: second pass at this scale (1..4)")
    g.add_argument("--hires-steps", type=int, default=None, help="hires pass steps (default: --steps)")
    g.add_argument("--hires-upscaler", default=None, choices=("Latent", "Lanczos"), help="hires upscaler (default Latent)")
    g.add_argument("--refiner", default=None, help="SDXL refiner checkpoint for the last steps")
    g.add_argument("--refiner-switch-at", type=float, default=None, help="fraction of steps before the refiner (e.g. 0.8)")
    g.add_argument("--out", default="out", help="output folder (default out/)")
    g.add_argument("--save-process", action="store_true", help="also write an MP4 and a GIF with one frame per step")
    g.add_argument("--process-mode", choices=PROCESS_MODES, default=None,
                   help="what the frames show, each the step's x0 estimate: decode = through the VAE (the image "
                        "the model would return there); preview = a cheap linear latent->RGB map (approximate "
                        "colours, latent resolution); auto (default) = decode up to 256x256, else preview")
    g.add_argument("--fps", type=float, default=None, help="video frames per second (default 1: one step per second)")
    g.add_argument("--from", dest="from_image", default=None,
                   help="reproduce an image from the parameters in its PNG (flags given here override them)")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="print the generation parameters stored in an image (ours or A1111's), "
                                    "or describe a model (a checkpoint file, diffusers folder or shipped name)")
    i.add_argument("image", help="an image or video, a .safetensors/.ckpt model, a diffusers folder or a shipped name")
    i.add_argument("--json", action="store_true", help="print the parsed fields (a model: its family) as JSON")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("compare", help="one labelled X/Y grid of samplers x schedules / steps / CFG (same seed)",
                       description="X = the first named axis (columns), Y = the second (rows). 'pairs' zips --samplers "
                                   "with --schedulers into one row.")
    c.add_argument("prompt")
    _model_flags(c)
    _sampling_flags(c)
    c.add_argument("--axes", default="samplers-x-schedulers",
                   choices=("samplers-x-schedulers", "samplers-x-steps", "cfg-x-steps", "pairs", "models-x-steps",
                            "models-x-samplers"))
    c.add_argument("--samplers", default=None, help='comma-separated (default "Euler,DPM++ 2M" when varied)')
    c.add_argument("--schedulers", default=None, help='comma-separated (default "Normal,Karras" when varied)')
    c.add_argument("--steps-list", default=None, help="comma-separated step counts (default 10,20,30 when varied)")
    c.add_argument("--cfg-list", default=None, help="comma-separated CFG scales (default 3,5,7 when varied)")
    c.add_argument("--models", default=None,
                   help="comma-separated models for --axes models-x-steps / models-x-samplers (default shapes,shapes-flow)")
    c.add_argument("--steps", type=int, default=None, help="steps where they are not varied (default: the model card's, else 20)")
    c.add_argument("--video", action="store_true", help="also an MP4 of every cell denoising in lock-step")
    c.add_argument("--process-mode", choices=PROCESS_MODES, default=None, help="video frames: auto (default: decode up to 256x256, else preview), decode or preview")
    c.add_argument("--fps", type=float, default=None, help="video frames per second (default 1)")
    c.add_argument("--out", default="out", help="output folder (default out/)")
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("train", help="train a model from a TOML config")
    t.add_argument("config")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this config")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="measure a model: prompt adherence (exact shapes detector) or recognised "
                                    "digits, and FID in the project's own feature space")
    from ..evaluation.evaluate import add_arguments as _eval_arguments
    _eval_arguments(e)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("serve", help="A1111-compatible HTTP API (/sdapi/v1) and web UI")
    s.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default, this machine only) or 0.0.0.0")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint to load first (default {DEFAULT_MODEL!r})")
    s.add_argument("--models-dir", default=None, help="folder of checkpoints clients may switch between")
    s.add_argument("--api-auth", default=None, help="user:password HTTP basic auth")
    s.add_argument("--queue-size", type=int, default=8, help="jobs that may wait behind the running one (default 8)")
    s.add_argument("--device", default=None, help="torch device (default: the server's choice)")
    s.add_argument("--lora-dir", default=None,
                   help="folder of LoRA .safetensors files that <lora:NAME:WEIGHT> in the prompt names "
                        "(listed at GET /sdapi/v1/loras)")
    s.add_argument("--embeddings-dir", default=None,
                   help="folder of textual-inversion embeddings that prompts may name (GET /sdapi/v1/embeddings)")
    s.add_argument("--max-pixel-steps", type=int, default=None,
                   help="work budget of one request: width x height x steps x images over its passes (default 2**30)")
    s.add_argument("--max-memory-mb", type=int, default=None,
                   help="memory budget of one request, estimated from the model (default: the device's memory)")
    s.set_defaults(func=cmd_serve)


    w = sub.add_parser("workflow", help="run a ComfyUI API-format workflow (JSON, or a PNG carrying one) with "
                                        "the core nodes; prints the files its output nodes wrote")
    w.add_argument("file", help="workflow .json (ComfyUI \"Save (API Format)\") or a PNG with a `prompt` chunk")
    w.add_argument("--out", default="out/workflow", help="output folder, ComfyUI's output/ (default out/workflow)")
    w.add_argument("--models-dir", default=None, help="folder of checkpoints ckpt_name picks from (shipped "
                                                     "models are always there)")
    w.add_argument("--lora-dir", default=None, help="folder of LoRA files lora_name picks from")
    w.add_argument("--embeddings-dir", default=None, help="textual-inversion embeddings (embedding:NAME)")
    w.add_argument("--input-dir", default=None, help="folder LoadImage reads (default: the workflow's folder)")
    w.add_argument("--device", default=None, help="torch device (default cpu)")
    w.set_defaults(func=cmd_workflow)

    st = sub.add_parser("study", help="studies that explain samplers and schedules")
    st_sub = st.add_subparsers(dest="study", required=True)
    sm = st_sub.add_parser("samplers", help="every sampler x schedule on an exact Gaussian-mixture world: "
                                             "error vs steps, steps to tolerance (table, CSV, plot)")
    sm.add_argument("--samplers", help="comma-separated sampler ids or names (default: all)")
    sm.add_argument("--schedules", help="comma-separated schedule names (default: all SD-range ones)")
    sm.add_argument("--steps", help="comma-separated step counts (default 5..100)")
    sm.add_argument("--batch", type=int, default=256, help="paths per run (default 256)")
    sm.add_argument("--dim", type=int, default=8, help="dimension of the exact world (default 8)")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--tol", type=float, default=1e-2, help="error tolerance for 'steps to tolerance'")
    sm.add_argument("--quick", action="store_true", help="a small version that runs in seconds")
    sm.add_argument("--out", default="out/study", help="output folder (default out/study)")
    sm.set_defaults(func=_study_samplers)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as e:   # errors that teach: one line, no traceback, for bad input
        if args.debug:
            raise
        print(f"diffusekit: error: {str(e).replace(chr(10), ' ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffusekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
