"""Images in and out of the API: base64 (or data: URL) -> PIL with the server's pixel limit, PIL -> base64 PNG
carrying the infotext, as A1111 sends it."""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .schemas import Limits, RequestError


def decode_image(data: Any, field: str, limits: Limits) -> Image.Image:
    """A base64 image (optionally a data: URL) -> a loaded PIL image; RequestError naming `field` otherwise."""
    if not isinstance(data, str) or not data.strip():
        raise RequestError(f"{field}: expected a base64-encoded image string", field=field)
    text = data.strip()
    if text.startswith(("http://", "https://")):
        raise RequestError(f"{field}: URLs are not fetched; send the image itself as base64", field=field)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{field}: not valid base64 ({e})", field=field) from None
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
        if w * h > limits.max_input_pixels:
            raise RequestError(f"{field}: the image is {w}x{h}, over the server limit "
                               f"max_input_pixels={limits.max_input_pixels}", field=field)
        img.load()
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(f"{field}: the base64 data is not an image in a format Pillow reads (PNG, JPEG, WebP, ...)",
                           field=field) from None
    except Exception as e:  # PIL raises many types for broken files; all mean "not an image we can read"
        raise RequestError(f"{field}: the base64 data is not a readable image ({type(e).__name__}: {e})",
                           field=field) from None
    return img


def encode_png(img: Image.Image) -> str:
    """base64 PNG (no data: prefix) with the infotext in the `parameters` text chunk, as A1111 sends."""
    meta = PngImagePlugin.PngInfo()
    if img.info.get("parameters"):
        meta.add_text("parameters", str(img.info["parameters"]))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")

