"""`<lora:NAME:WEIGHT>` in the prompt: parsed and cut out as A1111 does, merged for one generate() call,
restored afterwards, named in the infotext."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusekit import GenerationParams, Pipeline
from diffusekit.models.lora import LoRAError, addnet_hash
from diffusekit.pipelines.infotext import parse_infotext
from diffusekit.pipelines.loras import LoraRef, extract_loras

SMALL = dict(width=32, height=32, steps=3, cfg_scale=5.0, seed=11)

_spec = importlib.util.spec_from_file_location("_test_lora", Path(__file__).parents[1] / "models" / "test_lora.py")
_lora_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lora_tests)    # SD1_LAYERS and random_lora: a kohya file for the tiny SD1 model


@pytest.fixture(scope="module")
def lora_pipe(tiny_sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    save_file(_lora_tests.random_lora(_lora_tests.SD1_LAYERS, seed=1, scale=0.5), folder / "style.safetensors")
    (folder / "sub").mkdir()
    save_file(_lora_tests.random_lora(_lora_tests.SD1_LAYERS, seed=2, scale=0.5), folder / "sub" / "detail.safetensors")
    return Pipeline.from_pretrained(tiny_sd1, lora_dir=folder)


def weights(pipe):
    return {k: v.clone() for m in (pipe.unet, *pipe.parts.text_encoders) for k, v in m.state_dict().items()}


def test_extract_loras_follows_a1111():
    assert extract_loras("a cat <lora:style:0.5>, red") == ("a cat , red", [LoraRef("style", 0.5, 0.5)])
    assert extract_loras("<lora:style>x<lora:detail:0.3:1.2>") == ("x", [LoraRef("style"), LoraRef("detail", 0.3, 1.2)])
    assert extract_loras("<lora:style:unet=0.25>")[1] == [LoraRef("style", 1.0, 0.25)]
    assert extract_loras("<lora:style:te=0>")[1] == [LoraRef("style", 0.0, 0.0)]
    assert extract_loras("no tags (here:1.2) <hypernet:h:1>") == ("no tags (here:1.2) <hypernet:h:1>", [])
    with pytest.raises(ValueError, match="'lots' is not a number"):
        extract_loras("<lora:style:lots>")
    with pytest.raises(ValueError, match="unknown argument"):
        extract_loras("<lora:style:dyn=4>")


def test_lora_changes_the_image_and_weight_0_is_exactly_none(lora_pipe):
    plain = lora_pipe.generate(GenerationParams(prompt="a red circle", **SMALL))
    half = lora_pipe.generate(GenerationParams(prompt="a red circle <lora:style:0.5>", **SMALL))
    zero = lora_pipe.generate(GenerationParams(prompt="a red circle <lora:style:0>", **SMALL))
    te_only = lora_pipe.generate(GenerationParams(prompt="a red circle <lora:style:1:0>", **SMALL))
    assert (half.latents - plain.latents).abs().max() > 1e-3
    assert (te_only.latents - plain.latents).abs().max() > 1e-3         # the text-encoder layers act too
    assert torch.equal(zero.latents, plain.latents)
    again = lora_pipe.generate(GenerationParams(prompt="a red circle", **SMALL))
    assert torch.equal(again.latents, plain.latents)                     # nothing left merged


def test_the_tokenizer_never_sees_the_tag(lora_pipe, monkeypatch):
    seen = []
    encode = lora_pipe.text.tokenizer.encode
    monkeypatch.setattr(lora_pipe.text.tokenizer, "encode", lambda text, *a, **k: seen.append(text) or encode(text, *a, **k))
    lora_pipe.generate(GenerationParams(prompt="a red <lora:style:0.5>circle", negative_prompt="blurry", **SMALL))
    assert seen and not any("lora" in s for s in seen)
    assert any("a red circle" in s for s in seen)


def test_weights_are_restored_after_an_error(lora_pipe):
    before = weights(lora_pipe)

    def boom(_):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        lora_pipe.generate(GenerationParams(prompt="x <lora:style:1> <lora:detail:0.5>", **SMALL), callback=boom)
    after = weights(lora_pipe)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_unknown_name_and_missing_folder(lora_pipe, tiny_sd1):
    with pytest.raises(LoRAError, match=r"unknown LoRA 'nope'.*available in .*: detail, style"):
        lora_pipe.generate(GenerationParams(prompt="x <lora:nope:1>", **SMALL))
    with pytest.raises(ValueError, match="no LoRA folder is set"):
        Pipeline.from_pretrained(tiny_sd1).generate(GenerationParams(prompt="x <lora:style:1>", **SMALL))


def test_infotext_keeps_the_tag_and_writes_lora_hashes(lora_pipe):
    r = lora_pipe.generate(GenerationParams(prompt="a cat <lora:style:0.5> <lora:detail:0.3>", **SMALL))
    info = r.infotexts[0]
    assert info.startswith("a cat <lora:style:0.5> <lora:detail:0.3>\n")
    folder = lora_pipe.lora_dir
    want = (f'Lora hashes: "style: {addnet_hash(folder / "style.safetensors")[:12]}, '
            f'detail: {addnet_hash(folder / "sub" / "detail.safetensors")[:12]}"')
    assert want in info
    parsed = parse_infotext(info)
    assert re.fullmatch(r"style: [0-9a-f]{12}, detail: [0-9a-f]{12}", parsed["Lora hashes"])
    plain = lora_pipe.generate(GenerationParams(prompt="a cat", **SMALL)).infotexts[0]
    assert "Lora hashes" not in plain


def test_cli_lora_dir(lora_pipe, tiny_sd1, tmp_path):
    from diffusekit.interfaces.cli import main
    from diffusekit.pipelines.infotext import read_infotext

    rc = main(["generate", "a cat <lora:style:0.5>", "--model", str(tiny_sd1), "--lora-dir", str(lora_pipe.lora_dir),
               "--steps", "2", "--width", "32", "--height", "32", "--seed", "1", "--out", str(tmp_path)])
    assert rc == 0
    (png,) = tmp_path.glob("*.png")
    assert 'Lora hashes: "style: ' in read_infotext(png)
