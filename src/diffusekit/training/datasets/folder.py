"""Any folder of captioned images, in the Hugging Face `ImageFolder` convention:

- `metadata.jsonl` in the folder: one JSON object per line with "file_name" (relative path) and a
  caption under "text" (or "caption"); or
- sidecar text files: `cat.png` + `cat.txt` holding the caption (images without one get "").
Images are converted to RGB, resized so the short side is `size` and centre-cropped to size x size.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFolderDataset:
    """`ds[i] -> {"image": PIL RGB size x size, "caption": str, "path": str}` in sorted file order."""

    def __init__(self, root: str | Path, size: int = 64, length: int | None = None):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        meta = self.root / "metadata.jsonl"
        items: list[tuple[Path, str]] = []
        if meta.is_file():
            for n, line in enumerate(meta.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "file_name" not in row:
                    raise ValueError(f"{meta}:{n} has no 'file_name' (keys: {sorted(row)})")
                items.append((self.root / row["file_name"], str(row.get("text", row.get("caption", "")))))
        else:
            for p in sorted(self.root.rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    side = p.with_suffix(".txt")
                    items.append((p, side.read_text().strip() if side.is_file() else ""))
        if not items:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {self.root}")
        self.items = items[: length] if length else items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, caption = self.items[index]
        with Image.open(path) as im:
            img = resize_center_crop(im.convert("RGB"), self.size)
        return {"image": img, "caption": caption, "path": str(path)}
