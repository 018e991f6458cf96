"""X/Y grids with labelled axes, as A1111's X/Y/Z plot script draws them."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw

from .annotate import font, text_size


def xy_grid(images: Sequence[Sequence[Image.Image]], col_labels: Sequence[str], row_labels: Sequence[str],
            *, title: str | None = None, x_title: str | None = None, y_title: str | None = None,
            pad: int = 4, font_size: int | None = None) -> Image.Image:
    """One PNG-ready image: rows x cols tiles, column labels on top, row labels on the left.

    images[r][c] is the tile of row r, column c; all tiles are resized to the first tile's size.
    """
    rows, cols = len(images), len(images[0]) if images else 0
    if rows == 0 or cols == 0:
        raise ValueError("xy_grid needs at least one row and one column of images")
    if any(len(r) != cols for r in images):
        raise ValueError(f"every row needs {cols} images, got {[len(r) for r in images]}")
    if len(col_labels) != cols or len(row_labels) != rows:
        raise ValueError(f"got {len(col_labels)} column labels for {cols} columns and "
                         f"{len(row_labels)} row labels for {rows} rows")
    tw, th = images[0][0].size
    fs = font_size or max(12, min(tw, th) // 9)
    label_h = max(text_size(t, fs)[1] for t in col_labels) + 2 * pad
    label_w = max(text_size(t, fs)[0] for t in row_labels) + 2 * pad
    head = 0
    if title:
        head += text_size(title, fs + 2)[1] + 2 * pad
    if x_title:
        head += text_size(x_title, fs)[1] + 2 * pad
    left = label_w + ((text_size(y_title, fs)[1] + 2 * pad) if y_title else 0)
    w = left + cols * (tw + pad) + pad
    if title:   # a long title is shortened to the grid's width rather than cut off at the left edge
        while len(title) > 4 and text_size(title, fs + 2)[0] > w - 2 * pad:
            title = title[: max(4, len(title) - 4)].rstrip() + "…"
            title = title.replace("……", "…")
    h = head + label_h + rows * (th + pad) + pad
    out = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    y = pad
    if title:
        draw.text(((w - text_size(title, fs + 2)[0]) // 2, y), title, fill=(0, 0, 0), font=font(fs + 2))
        y += text_size(title, fs + 2)[1] + 2 * pad
    if x_title:
        draw.text((left + (cols * (tw + pad) - text_size(x_title, fs)[0]) // 2, y), x_title, fill=(60, 60, 60), font=font(fs))
    if y_title:
        tw_, th_ = text_size(y_title, fs)
        strip = Image.new("RGB", (tw_ + 2 * pad, th_ + 2 * pad), (255, 255, 255))
        ImageDraw.Draw(strip).text((pad, pad), y_title, fill=(60, 60, 60), font=font(fs))
        strip = strip.rotate(90, expand=True)
        out.paste(strip, (0, head + label_h + (rows * (th + pad) - strip.height) // 2))
    for c, text in enumerate(col_labels):
        x = left + c * (tw + pad) + (tw - text_size(text, fs)[0]) // 2
        draw.text((x, head + pad), text, fill=(0, 0, 0), font=font(fs))
    for r, text in enumerate(row_labels):
        ty = head + label_h + r * (th + pad) + (th - text_size(text, fs)[1]) // 2
        draw.text((left - label_w + pad, ty), text, fill=(0, 0, 0), font=font(fs))
        for c in range(cols):
            tile = images[r][c].convert("RGB")
            if tile.size != (tw, th):
                tile = tile.resize((tw, th), Image.LANCZOS)
            out.paste(tile, (left + c * (tw + pad), head + label_h + r * (th + pad)))
    return out


def tile_positions(grid: Image.Image, rows: int, cols: int, tile: tuple[int, int], pad: int = 4) -> list[tuple[int, int]]:
    """Top-left corners of the tiles of an `xy_grid` image (tests and the web UI use it to crop)."""
    tw, th = tile
    left = grid.width - cols * (tw + pad) - pad
    top = grid.height - rows * (th + pad) - pad
    return [(left + c * (tw + pad), top + r * (th + pad)) for r in range(rows) for c in range(cols)]
