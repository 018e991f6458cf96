"""Images in and out: LoadImage, LoadImageMask, ImageScale, SaveImage, PreviewImage (ComfyUI nodes.py names
and defaults), and SaveDenoisingVideo: the denoising process of the samplers upstream as MP4, GIF or
animated WEBP at a given frame rate (the seeds' "generation process saved as a video at 1 fps")."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, PngImagePlugin

from ..environment import PathRefused, inside
from ..metadata import a1111_infotext, ui_workflow
from ..spec import MAX_RESOLUTION, Combo, Float, Int, Link, NodeResult, String, register
from ..values import image_to_pil
from .resize import UPSCALE_METHODS, upscale

MAX_IMAGE_PIXELS = 8192 * 8192


def _file_hash(env, image: str) -> str:
    with open(env.resolve_image(image), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _open(env, image: str) -> Image.Image:
    img = Image.open(env.resolve_image(image))
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{image}: {img.width}x{img.height} is over {MAX_IMAGE_PIXELS} pixels")
    return img


@register("LoadImage", category="image", display_name="Load Image",
          inputs={"image": Combo(lambda env: env.input_images(), image_upload=True)}, outputs=("IMAGE", "MASK"))
def load_image(ctx, image):
    """An image of the input folder (POST /upload/image puts files there), and the mask of its alpha
    channel (1 where transparent; all 0 without alpha)."""
    img = _open(ctx.env, image)
    images, masks, size = [], [], None
    for frame in ImageSequence.Iterator(img):
        frame = ImageOps.exif_transpose(frame)
        if frame.mode == "I":
            frame = frame.point(lambda v: v * (1 / 255))
        rgb = frame.convert("RGB")
        size = size or rgb.size
        if rgb.size != size:
            continue
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None])
        if "A" in frame.getbands():
            masks.append(1.0 - torch.from_numpy(np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0)[None])
        else:
            masks.append(torch.zeros(1, 64, 64))
    if img.format == "MPO":
        images, masks = images[:1], masks[:1]
    return torch.cat(images), torch.cat(masks) if len({m.shape for m in masks}) == 1 else masks[0]


load_image.is_changed = lambda env, image: _file_hash(env, image)


@register("LoadImageMask", category="mask", display_name="Load Image (as Mask)",
          inputs={"image": Combo(lambda env: env.input_images(), image_upload=True),
                  "channel": Combo(("alpha", "red", "green", "blue"))}, outputs=("MASK",))
def load_image_mask(ctx, image, channel):
    """One channel of an input-folder image as a mask (alpha inverted: transparent = 1)."""
    img = ImageOps.exif_transpose(_open(ctx.env, image))
    if img.getbands() != ("R", "G", "B", "A"):
        if img.mode == "I":
            img = img.point(lambda v: v * (1 / 255))
        img = img.convert("RGBA")
    c = channel[0].upper()
    mask = torch.from_numpy(np.asarray(img.getchannel(c), dtype=np.float32) / 255.0)
    return ((1.0 - mask if c == "A" else mask)[None],)


load_image_mask.is_changed = lambda env, image, channel: _file_hash(env, image)


@register("ImageScale", category="image/upscaling", display_name="Upscale Image",
          inputs={"image": Link("IMAGE"), "upscale_method": Combo(UPSCALE_METHODS),
                  "width": Int(512, 0, MAX_RESOLUTION, 1), "height": Int(512, 0, MAX_RESOLUTION, 1),
                  "crop": Combo(("disabled", "center"))}, outputs=("IMAGE",))
def image_scale(ctx, image, upscale_method, width, height, crop):
    """Resizes images to width x height (0 keeps the aspect ratio from the other side)."""
    if width == 0 and height == 0:
        return (image,)
    x = image.movedim(-1, 1)
    if width == 0:
        width = max(1, round(x.shape[3] * height / x.shape[2]))
    elif height == 0:
        height = max(1, round(x.shape[2] * width / x.shape[3]))
    limits = getattr(ctx.env, "limits", None)
    if limits is not None and width * height > limits.max_pixels:
        raise ValueError(f"{width}x{height} is over the server limit max_pixels={limits.max_pixels}")
    return (upscale(x, width, height, upscale_method, crop).movedim(1, -1).clamp(0, 1),)


# ------------------------------------------------------------------ saving
def _expand_prefix(prefix: str, width: int, height: int) -> str:
    """ComfyUI's %width%, %height% and %year% ... %second% in filename_prefix."""
    t = time.localtime()
    values = {"width": width, "height": height, "year": t.tm_year, "month": f"{t.tm_mon:02}", "day": f"{t.tm_mday:02}",
              "hour": f"{t.tm_hour:02}", "minute": f"{t.tm_min:02}", "second": f"{t.tm_sec:02}"}
    return re.sub(r"%(\w+)%", lambda m: str(values.get(m.group(1).lower(), m.group(0))), prefix)


def save_path(folder: Path, prefix: str, width: int = 0, height: int = 0) -> tuple[Path, str, int, str]:
    """ComfyUI's get_save_image_path: (folder to write in, file stem, first free counter, subfolder)."""
    prefix = _expand_prefix(str(prefix), width, height)
    sub, _, stem = prefix.replace("\\", "/").rpartition("/")
    if not stem:
        raise PathRefused(f"filename_prefix={prefix!r} has no file name")
    try:
        full = inside(folder, sub) if sub else folder.resolve()
    except PathRefused:
        raise PathRefused(f"filename_prefix={prefix!r}: saving outside the output folder is not allowed") from None
    full.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(stem) + r"_(\d+)_")
    counters = [int(m.group(1)) for f in os.listdir(full) if (m := pattern.match(f))]
    return full, stem, max(counters, default=0) + 1, sub


def _save_images(ctx, images, prefix: str, kind: str, compress_level: int, node_id: str) -> dict:
    pils = image_to_pil(images)
    folder = ctx.env.folder(kind)
    full, stem, counter, sub = save_path(folder, prefix, pils[0].width, pils[0].height)
    extra = ctx.extra_data.get("extra_pnginfo") or {}
    meta = PngImagePlugin.PngInfo()
    meta.add_text("prompt", json.dumps(ctx.prompt))
    if "workflow" not in extra:
        meta.add_text("workflow", json.dumps(ui_workflow(ctx.prompt)))
    for k, v in extra.items():
        meta.add_text(str(k), json.dumps(v))
    infotext = a1111_infotext(ctx.prompt, node_id, ctx.env, pils[0].size)
    if infotext:
        meta.add_text("parameters", infotext)
    results = []
    for i, img in enumerate(pils):
        name = f"{stem.replace('%batch_num%', str(i))}_{counter:05}_.png"
        img.save(full / name, pnginfo=meta, compress_level=compress_level)
        results.append({"filename": name, "subfolder": sub, "type": kind})
        counter += 1
    return {"images": results}


@register("SaveImage", category="image", display_name="Save Image", output_node=True,
          inputs={"images": Link("IMAGE", tooltip="The images to save."),
                  "filename_prefix": String("ComfyUI", tooltip="The prefix for the file to save.")},
          hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"})
def save_image(ctx, images, filename_prefix):
    """Saves PNGs to the output folder, with the workflow (`prompt`, `workflow`) and A1111's infotext."""
    return NodeResult((), _save_images(ctx, images, filename_prefix, "output", 4, ctx.node_id))


@register("PreviewImage", category="image", display_name="Preview Image", output_node=True,
          inputs={"images": Link("IMAGE")}, hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"})
def preview_image(ctx, images):
    """Saves the images to the temporary folder, for viewing."""
    tag = "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
    return NodeResult((), _save_images(ctx, images, f"ComfyUI_temp_{tag}", "temp", 1, ctx.node_id))


# ------------------------------------------------------------------ the denoising video
VIDEO_FORMATS = {"mp4": "video/mp4", "gif": "image/gif", "webp": "image/webp"}


def _frames(vae, records: list[dict], decode: str) -> list[Image.Image]:
    from ...media.video import label_frames
    pipe = vae.pipe
    out, start = [], 0
    while start < len(records):                           # one captioned run per sampler segment
        end = start
        while end + 1 < len(records) and records[end + 1]["step"] > records[end]["step"]:
            end += 1
        seg = records[start:end + 1]
        frames = []
        for r in seg:
            z = r["denoised"].to(pipe.device) * pipe.scale
            img = pipe.preview(z)[0] if decode == "preview" else image_to_pil(
                ((pipe.decode(z).float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1))[0]
            size = (z.shape[3] * pipe.factor, z.shape[2] * pipe.factor)
            frames.append(img if img.size == size else img.resize(size, Image.NEAREST))
        out += label_frames(frames, [r["sigma"] for r in seg], title=f"{seg[0]['sampler']} {seg[0]['scheduler']}")
        start = end + 1
    return out


@register("SaveDenoisingVideo", category="image/animation", display_name="Save Denoising Video", output_node=True,
          inputs={"samples": Link("LATENT", tooltip="The latent of a sampler (or samplers in sequence)."),
                  "vae": Link("VAE"), "fps": Float(1.0, 0.01, 60.0, 0.01),
                  "format": Combo(tuple(VIDEO_FORMATS)), "frames": Combo(("preview", "decode")),
                  "filename_prefix": String("ComfyUI/denoise")})
def save_denoising_video(ctx, samples, vae, fps, format, frames, filename_prefix):
    """Writes every sampling step's x0 estimate (first image of the batch) as one frame of an MP4, GIF or
    animated WEBP at `fps` frames per second; `frames`: "preview" (cheap latent->RGB map) or "decode"
    (the VAE decodes every step)."""
    from ...media.video import write_gif, write_mp4
    records = samples.get("diffusekit_process") or []
    if not records:
        raise ValueError("the latent carries no sampling steps: link the LATENT output of a KSampler "
                         "or KSamplerAdvanced")
    pics = _frames(vae, records, frames)
    full, stem, counter, sub = save_path(ctx.env.folder("output"), filename_prefix, pics[0].width, pics[0].height)
    name = f"{stem}_{counter:05}_.{format}"
    if format == "mp4":
        write_mp4(pics, full / name, fps=fps)
    elif format == "gif":
        write_gif(pics, full / name, fps=fps)
    else:
        pics[0].save(full / name, format="WEBP", save_all=True, append_images=pics[1:], duration=int(1000 / fps),
                     loop=0, quality=85)
    return NodeResult((), {"images": [{"filename": name, "subfolder": sub, "type": "output",
                                       "format": VIDEO_FORMATS[format], "frame_rate": fps}], "animated": [True]})
