"""A1111 infotext: formatting, parsing, PNG / EXIF storage.

Layout and parsing rules from AUTOMATIC1111 stable-diffusion-webui v1.10 (processing.py
`create_infotext`, infotext_utils.py `parse_generation_parameters` / `read_info_from_image`).
"""

import os
import random
import re

import pytest
from PIL import Image

from diffusekit.pipelines.infotext import (
    format_infotext,
    parse_infotext,
    quote,
    read_infotext,
    save_png_with_infotext,
    split_legacy_sampler,
    unquote,
)

# A realistic A1111 1.10 infotext: hires fix, LoRA and embedding hashes, clip skip, VAE.
A1111_TEXT = """masterpiece, best quality, 1girl, <lora:add_detail:0.6>, (red dress:1.2),
[forest:city:0.4], looking at viewer
Negative prompt: (worst quality, low quality:1.4), EasyNegative,
bad hands
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, \
VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, Clip skip: 2, \
Hires upscale: 2, Hires steps: 12, Hires upscaler: R-ESRGAN 4x+ Anime6B, \
Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1"""


def test_parse_real_a1111_infotext():
    assert parse_infotext(A1111_TEXT) == {
        "Prompt": "masterpiece, best quality, 1girl, <lora:add_detail:0.6>, (red dress:1.2),\n"
                  "[forest:city:0.4], looking at viewer",
        "Negative prompt": "(worst quality, low quality:1.4), EasyNegative,\nbad hands",
        "Steps": "28", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7",
        "Seed": "1234567890", "Size-1": "512", "Size-2": "768", "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly", "VAE hash": "735e4c3a44",
        "VAE": "vae-ft-mse-840000-ema-pruned.safetensors", "Denoising strength": "0.45",
        "Clip skip": "2", "Hires upscale": "2", "Hires steps": "12",
        "Hires upscaler": "R-ESRGAN 4x+ Anime6B", "Lora hashes": "add_detail: 7c6bad76eb54",
        "TI hashes": "EasyNegative: c74b4e810b03", "Version": "v1.10.1",
        "RNG": "GPU",  # default: not written by A1111 when GPU
    }


def test_format_exact_layout_and_order():
    params = {  # deliberately out of order; Version must end up last
        "Version": "diffusekit 0.1.0", "Seed": 1, "Size": "512x512", "Steps": 20, "Model": "shapes",
        "Sampler": "DPM++ 2M", "CFG scale": 7, "Schedule type": "Karras", "Model hash": "6ce0161689",
        "Clip skip": 1, "RNG": "GPU", "Eta": None,  # all three dropped
    }
    assert format_infotext("a red circle", "blurry", params) == (
        "a red circle\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model hash: 6ce0161689, Model: shapes, Version: diffusekit 0.1.0"
    )


def test_format_extras_after_known_keys_and_flags():
    params = {"Hires upscale": 2, "Steps": 4, "Eta": 0.5, "Sampler": "Euler a", "RNG": "CPU",
              "Clip skip": 2, "Seed": 3, "Denoising strength": 0.7, "Hires fix": "Hires fix"}
    line = format_infotext("p", "", params).split("\n")[-1]
    assert line == ("Steps: 4, Sampler: Euler a, Seed: 3, Denoising strength: 0.7, Clip skip: 2, "
                    "RNG: CPU, Hires upscale: 2, Eta: 0.5, Hires fix")


def test_empty_negative_prompt_line_is_omitted():
    params = {"Steps": 20, "Sampler": "Euler", "Seed": 5}
    for negative in ("", None):
        assert format_infotext("a cat", negative, params) == "a cat\nSteps: 20, Sampler: Euler, Seed: 5"
    parsed = parse_infotext("a cat\nSteps: 20, Sampler: Euler, Seed: 5")
    assert parsed["Negative prompt"] == "" and parsed["Prompt"] == "a cat"


def test_quoting():
    assert quote("plain") == "plain" and quote(7) == 7
    assert quote("a, b") == '"a, b"'
    assert quote("k: v") == '"k: v"'
    assert quote("two\nlines") == '"two\\nlines"'
    assert quote('say "hi", ok') == '"say \\"hi\\", ok"'
    assert quote("café, ü") == '"café, ü"'  # ensure_ascii=False, as A1111
    for value in ["a, b", "k: v", "two\nlines", 'say "hi", ok']:
        assert unquote(quote(value)) == value
    assert unquote('"unterminated') == '"unterminated' and unquote('"') == '"' and unquote("") == ""


def test_round_trip_prompt_with_commas_newlines_and_quoted_values():
    prompt = "a castle, (stormy sky:1.3)\non a hill, [day:night:0.5]"
    negative = "blurry, lowres\nwatermark"
    params = {"Steps": 30, "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": 5.5,
              "Seed": 42, "Size": "768x512", "Model": "shapes", "Lora hashes": "a: 1, b: 2",
              "Note": 'line one\nline "two"', "Seed resize from": "640x448"}
    parsed = parse_infotext(format_infotext(prompt, negative, params))
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == negative
    assert parsed["Lora hashes"] == "a: 1, b: 2" and parsed["Note"] == 'line one\nline "two"'
    assert (parsed["Size-1"], parsed["Size-2"]) == ("768", "512")
    assert (parsed["Seed resize from-1"], parsed["Seed resize from-2"]) == ("640", "448")
    assert parsed["CFG scale"] == "5.5" and parsed["Steps"] == "30"
    assert parsed["Clip skip"] == "1" and parsed["RNG"] == "GPU"  # defaults


def test_last_line_needs_three_pairs_to_be_parameters():
    parsed = parse_infotext("a photo\nstyle: anime, mood: calm")
    assert parsed["Prompt"] == "a photo\nstyle: anime, mood: calm"
    assert "style" not in parsed and parsed["Schedule type"] == "Automatic"


# A1111's own parameter regex (infotext_utils.re_param), the reference the linear scanner must equal
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def test_param_pairs_equal_a1111_regex_findall_on_random_lines():
    from diffusekit.pipelines.infotext import _param_pairs
    rng = random.Random(20)
    alphabet = list("aZ_1 -/::,,\"\"\\\n\t") + ["é", "\u00a0", "\r", "x"]
    for _ in range(20_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert _param_pairs(line) == A1111_PARAM.findall(line), repr(line)
    line = A1111_TEXT.split("\n")[-1]
    assert _param_pairs(line) == A1111_PARAM.findall(line)


@pytest.mark.timeout(60)  # a hang guard only: A1111's regex would take hours here
@pytest.mark.parametrize("line", ["a" * 2_000_000, "a-" * 1_000_000, "Steps: " + "x" * 2_000_000,
                                  'k: "x, ' * 100_000, '\\"' * 500_000, "Seed: 1, " * 100_000 + "z" * 1_000_000])
def test_hostile_infotext_parses_in_one_pass(line):
    parsed = parse_infotext("prompt\n" + line)
    assert parsed["Prompt"].startswith("prompt")


def test_prompt_only_text_and_empty_values():
    assert parse_infotext("  just a prompt  ") == {
        "Prompt": "just a prompt", "Negative prompt": "", "Clip skip": "1", "RNG": "GPU",
        "Schedule type": "Automatic"}
    parsed = parse_infotext("p\nSteps: 20, Sampler: Euler, Model: , Seed: 3")
    assert "Model" not in parsed and parsed["Seed"] == "3"  # A1111 skips a key without value


@pytest.mark.parametrize("name, expected", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
    ("DPM2 a Karras", ("DPM2 a", "Karras")),
    ("Euler SGM Uniform", ("Euler", "SGM Uniform")),  # the longest suffix wins
    ("Euler a", ("Euler a", None)),
    ("DDIM", ("DDIM", None)),
    ("Karras", ("Karras", None)),
])
def test_split_legacy_sampler(name, expected):
    assert split_legacy_sampler(name) == expected


def test_parse_splits_legacy_sampler_names():
    parsed = parse_infotext("p\nSteps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, "
                            "Hires sampler: DPM++ 2M Karras, Seed: 1")
    assert parsed["Sampler"] == "DPM++ SDE" and parsed["Schedule type"] == "Karras"
    assert parsed["Hires sampler"] == "DPM++ 2M" and parsed["Hires schedule type"] == "Karras"


# --------------------------------------------------------------------------------------- files

def test_png_round_trip_is_atomic(tmp_path):
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    text = format_infotext("a red square, (bold:1.2)", "blurry", {"Steps": 20, "Seed": 1, "Size": "8x8"})
    path = tmp_path / "out.png"
    assert save_png_with_infotext(image, path, text) == path
    assert read_infotext(path) == text
    # overwrite in place: the rename replaces the file, no temporary file is left behind
    save_png_with_infotext(image, path, "second")
    assert read_infotext(str(path)) == "second"
    assert sorted(os.listdir(tmp_path)) == ["out.png"]
    with Image.open(path) as reopened:
        assert reopened.format == "PNG" and reopened.getpixel((0, 0)) == (200, 10, 10)
        assert read_infotext(reopened) == "second"


def test_png_non_latin1_text(tmp_path):
    text = "猫, ネコ (cute:1.2)\nSteps: 20, Sampler: Euler, Seed: 1"
    path = save_png_with_infotext(Image.new("L", (4, 4)), tmp_path / "u.png", text)
    assert read_infotext(path) == text


def test_image_without_infotext(tmp_path):
    path = tmp_path / "bare.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_infotext(path) is None


def _exif_with_user_comment(raw: bytes) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = raw  # Exif IFD, UserComment
    return exif


@pytest.mark.parametrize("fmt, encoding", [("JPEG", "utf-16-be"), ("WEBP", "utf-16-be"), ("JPEG", "utf-16-le")])
def test_exif_user_comment(tmp_path, fmt, encoding):
    text = "a fox, (snow:1.1)\nNegative prompt: blur\nSteps: 20, Sampler: Euler, Seed: 9"
    path = tmp_path / f"img.{fmt.lower()}"
    raw = b"UNICODE\x00" + text.encode(encoding)  # A1111 (piexif) writes big-endian
    Image.new("RGB", (16, 16)).save(path, format=fmt, exif=_exif_with_user_comment(raw).tobytes())
    assert read_infotext(path) == text
    assert parse_infotext(read_infotext(path))["Seed"] == "9"
