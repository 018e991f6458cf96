"""ComfyUI's common_upscale: resize (B, C, H, W) tensors, optionally centre-cropped to the new aspect ratio.

Methods: "nearest-exact", "bilinear", "area", "bicubic" (torch interpolation), "lanczos" (Pillow, per
image, for images) and "bislerp" (bilinear interpolation whose blend of two neighbouring cells is a
spherical one over the channel vector: directions slerped, lengths interpolated linearly; ComfyUI's
latent upscaler that keeps the latent's norm statistics)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")


def _slerp_rows(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per row of (N, C): slerp of the directions of a and b by r (N, 1), times the lerp of their lengths."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua = torch.where(na > 0, a / na.clamp_min(1e-30), torch.zeros_like(a))
    ub = torch.where(nb > 0, b / nb.clamp_min(1e-30), torch.zeros_like(b))
    dot = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    safe = so.abs() > 1e-6
    wa = torch.where(safe, torch.sin((1 - r) * omega) / torch.where(safe, so, 1.0), 1 - r)
    wb = torch.where(safe, torch.sin(r * omega) / torch.where(safe, so, 1.0), r)
    out = (wa * ua + wb * ub) * (na * (1 - r) + nb * r)
    out = torch.where(dot > 1 - 1e-5, a, out)                        # (nearly) the same direction: keep a
    return torch.where(dot < 1e-5 - 1, a * (1 - r) + b * r, out)     # opposite: plain lerp


def _bislerp_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Resize along one spatial axis (dim 2 or 3) of (B, C, H, W), source positions as bilinear
    interpolation with align_corners=False places them."""
    n = x.shape[dim]
    pos = ((torch.arange(size, dtype=torch.float64) + 0.5) * n / size - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    r = (pos - lo).float()
    xm = x.movedim(dim, -1).movedim(1, -1)                            # (B, other, n, C)
    a, b = xm[..., lo, :], xm[..., hi, :]                             # (B, other, size, C)
    rr = r.reshape(1, 1, -1, 1).expand(*a.shape[:-1], 1)
    c = a.shape[-1]
    out = _slerp_rows(a.reshape(-1, c), b.reshape(-1, c), rr.reshape(-1, 1)).reshape(a.shape)
    return out.movedim(-1, 1).movedim(-1, dim)


def bislerp(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    x = x.float()
    return _bislerp_axis(_bislerp_axis(x, width, 3), height, 2)


def _lanczos(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    out = []
    for img in x.float().clamp(0, 1):
        arr = (img.movedim(0, -1).cpu().numpy() * 255).clip(0, 255).round().astype(np.uint8)
        pil = Image.fromarray(arr if arr.shape[-1] != 1 else arr[..., 0])
        res = np.asarray(pil.resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(res if res.ndim == 3 else res[..., None]).movedim(-1, 0))
    return torch.stack(out).to(x.device)


def upscale(x: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, height, width) by `method`; crop "center" first cuts the input to the new
    aspect ratio around its centre."""
    if crop == "center":
        h, w = x.shape[-2], x.shape[-1]
        old, new = w / h, width / height
        if old > new:
            cut = round(w - w * (new / old))
            x = x[..., :, cut // 2: w - cut // 2]
        elif old < new:
            cut = round(h - h * (old / new))
            x = x[..., cut // 2: h - cut // 2, :]
    if method == "bislerp":
        return bislerp(x, width, height)
    if method == "lanczos":
        return _lanczos(x, width, height)
    if method not in ("nearest-exact", "bilinear", "area", "bicubic"):
        raise ValueError(f"upscale_method={method!r}; valid: nearest-exact, bilinear, area, bicubic, bislerp, lanczos")
    return F.interpolate(x.float(), size=(height, width), mode=method)
