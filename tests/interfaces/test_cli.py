"""The command line end to end on a tiny random-weight checkpoint (the `models_dir` fixture of conftest.py).

Commands run in-process through `main(argv)` (one subprocess checks the real entry point). Images are
compared as uint8 arrays: `--from` must reproduce an image exactly (0 tolerance).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusekit.interfaces.cli import main
from diffusekit.media.compare import display_tile
from diffusekit.media.grid import tile_positions
from diffusekit.media.video import read_video_info
from diffusekit.pipelines.infotext import read_infotext, save_png_with_infotext

SMALL = ["--width", "32", "--height", "32", "--steps", "3", "--cfg-scale", "5"]

A1111_TEXT = ("a cozy cabin, (snow:1.2)\nNegative prompt: blurry, lowres\n"
              "Steps: 3, Sampler: Euler a, CFG scale: 6, Seed: 1234, Size: 32x32, Model hash: 6ce0161689, "
              "Model: v1-5-pruned-emaonly, Version: v1.6.0")


@pytest.fixture(scope="module")
def tiny(models_dir):
    return str(models_dir / "tiny-a.safetensors")


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out.split(), err


def pixels(path):
    return np.asarray(Image.open(path))


def test_generate_info_and_from_reproduce_bit_for_bit(tiny, tmp_path, capsys):
    rc, paths, _ = run(capsys, "generate", "a red circle", "--model", tiny, "--seed", 5,
                       "--negative-prompt", "blurry", "--out", tmp_path / "a", *SMALL)
    assert rc == 0 and [p.rsplit("/", 1)[1] for p in paths] == ["00000-5.png"]
    image = Image.open(paths[0])
    assert image.size == (32, 32)
    text = read_infotext(paths[0])
    assert text.startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras")
    assert "Seed: 5, Size: 32x32" in text and "Model: tiny-a" in text

    rc, out, _ = run(capsys, "info", paths[0])
    lines = " ".join(out)
    assert rc == 0 and "Seed: 5" in lines and "Size: 32x32" in lines and "Sampler: DPM++ 2M" in lines

    rc, again, err = run(capsys, "generate", "--from", paths[0], "--model", tiny, "--out", tmp_path / "b")
    assert rc == 0 and again[0].endswith("00000-5.png")
    assert np.array_equal(pixels(again[0]), pixels(paths[0]))            # bit for bit
    assert read_infotext(again[0]) == text
    assert "note" not in err                                               # same model hash, RNG: CPU

    rc, other, _ = run(capsys, "generate", "--from", paths[0], "--model", tiny, "--seed", 6, "--out", tmp_path / "b")
    assert other[0].endswith("00001-6.png")                                # numbering continues, flag overrides
    assert not np.array_equal(pixels(other[0]), pixels(paths[0]))


def test_inpainting_takes_the_init_size_and_reproduces_with_the_same_inputs(tiny, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    flags = ["--init-image", tmp_path / "init.png", "--mask", tmp_path / "mask.png"]
    rc, paths, _ = run(capsys, "generate", "a red circle", "--model", tiny, "--seed", 3, "--steps", 4,
                       "--denoising-strength", 0.5, *flags, "--out", tmp_path / "a")
    assert rc == 0 and Image.open(paths[0]).size == (48, 40)               # no --width/--height: the init size
    text = read_infotext(paths[0])
    assert "Size: 48x40" in text and "Denoising strength: 0.5" in text and "Mask blur: 4" in text
    rc, _, err = run(capsys, "generate", "--from", paths[0], "--model", tiny)
    assert rc == 2 and "inpainting" in err and "--mask" in err
    rc, again, _ = run(capsys, "generate", "--from", paths[0], "--model", tiny, *flags, "--out", tmp_path / "b")
    assert rc == 0 and np.array_equal(pixels(again[0]), pixels(paths[0]))


def test_batch_files_are_numbered_with_their_seeds(tiny, tmp_path, capsys):
    rc, paths, _ = run(capsys, "generate", "x", "--model", tiny, "--seed", 10, "--batch-size", 2,
                       "--out", tmp_path, *SMALL)
    assert rc == 0 and [p.rsplit("/", 1)[1] for p in paths] == ["00000-10.png", "00001-11.png"]
    assert "Seed: 11" in read_infotext(paths[1])


def test_info_reads_a1111_images(tmp_path, capsys):
    path = save_png_with_infotext(Image.new("RGB", (8, 8)), tmp_path / "a1111.png",
                                  A1111_TEXT.replace("Euler a", "DPM++ 2M Karras"))
    rc = main(["info", str(path)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "Prompt: a cozy cabin, (snow:1.2)" in text and "Negative prompt: blurry, lowres" in text
    assert "Sampler: DPM++ 2M\n" in text and "Schedule type: Karras" in text and "Size: 32x32" in text
    rc = main(["info", str(path), "--json"])
    fields = json.loads(capsys.readouterr().out)
    assert fields["Seed"] == "1234" and fields["Size-1"] == "32" and fields["Model hash"] == "6ce0161689"


def test_from_an_a1111_image_uses_its_settings_and_says_what_differs(tiny, tmp_path, capsys):
    path = save_png_with_infotext(Image.new("RGB", (32, 32)), tmp_path / "a1111.png", A1111_TEXT)
    rc, paths, err = run(capsys, "generate", "--from", path, "--model", tiny, "--out", tmp_path / "o")
    assert rc == 0 and paths[0].endswith("00000-1234.png")
    text = read_infotext(paths[0])
    assert text.startswith("a cozy cabin, (snow:1.2)\nNegative prompt: blurry, lowres\nSteps: 3, Sampler: Euler a")
    assert "CFG scale: 6.0" in text and "Seed: 1234" in text
    assert "RNG: GPU" in err and "6ce0161689" in err                      # noise source and model differ


def test_save_process_writes_one_frame_per_step(tiny, tmp_path, capsys):
    rc, paths, _ = run(capsys, "generate", "x", "--model", tiny, "--seed", 1, "--save-process",
                       "--out", tmp_path, *SMALL[:4], "--steps", 4)
    assert rc == 0 and [p.rsplit(".", 1)[1] for p in paths] == ["png", "mp4", "gif"]
    info = read_video_info(paths[1])
    assert info["frames"] == 4 and info["fps"] == 1
    w, h = info["size"]
    assert w == 256 and 256 < h < 300                                       # 32 px shown at 8x, caption bar below
    gif = Image.open(paths[2])
    assert gif.n_frames == 4 and gif.size[0] == 256

    rc, paths, _ = run(capsys, "generate", "x", "--model", tiny, "--seed", 1, "--save-process", "--process-mode",
                       "decode", "--fps", 2, "--out", tmp_path, *SMALL)
    info = read_video_info(paths[1])
    assert info["frames"] == 3 and info["fps"] == 2 and info["size"][0] == 256


def test_the_last_denoising_frame_is_the_image(tiny, tmp_path, capsys):
    """--save-process decodes every x0 estimate by default for images up to 256x256 (--process-mode auto):
    the last frame is the PNG itself (shown at 8x, caption bar below; the GIF's palette aside)."""
    def last_frame_error(*mode):
        rc, paths, _ = run(capsys, "generate", "x", "--model", tiny, "--seed", 1, "--save-process", *mode,
                           "--out", tmp_path, *SMALL)
        gif = Image.open(paths[2])
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB"), dtype=np.int16)[:256]
        want = np.asarray(Image.open(paths[0]).convert("RGB").resize((256, 256), Image.NEAREST), dtype=np.int16)
        return np.abs(last - want).mean()

    auto, preview = last_frame_error(), last_frame_error("--process-mode", "preview")
    assert auto < 10 and preview > 4 * auto       # measured 7.2 (palette) vs 109 (a linear map's colours)


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tiny, tmp_path, capsys):
    """Under capsys stderr is no terminal: a line per finished comparison cell, one per sampling pass."""
    rc, _, err = run(capsys, "compare", "a red circle", "--model", tiny, "--samplers", "Euler,DPM++ 2M",
                     "--schedulers", "Normal,Karras", "--seed", 4, "--out", tmp_path, *SMALL)
    assert rc == 0 and "\r" not in err
    cells = [line.split(" [")[0] for line in err.splitlines() if line.startswith("compare:")]
    assert cells == [f"compare: {i}/4 images" for i in range(1, 5)]
    rc, _, err = run(capsys, "generate", "x", "--model", tiny, "--seed", 1, "--out", tmp_path, *SMALL)
    assert rc == 0 and err.startswith("txt2img: 3/3 steps [sigma ") and err.count("\n") == 1


def test_shipped_models_default_to_the_settings_of_their_cards(tmp_path, capsys):
    rc, paths, _ = run(capsys, "generate", "a red circle", "--steps", 2, "--seed", 1, "--out", tmp_path)
    text = read_infotext(paths[0])
    assert rc == 0 and "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0," in text and "Model: shapes," in text


def test_compare_grid_and_lock_step_video(tiny, tmp_path, capsys):
    rc, paths, _ = run(capsys, "compare", "a red circle", "--model", tiny, "--samplers", "Euler,DPM++ 2M",
                       "--schedulers", "Normal,Karras", "--axes", "pairs", "--seed", 4, "--video",
                       "--out", tmp_path, *SMALL)
    assert rc == 0 and [p.rsplit("/", 1)[1] for p in paths] == ["compare-00000-4.png", "compare-00000-4.mp4"]
    grid = Image.open(paths[0]).convert("RGB")
    assert "Sampler: Euler" in read_infotext(paths[0])
    # the first tile is exactly `generate` with Euler + Normal at the same seed
    rc, single, _ = run(capsys, "generate", "a red circle", "--model", tiny, "--sampler", "Euler", "--scheduler",
                        "Normal", "--seed", 4, "--out", tmp_path / "single", *SMALL)
    tiles = tile_positions(grid, 1, 2, (256, 256))
    crop = lambda xy: np.asarray(grid.crop((xy[0], xy[1], xy[0] + 256, xy[1] + 256)))
    assert np.array_equal(crop(tiles[0]), np.asarray(display_tile(Image.open(single[0]).convert("RGB"))))
    assert not np.array_equal(crop(tiles[0]), crop(tiles[1]))
    info = read_video_info(paths[1])
    assert info["frames"] == 3 and info["size"][0] > 2 * 256


@pytest.mark.parametrize("argv, names", [
    (["--width", "30"], "width=30"),
    (["--sampler", "nope"], "'nope'"),
    (["--scheduler", "Karras2"], "'Karras2'"),
    (["--init-image", "{img}", "--denoising-strength", "1.5"], "1.5"),
    (["--init-image", "{tmp}/missing.png"], "missing.png"),
    (["--mask", "{img}"], "--init-image"),
    (["--init-image", "{img}", "--mask", "{mask16}"], "16x16"),
    (["--model", "{tmp}/nope.safetensors"], "nope.safetensors"),
    (["--fps", "2"], "--save-process"),
    (["--save-process", "--fps", "0"], "--fps 0"),
    (["--from", "{mask16}"], "no generation parameters"),
    (["--prompt-30k"], "30000"),
])
def test_bad_input_is_one_line_naming_the_value(tiny, tmp_path, capsys, argv, names):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "img.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "mask16.png")
    argv = [a.format(img=tmp_path / "img.png", mask16=tmp_path / "mask16.png", tmp=tmp_path) for a in argv]
    prompt = "x" * 30000 if argv == ["--prompt-30k"] else "a red circle"
    argv = [] if argv == ["--prompt-30k"] else argv
    rc, _, err = run(capsys, "generate", prompt, "--model", tiny, "--out", tmp_path / "o", *SMALL, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("diffusekit: error: ") and "Traceback" not in err
    assert names in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_compare_models_side_by_side(tiny, tmp_path, capsys):
    rc, paths, _ = run(capsys, "compare", "a red circle", "--axes", "models-x-steps", "--models", f"{tiny},{tiny}",
                       "--steps-list", "2", "--seed", 4, "--out", tmp_path, *SMALL)
    assert rc == 2                                                      # one model named twice
    other = tmp_path / "other.safetensors"
    other.write_bytes(Path(tiny).read_bytes())
    rc, paths, _ = run(capsys, "compare", "a red circle", "--axes", "models-x-steps", "--models", f"{tiny},{other}",
                       "--steps-list", "2,3", "--seed", 4, "--out", tmp_path, *SMALL)
    assert rc == 0 and paths[0].endswith(".png")
    grid = Image.open(paths[0]).convert("RGB")
    tiles = tile_positions(grid, 2, 2, (256, 256))
    crop = lambda xy: np.asarray(grid.crop((xy[0], xy[1], xy[0] + 256, xy[1] + 256)))   # noqa: E731
    assert np.array_equal(crop(tiles[0]), crop(tiles[1]))               # the same weights side by side
    rc, _, err = run(capsys, "compare", "x", "--models", f"{tiny},{other}")
    assert rc == 2 and "models-x-steps" in err


def test_compare_bad_lists_name_the_value(tmp_path, capsys):
    rc, _, err = run(capsys, "compare", "x", "--steps-list", "10,x", "--axes", "samplers-x-steps")
    assert rc == 2 and "'x'" in err
    rc, _, err = run(capsys, "compare", "x", "--samplers", "Euler,Heun", "--axes", "cfg-x-steps")
    assert rc == 2 and "--samplers" in err and "cfg-x-steps" in err
    rc, _, err = run(capsys, "compare", "x", "--samplers", "Euler,bogus")
    assert rc == 2 and "'bogus'" in err


def test_empty_prompt_is_allowed_and_unconditional(tiny, tmp_path, capsys):
    """Documented behaviour: "" is a valid prompt; cond and uncond are then both the empty text."""
    rc, paths, _ = run(capsys, "generate", "", "--model", tiny, "--seed", 2, "--out", tmp_path, *SMALL)
    assert rc == 0
    assert read_infotext(paths[0]).startswith("Steps: 3")                 # no prompt line, as A1111 writes it
    rc = main(["info", paths[0]])
    assert rc == 0 and "Prompt: \n" in capsys.readouterr().out


def test_ten_thousand_character_prompt_is_chunked_not_refused(tiny, tmp_path, capsys):
    """Documented behaviour: prompts up to 20,000 characters are split into 75-token chunks (A1111's rule);
    longer ones are refused (see the bad-input test)."""
    prompt = ("red circle, blue square, " * 400)[:10_000]
    rc, paths, _ = run(capsys, "generate", prompt, "--model", tiny, "--seed", 2, "--out", tmp_path, *SMALL)
    assert rc == 0 and read_infotext(paths[0]).startswith(prompt)


def test_missing_prompt_and_missing_from_file(tmp_path, capsys):
    rc, _, err = run(capsys, "generate")
    assert rc == 2 and "PROMPT" in err
    rc, _, err = run(capsys, "generate", "--from", tmp_path / "none.png")
    assert rc == 2 and "none.png" in err
    rc, _, err = run(capsys, "info", tmp_path / "none.png")
    assert rc == 2 and "none.png" in err


def test_from_an_img2img_image_asks_for_the_init_image(tmp_path, capsys):
    text = A1111_TEXT.replace("Model hash", "Denoising strength: 0.6, Model hash")
    path = save_png_with_infotext(Image.new("RGB", (32, 32)), tmp_path / "i2i.png", text)
    rc, _, err = run(capsys, "generate", "--from", path)
    assert rc == 2 and "img2img" in err and "--init-image" in err


def test_train_and_serve_are_wired(monkeypatch, tmp_path, capsys):
    import types

    import diffusekit.interfaces.server as server

    calls = {}
    fake = types.ModuleType("diffusekit.training.trainer")
    fake.train_from_config = lambda path, resume=False: calls.setdefault("train", (path, resume))
    monkeypatch.setitem(sys.modules, "diffusekit.training.trainer", fake)
    cfg = tmp_path / "shapes.toml"
    cfg.write_text("[model]\n")
    assert main(["train", str(cfg), "--resume"]) == 0 and calls["train"] == (str(cfg), True)
    assert main(["train", str(tmp_path / "none.toml")]) == 2

    monkeypatch.setattr(server, "serve", lambda **kw: calls.setdefault("serve", kw))
    assert main(["serve", "--port", "7861", "--models-dir", "m", "--api-auth", "me:pw", "--queue-size", "3"]) == 0
    assert calls["serve"] == dict(host="127.0.0.1", port=7861, model="shapes", models_dir="m", api_auth="me:pw",
                                  queue_size=3)
    assert main(["serve", "--api-auth", "nocolon"]) == 2 and "user:password" in capsys.readouterr().err
    calls.pop("serve")
    assert main(["serve", "--max-pixel-steps", "1000000", "--max-memory-mb", "8000"]) == 0
    assert calls["serve"]["max_pixel_steps"] == 1_000_000 and calls["serve"]["max_memory_mb"] == 8000


def test_entry_point_exits_2_without_traceback(tmp_path):
    """The size rule names the model's own VAE factor: 4 for the shipped shapes model (SD's is 8)."""
    proc = subprocess.run([sys.executable, "-m", "diffusekit.interfaces.cli", "generate", "x", "--width", "30"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "diffusekit: error: width=30: must be a multiple of 4 from 8 to 4096 (the model's VAE downsamples by 4)"


def test_eval_command_is_wired(capsys):
    from diffusekit.interfaces.cli import build_parser
    args = build_parser().parse_args(["eval", "--model", "x.safetensors", "-n", "4"])
    assert args.func.__name__ == "cmd_eval" and args.n == 4
