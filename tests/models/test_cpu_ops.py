"""Tests of the CPU kernels behind the model layers (`diffusekit.models.cpu_ops`): every fast path
computes what the stock `F.conv2d` / `F.linear` computes, within the rounding of its dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusekit.models import cpu_ops
from diffusekit.models.cpu_ops import Conv2d, Linear

packing = pytest.mark.skipif(not cpu_ops._mkldnn_packing(), reason="this torch has no oneDNN prepacked convolution")

SHAPES = [(64, 64, 3, 1, 1, 2), (64, 64, 3, 2, 1, 3), (128, 16, 1, 1, 0, 2), (8, 8, 3, 1, 1, 16)]


def reference(conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The stock convolution in fp32 on the same (possibly rounded) weights and input."""
    bias = None if conv.bias is None else conv.bias.float()
    return F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding)


@pytest.mark.parametrize("ci,co,k,stride,pad,side", SHAPES)
def test_conv2d_paths_equal_the_stock_convolution(ci, co, k, stride, pad, side):
    torch.manual_seed(7)
    conv = Conv2d(ci, co, k, stride=stride, padding=pad)
    x = torch.randn(2, ci, side, side, requires_grad=True)
    ref = F.conv2d(x, conv.weight, conv.bias, stride, pad)
    torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=1e-5)  # with gradients: im2col GEMM or stock
    gx = torch.autograd.grad(conv(x).sum(), x)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(ref.sum(), x)[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference: fp32 keeps the im2col GEMM / stock path (packing is bf16/fp16 only)
        torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=1e-5)


@packing
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ci,co,k,stride,pad,side", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_packed_low_precision_conv_matches_the_stock_one(dtype, ci, co, k, stride, pad, side, bias):
    torch.manual_seed(8)
    conv = Conv2d(ci, co, k, stride=stride, padding=pad, bias=bias).to(dtype).eval()
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, ci, side, side).to(dtype).to(memory_format=layout)
        with torch.no_grad():
            got = conv(x)
            stock = F.conv2d(x, conv.weight, conv.bias, stride, pad)
        assert got.dtype == dtype and got.shape == stock.shape
        ref = reference(conv, x)
        tol = 2 * (stock.float() - ref).abs().max().item() + 1e-3  # the stock kernel's own rounding, twice
        assert (got.float() - ref).abs().max().item() <= tol
    if not cpu_ops._cpu_lacks(dtype):
        assert conv._packed is not None  # the packed path ran (not the fp32 fallback)
    assert set(conv.state_dict()) == ({"weight", "bias"} if bias else {"weight"})  # no extra keys


@packing
def test_packed_weight_is_remade_when_the_weight_changes():
    torch.manual_seed(9)
    conv = Conv2d(32, 32, 3, padding=1).to(torch.bfloat16).eval()
    x = torch.randn(1, 32, 6, 6).to(torch.bfloat16)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(conv(x).float(), reference(conv, x), atol=0.05, rtol=0.02)

    check()
    first = conv._packed[1]
    with torch.no_grad():
        conv(torch.randn(3, 32, 9, 5).to(torch.bfloat16))  # another shape reuses the packed copy
    assert conv._packed[1] is first
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # in place under no_grad (an optimiser step does this)
    check()
    conv.load_state_dict({"weight": torch.randn(32, 32, 3, 3), "bias": torch.randn(32)})  # copy_ into the tensor
    check()
    conv.weight.data = torch.randn(32, 32, 3, 3).to(torch.bfloat16)  # a new tensor (LoRA merge does this)
    check()
    conv.weight.requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    out = conv(xg)  # with gradients: the differentiable stock path
    assert out.requires_grad
    out.float().sum().backward()
    assert conv.weight.grad is not None and xg.grad is not None


def test_linear_computes_f_linear():
    torch.manual_seed(10)
    layer = Linear(24, 12)
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    half = Linear(24, 12).to(torch.bfloat16)
    got = half(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(got, F.linear(x.to(torch.bfloat16).float(), half.weight.float(), half.bias.float()),
                               atol=0.05, rtol=0.02)


@pytest.mark.parametrize("bias", [True, False])
def test_fp32_inference_linear_through_onednn_matches_and_is_batch_invariant(bias):
    """fp32 at inference on x86 goes through oneDNN's GEMM (not MKL's): the same numbers as F.linear within
    fp32 rounding, 3-d inputs, and one row's result does not depend on the batch it is computed in."""
    torch.manual_seed(11)
    layer = Linear(320, 1280, bias=bias).eval()
    x = torch.randn(6, 77, 320)
    with torch.no_grad():
        used = cpu_ops._onednn_linear(x, layer.weight, layer.bias)
        assert used == (cpu_ops._ARCH == "x86_64" and cpu_ops._mkldnn_packing())
        got = layer(x)
        torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)
        assert torch.equal(layer(x[2:4]), got[2:4]) and torch.equal(layer(x[3:4]), got[3:4])
    assert not cpu_ops._onednn_linear(x.requires_grad_(), layer.weight, layer.bias)  # training keeps F.linear


def test_conv2d_kernel_choice_does_not_depend_on_the_batch_size():
    """Whether the im2col GEMM runs is decided per image: an image's result is the same bits alone or in a
    batch, also where the batch's total size would cross the weight-dominated threshold (a 3x3 conv of 4
    channels on a 4x4 map, as a tiny UNet's conv_in)."""
    torch.manual_seed(3)
    conv = Conv2d(4, 32, 3, padding=1)
    x = torch.randn(4, 4, 4, 4)
    with torch.no_grad():
        batch = conv(x)
        for b in (1, 2):
            assert torch.equal(conv(x[:b]), batch[:b])
        torch.testing.assert_close(batch, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("route", ["packed", "gemm"])
@pytest.mark.parametrize("k,stride,pad,bias", [(3, 1, 1, True), (3, 2, 1, False), (1, 1, 0, True)])
def test_fp32_inference_weight_dominated_conv_through_onednn_matches_and_is_batch_invariant(k, stride, pad, bias,
                                                                                            route):
    """A UNet-low-resolution convolution (weight far larger than one image) at fp32 inference runs through
    oneDNN: its packed convolution one image per call ("packed"), or for weights kept as stored (a per-call
    upcast copy, `low_memory`) the oneDNN GEMM over gathered windows ("gemm"). Both give the stock
    convolution's numbers within fp32 rounding, a contiguous NCHW result, and each image's result is the
    same bits alone or in its batch."""
    torch.manual_seed(5)
    conv = Conv2d(256, 256, k, stride=stride, padding=pad, bias=bias).eval()
    x = torch.randn(3, 256, 4, 4)
    run = conv if route == "packed" else (lambda t: conv._conv(t, conv.weight.clone(), conv.bias))
    with torch.no_grad():
        assert conv._weight_dominated(x, conv.weight)
        assert cpu_ops._onednn_linear(x, conv.weight, conv.bias) == (cpu_ops._ARCH == "x86_64" and cpu_ops._mkldnn_packing())
        got = run(x)
        assert got.is_contiguous()
        torch.testing.assert_close(got, F.conv2d(x, conv.weight, conv.bias, stride, pad), atol=1e-4, rtol=1e-5)
        assert torch.equal(run(x[1:2]), got[1:2]) and torch.equal(run(x[:2]), got[:2])
    assert (conv._packed is not None) == (route == "packed" and cpu_ops._mkldnn_packing())
