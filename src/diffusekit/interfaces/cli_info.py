"""`diffusekit info IMAGE | MODEL`: an image's generation parameters (ours or A1111's infotext), a video's
frames, or a checkpoint's family, spaces and shapes (read from its header: no weights loaded)."""
from __future__ import annotations

import json
from pathlib import Path

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _display(fields: dict) -> list[tuple[str, str]]:
    """Parsed infotext fields for display: `Key-1`/`Key-2` pairs joined back into `Key: WxH`."""
    rows, done = [], set()
    for key, value in fields.items():
        if key in done:
            continue
        base = key[:-2] if key.endswith("-1") else None
        if base and f"{base}-2" in fields:
            rows.append((base, f"{value}x{fields[base + '-2']}"))
            done.add(f"{base}-2")
        else:
            rows.append((key, str(value)))
    return rows


def _model_rows(name: str, fam) -> list[tuple[str, str]]:
    """A ModelFamily as `Key: value` rows: what the checkpoint is and which space it samples in."""
    u, b = fam.unet, fam.beta_schedule
    if fam.pixel_space:
        space = f"pixels: the UNet denoises {u.out_channels}-channel images in [-1, 1] directly (no VAE)"
    else:
        space = (f"latents: a VAE with {fam.latent_channels} channels at 1/{fam.latent_factor} of the image side, "
                 f"latent scale {fam.latent_scale:g}")
    if fam.is_flux:
        space += f", shift {fam.latent_shift:g}"
        net = ("Flux", f"{u.depth} double-stream + {u.depth_single_blocks} single-stream blocks of width {u.hidden_size} "
                       f"({u.num_heads} heads), 2x2 patches of {u.latent_channels} channels, context {u.context_in_dim}, "
                       f"pooled {u.vec_in_dim}" + (", distilled guidance input" if u.guidance_embed else ""))
    elif fam.is_mmdit:
        space += f", shift {fam.latent_shift:g}"
        net = ("MMDiT", f"{u.in_channels} -> {u.out_channels} channels, {u.depth} joint blocks of width {u.hidden_size}, "
                        f"patch {u.patch_size}, context {u.context_dim}, pooled {u.adm_in_channels}"
               + (", QK RMS-norm" if u.qk_norm else "") + (", MMDiT-X blocks" if u.x_block_self_attn_layers else ""))
    else:
        net = ("UNet", f"{u.in_channels} -> {u.out_channels} channels, model_channels {u.model_channels}, "
                       f"channel_mult {list(u.channel_mult)}, context {u.context_dim}")
    rows = [("Model", name), ("Family", fam.name), ("Space", space), net]
    for i, s in enumerate(fam.text_encoders):
        layers = s.config.num_layers if s.kind == "t5" else s.config.layers
        rows.append((f"Text encoder {i + 1}", f"{s.kind}, width {s.config.width}, {layers} layers, "
                                              f"hidden layer {s.layer}" + (", pooled" if s.pooled else "")
                     + (", optional" if s.optional else "")))
    schedule = f"{b.kind} betas {b.beta_start:g} .. {b.beta_end:g}, {b.num_timesteps} steps"
    if fam.prediction_type == "flow":
        schedule = f"rectified flow, time shift {fam.flow_shift:g}"
        if fam.dynamic_shift is not None:
            schedule = (f"rectified flow, resolution-dependent time shift exp(mu), mu {fam.dynamic_shift[0]:g} at 256 "
                        f"to {fam.dynamic_shift[1]:g} at 4096 image tokens")
    rows += [("Prediction", fam.prediction_type),
             ("Training schedule", schedule + (", zero terminal SNR" if fam.zero_terminal_snr else "")),
             ("Native size", f"{fam.default_size}x{fam.default_size}")]
    return rows


def _model_info(path: Path, name: str, as_json: bool) -> int:
    from ..models import read_family

    fam = read_family(path)
    if as_json:
        print(json.dumps({"model": name, "pixel_space": fam.pixel_space, "family": fam.to_dict()}, indent=2))
    else:
        for key, value in _model_rows(name, fam):
            print(f"{key}: {value}")
    return 0


def cmd_info(args) -> int:
    from ..pipelines.infotext import parse_infotext, read_infotext
    from ..pipelines.shipped import SHIPPED, shipped_path

    path, name = Path(args.image), Path(args.image).name
    if not path.exists() and args.image in SHIPPED:
        path, name = shipped_path(args.image), args.image
    if path.is_dir() or path.suffix.lower() in MODEL_SUFFIXES:
        if not path.exists():
            raise FileNotFoundError(f"{args.image}: no such model file or folder")
        return _model_info(path, name, args.json)
    if not path.is_file():
        raise FileNotFoundError(f"{args.image}: no such file")
    if path.suffix.lower() in (".mp4", ".gif", ".webm", ".mov", ".mkv") and not args.json:
        from ..media.video import read_video_info

        info = read_video_info(path)
        if path.suffix.lower() != ".gif" or info["frames"] > 1:
            print(f"Frames: {info['frames']}\nSize: {info['size'][0]}x{info['size'][1]}\nFPS: {info['fps']:g}")
            return 0
    try:
        text = read_infotext(path)
    except OSError:
        raise ValueError(f"{args.image}: not an image Pillow can read") from None
    if not text:
        raise ValueError(f"{args.image} carries no generation parameters (no PNG 'parameters' text chunk or "
                         "EXIF UserComment)")
    fields = parse_infotext(text)
    if args.json:
        print(json.dumps(fields, indent=2, ensure_ascii=False))
    else:
        for key, value in _display(fields):
            print(f"{key}: {value}")
    return 0
