"""Denoising videos: every step of a generation as an MP4 (imageio-ffmpeg) and a GIF (Pillow)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .annotate import caption_bar


def label_frames(frames: Sequence[Image.Image], sigmas: Sequence[float] | None = None,
                 title: str | None = None, min_side: int = 256) -> list[Image.Image]:
    """Upscale small frames (nearest, so pixels stay honest) and write 'step i/n  sigma s' under each."""
    out = []
    n = len(frames)
    for i, f in enumerate(frames):
        if min(f.size) < min_side:
            k = -(-min_side // min(f.size))
            f = f.resize((f.width * k, f.height * k), Image.NEAREST)
        text = f"step {i + 1}/{n}" if n > 1 else ""
        if sigmas is not None:
            text += f"  sigma {float(sigmas[i]):.4g}"
        if title:
            text = f"{title}  {text}"
        out.append(caption_bar(f, text.strip()))
    return out


def _even(img: Image.Image) -> Image.Image:
    """H.264 with yuv420p needs even sides."""
    w, h = img.width + img.width % 2, img.height + img.height % 2
    if (w, h) == img.size:
        return img
    canvas = Image.new("RGB", (w, h))
    canvas.paste(img, (0, 0))
    return canvas


def write_mp4(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float = 1.0) -> Path:
    """Write frames to an H.264 MP4 at `fps` frames per second (the notes use 1 frame per step per second).

    Written to a temp file in the same folder and renamed, so a failure never leaves half a video.
    """
    try:
        import imageio_ffmpeg
    except ImportError as e:  # an optional extra
        raise RuntimeError("MP4 output needs imageio-ffmpeg: pip install 'diffusekit[video]'") from e
    if not frames:
        raise ValueError("no frames to write")
    if not fps > 0:
        raise ValueError(f"fps={fps}: must be > 0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = _even(frames[0].convert("RGB"))
    fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(tmp, first.size, fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                             macro_block_size=1, quality=8, ffmpeg_log_level="error")
        writer.send(None)
        for f in frames:
            f = _even(f.convert("RGB"))
            if f.size != first.size:
                f = f.resize(first.size)
            writer.send(np.ascontiguousarray(np.asarray(f)))
        writer.close()
        os.chmod(tmp, 0o644)          # mkstemp makes 0600; a video is for sharing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_gif(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float = 1.0, loop: int = 0) -> Path:
    """Write an animated GIF (atomically)."""
    if not frames:
        raise ValueError("no frames to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".gif", dir=path.parent)
    os.close(fd)
    try:
        rgb = [f.convert("RGB") for f in frames]
        rgb[0].save(tmp, format="GIF", save_all=True, append_images=rgb[1:], duration=int(1000 / fps), loop=loop)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_video_info(path: str | os.PathLike) -> dict:
    """Frame count, size and fps of a video file (for tests and `diffusekit info`)."""
    import imageio_ffmpeg
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    n = sum(1 for _ in reader)
    return {"frames": n, "size": tuple(meta["size"]), "fps": meta["fps"]}


def side_by_side(frame_lists: Sequence[Sequence[Image.Image]], labels: Sequence[str]) -> list[Image.Image]:
    """Frames of several runs in lock-step, side by side with a label each (shorter runs hold their last frame)."""
    n = max(len(f) for f in frame_lists)
    out = []
    for i in range(n):
        tiles = [caption_bar(fl[min(i, len(fl) - 1)], lab) for fl, lab in zip(frame_lists, labels)]
        w = sum(t.width for t in tiles)
        h = max(t.height for t in tiles)
        canvas = Image.new("RGB", (w, h))
        x = 0
        for t in tiles:
            canvas.paste(t, (x, 0))
            x += t.width
        out.append(canvas)
    return out
