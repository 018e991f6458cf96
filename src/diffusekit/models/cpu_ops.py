"""The fast CPU paths behind the model layers: `linear`, `Linear` and `Conv2d` compute what
`F.linear` / `F.conv2d` compute, with the kernel each CPU runs fastest.

- bf16/fp16 weights on an x86 CPU without native instructions for them (`_cpu_lacks`) compute
  matmuls and convolutions in fp32 (exact products, fp32 accumulation as oneDNN does anyway).
- fp32 convolutions whose weight dwarfs the feature map run as im2col + one GEMM (in training, and for
  weights kept as stored); at inference through the packed weight below.
- At inference, a convolution keeps its weight reordered once into oneDNN's blocked layout
  (`_packed_weight`): the stock eager call reorders the whole weight on every call, which at the
  UNet's 1280-channel 8x8 / 4x4 levels costs 5-10x the convolution itself (bf16 on AMX). In fp32 the
  packed convolution runs one image per call (batch-invariant results).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2d", "Linear", "linear"]


def _emulated_dtypes() -> frozenset:
    """The low-precision dtypes this x86 CPU has no native instructions for (bf16: AVX512-BF16 /
    AMX-BF16; fp16: AVX512-FP16 / AMX-FP16), where oneDNN/MKL emulate them several times slower
    than fp32. Read once at import (a plain set lookup also traces under torch.compile)."""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # older torch: keep the stock kernels
        return frozenset()
    if caps.get("architecture") != "x86_64":
        return frozenset()
    flags = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
    return frozenset(d for d, names in flags.items() if not any(caps.get(f) for f in names))


_EMULATED = _emulated_dtypes()
try:
    _ARCH = torch.cpu.get_capabilities().get("architecture")
except Exception:  # older torch
    _ARCH = None


def _cpu_lacks(dtype: torch.dtype) -> bool:
    """True on an x86 CPU that emulates `dtype` (see `_emulated_dtypes`)."""
    return dtype in _EMULATED


def _compute_in_fp32(t: torch.Tensor) -> bool:
    """Whether a bf16/fp16 matmul or convolution on `t` is faster computed in fp32.

    The low-precision products are exact in fp32 and oneDNN accumulates in fp32 anyway, so this
    changes only the summation order; the result is rounded back to the low precision.
    """
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) and _cpu_lacks(t.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear`, in fp32 for bf16/fp16 on CPUs that emulate those types (`_compute_in_fp32`). Weights
    stored in another dtype than x (bf16 / fp8 kept memory-mapped, Flux) are cast to x's for this call
    only: one layer's upcast copy at a time."""
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    if _compute_in_fp32(x):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    if _onednn_linear(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """fp32 inference on an x86 CPU: oneDNN's own GEMM instead of the MKL sgemm behind `F.linear`, which on
    AMD CPUs does not run its fastest AVX-512 kernels (a 2048x320 @ 320x1280 fp32 linear, one thread on an AMD
    EPYC: 87 GFLOP/s MKL, 208 oneDNN). oneDNN's rows do not depend on the batch they are in (MKL's do, for
    small ones)."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 2 or torch.compiler.is_compiling()
            or _ARCH != "x86_64" or not _mkldnn_packing()):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and keys) through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@functools.cache
def _mkldnn_packing() -> bool:
    """Whether this torch has oneDNN's prepacked convolution ops (the ones inductor's freezing uses)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and callable(torch.ops.mkldnn._reorder_convolution_weight)
                and callable(torch.ops.mkldnn._linear_pointwise)
                and callable(torch.ops.mkldnn._convolution_pointwise))
    except (AttributeError, RuntimeError):
        return False


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters and keys) with the fastest CPU kernel for the call.

    - Inference on CPU (x86 with oneDNN): oneDNN with the weight reordered once to its blocked layout and
      kept (`_packed_weight`), instead of reordering it on every call. In fp32 only weight-dominated calls
      (below) take it, each image its own call: oneDNN's fp32 result for one image depends on the batch
      it is in (a few 1e-7), which would break "a batch equals its images made one by one". Weights kept
      as stored (`low_memory`, upcast per call) are not packed: the packed copy would be the
      full-precision copy that mode avoids.
    - fp32 with a weight-dominated call otherwise (training, no oneDNN, kept-as-stored weights):
      convolution as matrix multiplication
      (Chellapilla et al. 2006): cols = im2col(x) (B, C_in*kh*kw, L), out = W.view(C_out, -1) @ cols
      + b; the GEMM reads the contiguous weight in place. At inference on x86 the GEMM is oneDNN's
      (`_onednn_linear`, over the windows in row order), in training MKL's batched one.
    - bf16/fp16 on CPUs that emulate them compute in fp32 (`_compute_in_fp32`).
    - Otherwise (GPU, large feature maps in fp32) the stock convolution.
    The packed copy is a cache: it is remade when the weight tensor changes (a new tensor, `load_state_dict`,
    an optimiser step, `copy_` under no_grad all do); writing through `weight.data` in place does not
    signal a change, so code that edits weights that way must assign a new tensor instead.
    """

    _packed: tuple | None = None  # (key, packed weight): not a buffer, never in the state dict
    fp32_packed = True  # False: fp32 inference takes the GEMM / stock route below (bench/unet.py --fp32-conv gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _compute_in_fp32(x):
            bias = None if self.bias is None else self.bias.float()
            return self._conv(x.float(), self.weight.float(), bias).to(x.dtype)
        if self.weight.dtype != x.dtype:   # weights kept as stored (fp16 / bf16, memory-mapped): this call's copy
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return self._conv(x, self.weight.to(x.dtype), bias)
        return self._conv(x, self.weight, self.bias)

    def _weight_dominated(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Per image, so the kernel (and its rounding) an image gets does not depend on its batch size."""
        return weight.numel() >= 8 * x[0].numel()

    def _plain(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (x.device.type != "cpu" or self.groups != 1 or self.dilation != (1, 1)
                or self.padding_mode != "zeros" or isinstance(self.padding, str) or weight.dtype != x.dtype)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._plain(x, weight) or torch.compiler.is_compiling():
            return self._conv_forward(x, weight, bias)  # under torch.compile inductor packs and fuses
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
        if (not grad and _mkldnn_packing() and weight is self.weight
                and (x.dtype != torch.float32 or (self.fp32_packed and self._weight_dominated(x, weight)))):
            args = (bias, list(self.padding), list(self.stride), list(self.dilation), 1, "none", [], "")
            if x.dtype != torch.float32:
                return torch.ops.mkldnn._convolution_pointwise(x, self._packed_weight(x), *args)
            # fp32, weight-dominated: one image per call, so an image's result does not depend on its batch
            # (oneDNN's fp32 kernels do, by a few 1e-7); 0.55-0.95x the time of the GEMM below at the UNet's
            # 16x16-4x4 levels. Larger feature maps keep the stock call (per image there: 1.15x slower at 64x64)
            packed, out = self._packed_weight(x[:1]), None
            for i in range(x.shape[0]):   # oneDNN may answer channels-last: copied into one NCHW tensor
                y = torch.ops.mkldnn._convolution_pointwise(x[i:i + 1], packed, *args)
                out = x.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
                out[i:i + 1].copy_(y)
            return out
        if x.dtype != torch.float32 or not self._weight_dominated(x, weight):
            return self._conv_forward(x, weight, bias)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        # (B, C, H+2p, W+2p) -> windows (B, C, Ho, Wo, kh, kw) as a view; one gather copy below puts each
        # window's values in weight.flatten(1)'s order (twice as fast as F.unfold).
        win = (F.pad(x, (pw, pw, ph, ph)) if ph or pw else x).unfold(2, kh, sh).unfold(3, kw, sw)
        n, ho, wo = x.shape[0], win.shape[2], win.shape[3]
        if _onednn_linear(x, weight, bias):
            # Inference: rows (B, Ho*Wo, C_in*kh*kw) @ W^T through oneDNN (2x MKL's bmm for the UNet's
            # 1280-channel 3x3 convolutions on an AMD EPYC; each image's rows are computed alike in any
            # batch), then back to (B, C_out, Ho, Wo).
            rows = win.permute(0, 2, 3, 1, 4, 5).reshape(n, ho * wo, -1)
            out = torch.ops.mkldnn._linear_pointwise(rows, weight.flatten(1), bias, "none", [], "")
            return out.view(n, ho, wo, -1).permute(0, 3, 1, 2).contiguous()
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            cols = x.flatten(2)  # (B, C_in, H*W), a view
        else:
            cols = win.permute(0, 1, 4, 5, 2, 3).reshape(n, -1, ho * wo)  # (B, C*kh*kw, Ho*Wo)
        w = weight.flatten(1)[None].expand(x.shape[0], -1, -1)  # (B, C_out, C_in*kh*kw), a view
        if bias is None:
            out = torch.bmm(w, cols)
        else:  # bias written into the output before the GEMM accumulates: no extra pass
            out = torch.baddbmm(bias[None, :, None], w, cols)
        return out.view(x.shape[0], -1, ho, wo)

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """`self.weight` in oneDNN's blocked layout for this convolution, made on first use and kept while
        the weight is the same tensor at the same version. Any input shape may use it; the layout is
        chosen for the first."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # free the old copy before making the new one
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                w.detach(), list(self.padding), list(self.stride), list(self.dilation), 1, list(x.shape))
            self._packed = (key, packed)
        return self._packed[1]
