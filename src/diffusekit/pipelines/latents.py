"""Pixels <-> tensors, seeded initial noise with A1111's variation seeds, masks, and cheap previews."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from ..core.noise import generators_for_seeds, randn

# Linear latent -> RGB approximations for model-space latents (ComfyUI's latent_formats tables).
LATENT_RGB = {
    0.18215: (torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                            [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]), torch.zeros(3)),
    0.13025: (torch.tensor([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                            [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.6595]]),
              torch.tensor([0.1084, -0.0175, -0.0011])),
}


def pil_to_tensor(images: Sequence[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float32 in [-1, 1]; resized (Lanczos) to size=(w, h) when given."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != tuple(size):
            im = im.resize(tuple(size), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] -> PIL images (C = 1 gives grayscale, 3 gives RGB)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    out = []
    for img in x:
        arr = img.permute(1, 2, 0).numpy()
        out.append(Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB"))
    return out


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (A1111's variation seeds), per batch row."""
    af, bf = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    an, bn = af / af.norm(dim=1, keepdim=True), bf / bf.norm(dim=1, keepdim=True)
    dot = (an * bn).sum(1).clamp(-1, 1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    lin = so.abs() < 1e-6                          # nearly parallel: fall back to linear interpolation
    w_a = torch.where(lin, 1 - t, torch.sin((1 - t) * omega) / torch.where(lin, 1.0, so))
    w_b = torch.where(lin, torch.full_like(so, t), torch.sin(t * omega) / torch.where(lin, 1.0, so))
    return (w_a[:, None] * af + w_b[:, None] * bf).reshape(a.shape)


def initial_noise(shape: Sequence[int], seeds: Sequence[int], subseeds: Sequence[int] | None = None,
                  subseed_strength: float = 0.0) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Unit noise (B, C, h, w) on the CPU, one generator per image (seed i -> row i), and the generators,
    which go on to feed the sampler's own noise. With subseed_strength > 0 the noise is
    slerp(strength, noise(seed), noise(subseed)) as A1111's "Variation seed"."""
    gens = generators_for_seeds(seeds)
    noise = randn((len(seeds), *shape[1:]), gens)
    if subseed_strength > 0 and subseeds is not None:
        sub = randn((len(seeds), *shape[1:]), generators_for_seeds(subseeds))
        noise = slerp(float(subseed_strength), noise, sub)
    return noise, gens


def prepare_mask(mask: Image.Image, size: tuple[int, int], blur: int, invert: bool) -> Image.Image:
    """The repaint mask as an 'L' image of `size` (white = repaint), as A1111 builds it for "Whole picture".

    A1111 `create_binary_mask`: an RGBA/LA mask whose alpha is not fully opaque (an eraser-painted layer)
    is read from its alpha, rounded at 128; any other mask by its luminance (an opaque RGBA mask is an
    ordinary black/white picture). Then invert, Gaussian blur at the mask's own resolution, and resize
    (Lanczos) to `size`, in that order.
    """
    if mask.mode in ("RGBA", "LA") and mask.getchannel("A").getextrema() != (255, 255):
        m = mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    else:
        m = mask.convert("L")
    if invert:
        m = Image.eval(m, lambda v: 255 - v)
    if blur > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    if m.size != tuple(size):
        m = m.resize(tuple(size), Image.LANCZOS)
    return m


def overlay_mask(mask: Image.Image) -> torch.Tensor:
    """(1, 1, H, W) in [0, 1]: where the generated pixels replace the original. A1111 doubles the blurred
    mask and clips it (`mask_for_overlay`), so the repainted area is fully kept from mask >= 0.5 on and
    only the outer half of the blur fringe mixes in the original."""
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return (2 * m).clamp(0, 1)[None, None]


def latent_mask(mask: Image.Image, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(1, 1, h, w) binary repaint mask at latent resolution: A1111 resizes the mask with PIL's default
    filter (bicubic) and rounds it."""
    m = mask.convert("L").resize((latent_hw[1], latent_hw[0]), Image.BICUBIC)
    return torch.from_numpy(np.around(np.asarray(m, dtype=np.float32) / 255.0)).reshape(1, 1, *latent_hw)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting fill mode 0 ("fill", modules/masking.py `fill`): the repaint area gets the colours
    of its surroundings. The image with alpha = 255 - mask is blurred at decreasing radii and the blurred
    layers are alpha-composited from coarse to fine, so far-away holes get the broad average and edges the
    local colour; pixels outside the mask stay exactly as they were."""
    keep = ImageOps.invert(mask.convert("L"))
    layer = Image.new("RGBa", image.size)                      # premultiplied: blurring does not bleed black
    layer.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = layer.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def fit_latent_rgb(encode, scale: float, factor: int, generator: torch.Generator | None = None):
    """Least-squares linear map model-space latent -> RGB for a VAE without a published table.

    Encodes a few smooth random colour fields, pools them to latent resolution, solves for W (C, 3), b (3).
    """
    g = generator or torch.Generator().manual_seed(0)
    side = 8 * factor
    low = torch.rand(16, 3, 4, 4, generator=g) * 2 - 1
    imgs = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    with torch.no_grad():
        z = encode(imgs).float().cpu() * scale                               # (16, C, 8, 8), wherever the VAE runs
    target = F.avg_pool2d(imgs, factor)                                       # (16, 3, 8, 8)
    zz = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    zz = torch.cat([zz, torch.ones(zz.shape[0], 1)], 1)
    sol = torch.linalg.lstsq(zz, target.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    return sol[:-1], sol[-1]


def preview(latent: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> list[Image.Image]:
    """Cheap preview of model-space latents (B, C, h, w) by a linear map to RGB, no VAE call."""
    rgb = torch.einsum("bchw,cr->brhw", latent.float().cpu(), weights) + bias.view(1, 3, 1, 1)
    return tensor_to_pil(rgb)
