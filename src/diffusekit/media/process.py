"""Denoising videos: every sampling step of a generation as one captioned frame.

A generation run with `GenerationParams(save_process=True)` keeps one record per step in
`result.process`: {"job", "pass", "step", "sigma", "x", "denoised"} with the latents of that job's whole
batch. A frame shows the step's x0 estimate ("denoised", what A1111's and ComfyUI's live previews show),
either through the cheap linear latent->RGB map (`mode="preview"`, no VAE call, latent resolution
blown up with nearest-neighbour so the pixels stay honest; for a model without a published map the
map is a least-squares fit, whose colours are only roughly the image's) or through the full VAE
decoder (`mode="decode"`, one decode per step: the frames are images the model would output, and the
last one is the result). `mode="auto"`, the default, decodes where that is cheap: pixel-space models
(the x0 estimate is the image) and images of at most `AUTO_DECODE_MAX_PIXELS` (256 x 256: the shipped
`shapes` model's 64 x 64 decode takes as long as one or two of its sampling steps, measured 1.2-1.6x
the whole 20-step generation for the 20 frames on a CPU), and previews larger ones (an SD 1.5 decode at
512 x 512 takes seconds on a CPU). Every frame is brought to the final image's size and gets a
caption bar "step i/n  sigma s" (with the pass name when a run has several: img2img, hires, refiner).
The notes play them at 1 frame per step per second.
"""
from __future__ import annotations

import os
from itertools import groupby
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..pipelines.latents import tensor_to_pil
from .video import label_frames, write_gif, write_mp4

PROCESS_MODES = ("auto", "preview", "decode")
AUTO_DECODE_MAX_PIXELS = 256 * 256


def resolve_mode(pipe, mode: str, size: tuple[int, int]) -> str:
    """"preview" or "decode" for `mode` at an image size=(w, h); "auto" decodes where that is cheap."""
    if mode not in PROCESS_MODES:
        raise ValueError(f"process mode {mode!r}; valid: {', '.join(PROCESS_MODES)}")
    if mode != "auto":
        return mode
    return "decode" if pipe.vae is None or size[0] * size[1] <= AUTO_DECODE_MAX_PIXELS else "preview"


def image_records(result, index: int = 0) -> list[dict]:
    """The step records of image `index` of a result, each with x/denoised cut to that image (1, C, h, w)."""
    if not result.process:
        raise ValueError("this result kept no steps: generate with GenerationParams(save_process=True)")
    n = len(result.images)
    if not 0 <= index < n:
        raise ValueError(f"image index {index} is out of range: the result has {n} image(s)")
    batch = result.params.batch_size
    job, row = divmod(index, batch)
    out = []
    for rec in result.process:
        if rec.get("job", 0) != job:
            continue
        out.append({**rec, "x": rec["x"][row:row + 1], "denoised": rec["denoised"][row:row + 1]})
    return out


def step_frames(pipe, records: Sequence[dict], size: tuple[int, int], mode: str = "auto") -> list[Image.Image]:
    """One RGB frame per record, each the x0 estimate at that step, resized (nearest) to size=(w, h)."""
    mode = resolve_mode(pipe, mode, size)
    frames = []
    for rec in records:
        if mode == "preview":
            img = pipe.preview(rec["denoised"])[0]
        else:
            img = tensor_to_pil(pipe.decode(rec["denoised"].to(pipe.device)))[0]
        frames.append(img if img.size == tuple(size) else img.resize(tuple(size), Image.NEAREST))
    return frames


def process_frames(pipe, result, index: int = 0, mode: str = "auto", title: str | None = None) -> list[Image.Image]:
    """Captioned frames of image `index`: one per sampling step, passes in order."""
    records = image_records(result, index)
    size = result.images[index].size
    raw = step_frames(pipe, records, size, mode)
    groups = [list(g) for _, g in groupby(range(len(records)), key=lambda i: records[i]["pass"])]
    out = []
    for idx in groups:                       # each pass numbers its own steps
        label = records[idx[0]]["pass"] if len(groups) > 1 else None
        label = f"{title}  {label}" if title and label else (title or label)
        out += label_frames([raw[i] for i in idx], [records[i]["sigma"] for i in idx], title=label)
    return out


def write_process_video(pipe, result, stem: str | os.PathLike, *, index: int = 0, mode: str = "auto",
                        fps: float = 1.0, title: str | None = None) -> tuple[Path, Path]:
    """Write `<stem>.mp4` and `<stem>.gif` of image `index`'s denoising, one frame per step at `fps`."""
    if not fps > 0:
        raise ValueError(f"fps={fps}: must be > 0 (the notes use 1 frame per step per second)")
    frames = process_frames(pipe, result, index, mode, title)
    stem = Path(stem)
    mp4 = write_mp4(frames, stem.with_name(stem.name + ".mp4"), fps=fps)
    gif = write_gif(frames, stem.with_name(stem.name + ".gif"), fps=fps)
    return mp4, gif
