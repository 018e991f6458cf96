"""Text on images: the labels of grids and the step/sigma captions of video frames."""
from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont


@lru_cache(maxsize=8)
def font(size: int = 14) -> ImageFont.ImageFont:
    """A scalable font: DejaVu when the system has it, else Pillow's built-in one (Pillow >= 10.1 scales it)."""
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_size(text: str, size: int) -> tuple[int, int]:
    """Width and height that drawing `text` at (0, 0) covers (the box starts below y = 0 by the font's
    top bearing, which belongs to the height so that labels never touch what is under them)."""
    _, _, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font(size))
    return right, bottom


def caption_bar(image: Image.Image, text: str, size: int | None = None) -> Image.Image:
    """The image with a black bar below it carrying `text` (the frame stays readable at any zoom)."""
    size = size or max(10, image.width // 20)
    bar = text_size(text, size)[1] + 6
    out = Image.new("RGB", (image.width, image.height + bar), (0, 0, 0))
    out.paste(image.convert("RGB"), (0, 0))
    ImageDraw.Draw(out).text((4, image.height + 2), text, fill=(255, 255, 255), font=font(size))
    return out
