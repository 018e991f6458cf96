"""Comparison grids and denoising-video frames on a tiny random-weight SD 1.x pipeline.

Exactness: a grid cell is the same generation as a single run (uint8 equality); the decode-mode frame of the
last step is the final image (within 1 level: a batch-of-1 decode vs the batched one).
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusekit import GenerationParams, Pipeline
from diffusekit.media.compare import AXES, compare, display_tile, grid, plan, run, write_comparison
from diffusekit.media.grid import tile_positions
from diffusekit.media.process import image_records, process_frames, write_process_video
from diffusekit.media.video import read_video_info

_spec = importlib.util.spec_from_file_location("pipelines_conftest",
                                               Path(__file__).resolve().parents[1] / "pipelines" / "conftest.py")
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)                       # the shared tiny-checkpoint builder (save_tiny)

BASE = GenerationParams(prompt="a red circle", seed=3, width=32, height=32, steps=3, cfg_scale=5.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(_helpers.save_tiny(tmp_path_factory.mktemp("m") / "tiny.safetensors", "sd1"))


def arr(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------- plan
def test_plan_cells_and_labels_for_every_axes():
    cells, cols, rows, xt, yt = plan(BASE, "samplers-x-schedulers")
    assert (cols, rows, xt, yt) == (["Euler", "DPM++ 2M"], ["Normal", "Karras"], "sampler", "schedule")
    assert [(p.sampler_name, p.scheduler) for p in cells[1]] == [("Euler", "Karras"), ("DPM++ 2M", "Karras")]
    cells, cols, rows, *_ = plan(BASE, "samplers-x-steps", samplers=["euler_ancestral", "Heun"],
                                 schedulers=["karras"], steps_list=[5, 10])
    assert cols == ["Euler a", "Heun"] and rows == ["5 steps", "10 steps"]
    assert cells[1][0].steps == 10 and cells[1][0].scheduler == "karras"     # one value of a fixed axis applies
    cells, cols, rows, *_ = plan(BASE, "cfg-x-steps", cfg_list=[1.5, 7], steps_list=[4])
    assert cols == ["CFG 1.5", "CFG 7"] and rows == ["4 steps"] and cells[0][0].cfg_scale == 1.5
    cells, cols, rows, *_ = plan(BASE, "pairs", samplers=["Euler", "DPM++ 2M"], schedulers=["Normal", "Karras"])
    assert cols == ["Euler + Normal", "DPM++ 2M + Karras"] and len(cells) == 1 and rows == ["seed 3"]
    cells, cols, rows, xt, yt = plan(BASE, "models-x-steps", models=["shapes", "shapes-flow"], steps_list=[4, 8])
    assert (cols, rows, xt, yt) == (["shapes", "shapes-flow"], ["4 steps", "8 steps"], "model", "steps")
    assert cells[1][0] == cells[1][1] and cells[1][0].steps == 8      # the columns differ only in the model
    assert set(AXES) == {"samplers-x-schedulers", "samplers-x-steps", "cfg-x-steps", "pairs", "models-x-steps",
                         "models-x-samplers"}


def test_plan_uses_one_seed_everywhere_even_when_random():
    cells, *_ = plan(BASE.copy(seed=-1), "samplers-x-schedulers")
    seeds = {p.seed for row in cells for p in row}
    assert len(seeds) == 1 and seeds.pop() >= 0
    assert all(p.batch_size == 1 and p.n_iter == 1 for row in cells for p in row)


@pytest.mark.parametrize("kwargs, match", [
    (dict(axes="diagonal"), "diagonal"),
    (dict(axes="samplers-x-steps", samplers=["Euler", "bogus"]), "bogus"),
    (dict(axes="samplers-x-schedulers", schedulers=["Karras", "wobbly"]), "wobbly"),
    (dict(axes="cfg-x-steps", samplers=["Euler", "Heun"]), "--samplers has 2 values"),
    (dict(axes="pairs", samplers=["Euler", "Heun", "LMS"], schedulers=["Normal", "Karras"]), "zips"),
    (dict(axes="samplers-x-steps", steps_list=[0, 10]), "steps 0"),
    (dict(axes="cfg-x-steps", cfg_list=[float(i) for i in range(11)], steps_list=list(range(1, 11))), "110 cells"),
    (dict(axes="cfg-x-steps", cfg_list=[500.0]), "cfg_scale"),
])
def test_plan_errors_name_the_bad_value(kwargs, match):
    axes = kwargs.pop("axes")
    with pytest.raises(ValueError, match=match):
        plan(BASE, axes, **kwargs)


# ------------------------------------------------------------------------------------------- runs
def test_grid_cells_equal_single_runs_and_tiles_sit_where_the_grid_says(pipe, tmp_path):
    comp = compare(pipe, BASE, "samplers-x-schedulers", samplers=["Euler", "DPM++ 2M"], schedulers=["Normal", "Karras"])
    assert len(comp.images) == 2 and all(len(r) == 2 for r in comp.images)
    assert (comp.col_labels, comp.row_labels) == (["Euler", "DPM++ 2M"], ["Normal", "Karras"])
    single = pipe.generate(comp.params[1][1]).images[0]           # (tests/interfaces/test_cli.py checks [0][0])
    assert np.array_equal(arr(single), arr(comp.images[1][1]))
    assert (comp.params[1][1].sampler_name, comp.params[1][1].scheduler) == ("DPM++ 2M", "Karras")
    assert not np.array_equal(arr(comp.images[0][0]), arr(comp.images[1][1]))
    tile = display_tile(comp.images[0][0])
    assert tile.size == (256, 256)
    positions = tile_positions(comp.grid, 2, 2, tile.size)
    for (x, y), (r, c) in zip(positions, [(0, 0), (0, 1), (1, 0), (1, 1)]):
        crop = comp.grid.crop((x, y, x + 256, y + 256))
        assert np.array_equal(arr(crop), arr(display_tile(comp.images[r][c])))
    x0, y0 = positions[0]
    label_strip = arr(comp.grid.crop((x0, y0 - 20, x0 + 256, y0)))
    assert (label_strip < 100).any()                       # the column label is drawn above the first tile
    assert (arr(comp.grid.crop((0, y0, x0 - 4, y0 + 256))) < 100).any()   # and a row label left of it
    paths = write_comparison(comp, tmp_path / "grid")
    assert [p.name for p in paths] == ["grid.png"]
    assert Image.open(paths[0]).info["parameters"] == comp.infotexts[0][0]


def test_models_side_by_side_cells_equal_each_models_single_run(pipe, tmp_path_factory):
    other = Pipeline.from_pretrained(_helpers.save_tiny(tmp_path_factory.mktemp("m2") / "tiny2.safetensors", "sd1",
                                                        seed=7))
    comp = compare({"a": pipe, "b": other}, BASE, "models-x-steps", steps_list=[2, 3])
    assert comp.col_labels == ["a", "b"] and comp.row_labels == ["2 steps", "3 steps"]
    for c, p in enumerate((pipe, other)):
        assert np.array_equal(arr(comp.images[1][c]), arr(p.generate(comp.params[1][c]).images[0]))
    assert not np.array_equal(arr(comp.images[1][0]), arr(comp.images[1][1]))
    with pytest.raises(TypeError, match="mapping"):
        compare(pipe, BASE, "models-x-steps")
    with pytest.raises(ValueError, match="once"):
        plan(BASE, "models-x-steps", models=["a", "a"])


def test_video_frames_run_in_lock_step(pipe, tmp_path):
    comp = compare(pipe, BASE, "samplers-x-steps", samplers=["Euler"], steps_list=[2, 3], video=True)
    assert len(comp.frames) == 3 and len({f.size for f in comp.frames}) == 1
    frame_tile = process_frames(pipe, pipe.generate(comp.params[0][0].copy(save_process=True)))[0].size
    (x2, y2), (x3, y3) = tile_positions(comp.frames[0], 2, 1, frame_tile)
    short = [arr(f.crop((x2, y2, x2 + frame_tile[0], y2 + frame_tile[1]))) for f in comp.frames]
    long = [arr(f.crop((x3, y3, x3 + frame_tile[0], y3 + frame_tile[1]))) for f in comp.frames]
    assert np.array_equal(short[1], short[2])              # the 2-step run holds its last frame
    assert not np.array_equal(long[1], long[2])
    paths = write_comparison(comp, tmp_path / "cmp", fps=2)
    info = read_video_info(paths[1])
    assert info["frames"] == 3 and info["fps"] == 2


def test_process_frames_pick_the_right_image_and_decode_the_x0_estimate(pipe):
    r = pipe.generate(BASE.copy(steps=2, batch_size=2, n_iter=2, seed=20, save_process=True))
    assert len(r.images) == 4 and len(r.process) == 4        # 2 jobs x 2 steps, each record holds a batch of 2
    recs = image_records(r, 3)
    assert [x["job"] for x in recs] == [1, 1] and recs[0]["x"].shape[0] == 1
    assert recs[0]["x"].equal(r.process[2]["x"][1:2])
    frames = process_frames(pipe, r, 3, mode="decode")
    assert len(frames) == 2 and frames[0].width == 256
    last = arr(frames[-1].crop((0, 0, 256, 256)))[::8, ::8]  # 32 px shown at 8x (nearest)
    assert np.abs(last - arr(r.images[3])).max() <= 1      # the last x0 estimate is the image
    preview = process_frames(pipe, r, 3, mode="preview")
    assert len(preview) == 2 and preview[0].size == frames[0].size


def test_hires_video_numbers_each_pass(pipe, tmp_path):
    r = pipe.generate(BASE.copy(steps=2, enable_hr=True, hr_scale=2.0, denoising_strength=0.6, save_process=True))
    passes = [x["pass"] for x in r.process]
    assert passes[:2] == ["txt2img", "txt2img"] and set(passes[2:]) == {"hires"}
    frames = process_frames(pipe, r)
    assert len(frames) == len(r.process) and {f.width for f in frames} == {256}   # 64 px final image at 4x
    mp4, gif = write_process_video(pipe, r, tmp_path / "hires", fps=4)
    assert read_video_info(mp4)["frames"] == len(frames) and Image.open(gif).n_frames == len(frames)


def test_process_errors(pipe):
    r = pipe.generate(BASE.copy(steps=1))
    with pytest.raises(ValueError, match="save_process"):
        image_records(r)
    r = pipe.generate(BASE.copy(steps=1, save_process=True))
    with pytest.raises(ValueError, match="index 1"):
        image_records(r, 1)
    with pytest.raises(ValueError, match="mode 'vae'"):
        process_frames(pipe, r, mode="vae")
    with pytest.raises(ValueError, match="fps=0"):
        write_process_video(pipe, r, "unused", fps=0)


def test_grid_axes_beyond_the_named_comparisons():
    """`grid` is the X/Y plot the server asks for: seeds and CFG down, samplers across."""
    planned = grid(BASE, ("samplers", ["Euler", "DPM++ 2M Karras"]), ("seeds", [3, 9]))
    assert [[p.seed for p in row] for row in planned.cells] == [[3, 3], [9, 9]]
    assert planned.cols == ["Euler", "DPM++ 2M Karras"] and planned.rows == ["seed 3", "seed 9"]
    assert planned.y_title == "seed"
    planned = grid(BASE, ("samplers", ["Euler"]), ("cfg", [2, 7.5]))
    assert [row[0].cfg_scale for row in planned.cells] == [2.0, 7.5] and planned.rows == ["CFG 2", "CFG 7.5"]
    with pytest.raises(ValueError, match="valid: samplers"):
        grid(BASE, ("samplers", ["Euler"]), ("colour", [1]))


def test_run_stops_before_a_cell_and_greys_the_rest(pipe):
    planned = grid(BASE, ("samplers", ["Euler", "Heun"]), ("steps", [2, 3]))
    seen = []
    comp = run(pipe, planned, on_cell=lambda k, n, label: seen.append((k, n)),
               should_stop=lambda: len(seen) > 2)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)] and comp.done == 2 and comp.interrupted
    assert comp.infotexts[1] == [None, None] and comp.infotexts[0][0] is not None
    assert set(comp.images[1][0].getdata()) == {(128, 128, 128)}
