"""Sampler comparisons: one prompt and one seed across samplers, schedules, step counts or CFG scales.

The X/Y plot of A1111's scripts, reduced to the comparisons people make about samplers:

    samplers-x-schedulers   X = samplers, Y = schedules        (every pair)
    samplers-x-steps        X = samplers, Y = step counts      (one schedule)
    cfg-x-steps             X = CFG scales, Y = step counts    (one sampler and schedule)
    pairs                   one row of sampler + schedule pairs, zipped ("Euler" with "Normal",
                            "DPM++ 2M" with "Karras": the notes' experiment)
    models-x-steps          X = models, Y = step counts        (e.g. shapes vs shapes-flow: does
                            rectified flow need fewer steps?)
    models-x-samplers       X = models, Y = samplers

Every cell is an ordinary single-image generation with the same prompt, seed and size (so a cell
equals `diffusekit generate` with its settings, bit for bit). With `video=True` every cell keeps its
steps and `Comparison.frames` holds the grid animated in lock-step: frame i shows step i of every
cell (a run with fewer steps holds its last frame), each tile captioned with its step and sigma.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

from PIL import Image

from ..core import samplers as sampler_registry
from ..core import sigmas as sigma_schedules
from ..pipelines.infotext import save_png_with_infotext
from ..pipelines.params import GenerationParams
from ..pipelines.pipeline import split_sampler_name
from .annotate import text_size
from .grid import xy_grid
from .process import process_frames
from .video import write_mp4

AXES = ("samplers-x-schedulers", "samplers-x-steps", "cfg-x-steps", "pairs", "models-x-steps", "models-x-samplers")
DEFAULTS = {"samplers": ("Euler", "DPM++ 2M"), "schedulers": ("Normal", "Karras"), "steps": (10, 20, 30),
            "cfg": (3.0, 5.0, 7.0), "models": ("shapes", "shapes-flow")}
MAX_CELLS = 100
GREY = (128, 128, 128)          # the tile of a cell that was not run (the comparison was interrupted)


class Plan(NamedTuple):
    """The cells of a comparison and their labels."""

    cells: list[list[GenerationParams]]     # [row][col]
    cols: list[str]
    rows: list[str]
    x_title: str
    y_title: str


@dataclass
class Comparison:
    """A finished comparison: the labelled grid, its cells, and (with video) the lock-step frames."""

    grid: Image.Image
    images: list[list[Image.Image]]                 # [row][col] final images (grey: not run, see `done`)
    params: list[list[GenerationParams]]            # [row][col] the settings of each cell
    infotexts: list[list[str | None]]               # None: the cell was not run
    col_labels: list[str]
    row_labels: list[str]
    x_title: str
    y_title: str
    frames: list[Image.Image] = field(default_factory=list)
    done: int = 0                                   # cells run (all of them unless interrupted)
    interrupted: bool = False


def sampler_label(name: str) -> str:
    """The A1111 display name of a sampler id or name (a legacy "DPM++ 2M Karras" keeps its schedule);
    raises ValueError naming the valid ones."""
    sid, schedule = split_sampler_name(str(name), "")
    label = sampler_registry.INFO[sid].label
    return f"{label} {schedule}" if schedule else label


def schedule_label(name: str) -> str:
    """The A1111 label of a schedule id or label ("karras" -> "Karras")."""
    return sigma_schedules.label(name)


def display_tile(image: Image.Image, min_side: int = 256) -> Image.Image:
    """A grid tile at least `min_side` pixels on its short side (nearest-neighbour, so pixels stay honest):
    the shipped models make small images whose labels would otherwise be wider than the tiles."""
    if min(image.size) >= min_side:
        return image
    k = -(-min_side // min(image.size))
    return image.resize((image.width * k, image.height * k), Image.NEAREST)


def label_font_size(labels: Sequence[str], tile_width: int) -> int:
    """The grid's usual font size (a ninth of the tile), shrunk until every column label fits its tile."""
    size = max(12, tile_width // 9)
    while size > 8 and max(text_size(t, size)[0] for t in labels) > tile_width - 8:
        size -= 1
    return size


def _fmt(v: float) -> str:
    return f"{v:g}"


def plan(base: GenerationParams, axes: str, *, samplers: Sequence[str] | None = None,
         schedulers: Sequence[str] | None = None, steps_list: Sequence[int] | None = None,
         cfg_list: Sequence[float] | None = None, models: Sequence[str] | None = None):
    """The cells of a comparison: a `Plan` ([row][col] params, col labels, row labels, x title, y title).

    Lists that `axes` varies default to DEFAULTS; a list that it does not vary may hold one value
    (which replaces the base setting) and no more. Names are checked here, before any model runs.
    On the models-x-* axes the columns differ only in the model: their labels are the model names.
    """
    if axes not in AXES:
        raise ValueError(f"axes={axes!r}; valid: {', '.join(AXES)}")
    varied = {"samplers-x-schedulers": ("samplers", "schedulers"), "samplers-x-steps": ("samplers", "steps"),
              "cfg-x-steps": ("cfg", "steps"), "pairs": ("samplers", "schedulers"),
              "models-x-steps": ("models", "steps"), "models-x-samplers": ("models", "samplers")}[axes]
    given = {"samplers": samplers, "schedulers": schedulers, "steps": steps_list, "cfg": cfg_list, "models": models}
    flag = {"samplers": "--samplers", "schedulers": "--schedulers", "steps": "--steps-list", "cfg": "--cfg-list",
            "models": "--models"}
    lists = {}
    for key, values in given.items():
        values = list(values) if values else []
        if key in varied:
            lists[key] = values or list(DEFAULTS[key])
        elif len(values) > 1:
            raise ValueError(f"{flag[key]} has {len(values)} values but axes {axes!r} varies only "
                             f"{' and '.join(varied)}: give one value or choose other axes ({', '.join(AXES)})")
        else:
            lists[key] = values
    for s in lists["samplers"]:
        sampler_label(s)
    for s in lists["schedulers"]:
        schedule_label(s)
    for n in lists["steps"]:
        if not isinstance(n, int) or not 1 <= n <= 1000:
            raise ValueError(f"steps {n!r}: every step count must be an integer from 1 to 1000")
    if len(set(lists["models"])) != len(lists["models"]):
        raise ValueError(f"--models {','.join(lists['models'])}: name each model once")
    fields = {"samplers": ("sampler_name", str), "schedulers": ("scheduler", str), "steps": ("steps", int),
              "cfg": ("cfg_scale", float)}
    fixed = {fields[k][0]: fields[k][1](v[0]) for k, v in lists.items() if k not in varied and k in fields and v}
    base = base.copy(batch_size=1, n_iter=1, seed=base.resolved_seed(), **fixed)

    if axes == "pairs":
        sm, sc = lists["samplers"], lists["schedulers"]
        sm, sc = sm * len(sc) if len(sm) == 1 else sm, sc * len(sm) if len(sc) == 1 else sc   # broadcast one
        if len(sm) != len(sc):
            raise ValueError(f"axes 'pairs' zips --samplers ({len(sm)} values) with --schedulers ({len(sc)}): "
                             "give the same number of each, or one of either")
        cells = [[base.copy(sampler_name=a, scheduler=b) for a, b in zip(sm, sc)]]
        cols = [f"{sampler_label(a)} + {schedule_label(b)}" for a, b in zip(sm, sc)]
        return _checked(Plan(cells, cols, [f"seed {base.seed}"], "sampler + schedule", ""))
    xs_key, ys_key = varied
    return grid(base, (xs_key, lists[xs_key]), (ys_key, lists[ys_key]))


# what each axis of `grid` sets, how its values are labelled, and the axis title
_AXIS = {
    "samplers": (lambda p, v: p.copy(sampler_name=str(v)), sampler_label, "sampler"),
    "schedulers": (lambda p, v: p.copy(scheduler=str(v)), schedule_label, "schedule"),
    "steps": (lambda p, v: p.copy(steps=int(v)), lambda v: f"{v} steps", "steps"),
    "cfg": (lambda p, v: p.copy(cfg_scale=float(v)), lambda v: f"CFG {_fmt(float(v))}", "CFG scale"),
    "seeds": (lambda p, v: p.copy(seed=int(v)), lambda v: f"seed {v}", "seed"),
    "models": (lambda p, v: p.copy(), str, "model"),       # the cell's model is the column's (see `run`)
}


def grid(base: GenerationParams, x: tuple[str, Sequence], y: tuple[str, Sequence]) -> Plan:
    """An X/Y plot: `x` = (axis, values) across, `y` = (axis, values) down; an axis is one of samplers,
    schedulers, steps, cfg, seeds. Every cell is `base` (one image, its seed resolved) with the two values
    set; names are checked here, before any model runs."""
    for key, values in (x, y):
        if key not in _AXIS:
            raise ValueError(f"axis {key!r}; valid: {', '.join(_AXIS)}")
        if not values:
            raise ValueError(f"axis {key!r} has no values")
    base = base.copy(batch_size=1, n_iter=1, seed=base.resolved_seed())
    (xk, xs), (yk, ys) = x, y
    cells = [[_AXIS[xk][0](_AXIS[yk][0](base, v), u) for u in xs] for v in ys]
    return _checked(Plan(cells, [_AXIS[xk][1](u) for u in xs], [_AXIS[yk][1](v) for v in ys], _AXIS[xk][2],
                         _AXIS[yk][2]))


def _checked(planned: Plan) -> Plan:
    count = sum(len(r) for r in planned.cells)
    if count > MAX_CELLS:
        raise ValueError(f"the comparison has {count} cells; at most {MAX_CELLS}: shorten the lists")
    for row in planned.cells:
        for p in row:
            p.validate()
    return planned


def compare(pipe, base: GenerationParams, axes: str = "samplers-x-schedulers", *,
            samplers: Sequence[str] | None = None, schedulers: Sequence[str] | None = None,
            steps_list: Sequence[int] | None = None, cfg_list: Sequence[float] | None = None,
            video: bool = False, process_mode: str = "auto",
            progress: Callable[[str], None] | None = None, callback=None) -> Comparison:
    """Run every cell of `plan(...)` on `pipe` and draw the labelled grid (and the lock-step frames).

    pipe: a Pipeline, or for the models-x-* axes a mapping {model name: Pipeline} (its keys, in order, are
    the columns). progress(label) is called after each cell; callback is passed to `generate`.
    """
    by_model = axes.startswith("models-")
    if by_model != isinstance(pipe, Mapping):
        raise TypeError(f"axes {axes!r} takes " + ("a mapping {model name: Pipeline}" if by_model else "one Pipeline"))
    planned = plan(base, axes, samplers=samplers, schedulers=schedulers, steps_list=steps_list, cfg_list=cfg_list,
                   models=list(pipe) if by_model else None)
    return run(pipe, planned, video=video, process_mode=process_mode, progress=progress, callback=callback)


def run(pipe, planned: Plan, *, video: bool = False, process_mode: str = "preview",
        progress: Callable[[str], None] | None = None, callback=None,
        on_cell: Callable[[int, int, str], None] | None = None,
        should_stop: Callable[[], bool] | None = None) -> Comparison:
    """Generate every cell of `planned` on `pipe` and draw the labelled grid (and, with video, the frames).
    `pipe` may be a mapping {column label: Pipeline} (the models-x-* axes): each column runs on its own.

    on_cell(k, total, label) is called before cell k (0-based, row by row), progress(label) after it;
    callback and should_stop are passed to `pipe.generate`. When should_stop() is true before a cell (after
    on_cell, so a per-cell "skip" can be cleared there) that cell and the rest are not run: grey tiles.
    """
    cells, cols, rows, x_title, y_title = planned
    pipes = pipe if isinstance(pipe, Mapping) else None
    total = sum(len(row) for row in cells)
    images = [[] for _ in cells]
    infotexts = [[] for _ in cells]
    cell_frames = [[] for _ in cells]
    done, stopped, k, size = 0, False, 0, None
    for r, row in enumerate(cells):
        for c, p in enumerate(row):
            label = f"{rows[r]} / {cols[c]}"
            pipe = pipes[cols[c]] if pipes is not None else pipe
            if on_cell is not None:
                on_cell(k, total, label)
            k += 1
            stopped = stopped or (should_stop is not None and should_stop())
            if stopped:
                w, h = size or (p.width or pipe.family.default_size, p.height or pipe.family.default_size)
                images[r].append(Image.new("RGB", (w, h), GREY))
                infotexts[r].append(None)
                continue
            result = pipe.generate(p.copy(save_process=video), callback=callback, should_stop=should_stop)
            images[r].append(result.images[0])
            infotexts[r].append(result.infotexts[0])
            size = result.images[0].size
            done += 1
            if video:
                cell_frames[r].append(process_frames(pipe, result, 0, process_mode))
            if progress is not None:
                progress(label)
    seed = cells[0][0].seed
    prompt = cells[0][0].prompt
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    title = f"{prompt!r}  seed {seed}"
    tiles = [[display_tile(im) for im in row] for row in images]
    grid_image = xy_grid(tiles, cols, rows, title=title, x_title=x_title, y_title=y_title or None,
                         font_size=label_font_size(cols, tiles[0][0].width))
    frames = []
    if video and done == total:
        n = max(len(f) for row in cell_frames for f in row)
        fs = label_font_size(cols, cell_frames[0][0][0].width)
        for i in range(n):
            tiles = [[f[min(i, len(f) - 1)] for f in row] for row in cell_frames]
            frames.append(xy_grid(tiles, cols, rows, title=title, x_title=x_title, y_title=y_title or None,
                                  font_size=fs))
    return Comparison(grid=grid_image, images=images, params=cells, infotexts=infotexts, col_labels=cols,
                      row_labels=rows, x_title=x_title, y_title=y_title, frames=frames, done=done,
                      interrupted=stopped)


def write_comparison(comp: Comparison, stem: str | os.PathLike, *, fps: float = 1.0) -> list[Path]:
    """`<stem>.png` (carrying the first cell's infotext, as A1111 grids do) and, with frames, `<stem>.mp4`."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [save_png_with_infotext(comp.grid, stem.with_name(stem.name + ".png"), comp.infotexts[0][0])]
    if comp.frames:
        written.append(write_mp4(comp.frames, stem.with_name(stem.name + ".mp4"), fps=fps))
    return written
