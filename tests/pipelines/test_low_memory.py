"""`Pipeline.from_pretrained(..., low_memory=True)` on a CPU: a UNet stored in fp16 keeps its Linear / Conv2d
weights in fp16 (cast per call) and computes in float32: the image is that of the whole model upcast up front
(the same float32 arithmetic on exactly upcast values), with half the UNet's weight memory."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusekit import GenerationParams, Pipeline
from diffusekit.models.cpu_ops import Conv2d, Linear

# this folder's conftest.py by path ("import conftest" is ambiguous when several test folders have one)
_spec = importlib.util.spec_from_file_location("pipelines_conftest", Path(__file__).with_name("conftest.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_low_memory_keeps_fp16_weights_and_draws_the_float32_image(tmp_path, family):
    path = _tiny.save_tiny(tmp_path / f"tiny-{family}-fp16.safetensors", family, dtype=torch.float16)
    plain = Pipeline.from_pretrained(path)
    low = Pipeline.from_pretrained(path, low_memory=True)
    kinds = {type(m): m.weight.dtype for m in low.unet.modules() if isinstance(m, (Linear, Conv2d))}
    assert set(kinds.values()) == {torch.float16}, kinds
    norms = [m.weight.dtype for m in low.unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert set(norms) == {torch.float32}
    assert low.unet.activation_dtype() == torch.float32 and plain.unet.activation_dtype() == torch.float32
    big = sum(p.numel() * p.element_size() for p in low.unet.parameters())
    assert big < 0.6 * sum(p.numel() * p.element_size() for p in plain.unet.parameters())
    params = GenerationParams(prompt="a photo of a cat", negative_prompt="blurry", steps=3, seed=5, width=64,
                              height=64, cfg_scale=6)
    a, b = (np.asarray(p.generate(params).images[0], np.int16) for p in (plain, low))
    assert np.abs(a - b).max() <= 1                                # float32 rounding at most (seen: 0)


def test_low_memory_leaves_fp32_files_and_other_devices_alone(tmp_path):
    path = _tiny.save_tiny(tmp_path / "tiny-sd1.safetensors", "sd1")
    low = Pipeline.from_pretrained(path, low_memory=True)
    assert {p.dtype for p in low.unet.parameters()} == {torch.float32}
    half = Pipeline.from_pretrained(_tiny.save_tiny(tmp_path / "h.safetensors", "sd1", dtype=torch.float16),
                                    dtype=torch.bfloat16, low_memory=True)   # an explicit dtype wins
    assert {p.dtype for p in half.unet.parameters()} == {torch.bfloat16}
