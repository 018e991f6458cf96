"""What the worker thread runs: model loading and switching, a txt2img/img2img job, the sampler
comparison grid, and the frames of the denoising video. Everything here runs inside `Worker` tasks, so
the model is only ever touched by one thread."""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ...version import __version__
from ...core import samplers as sampler_registry
from ...core import sigmas as sigma_schedules
from ...media.compare import Plan
from ...pipelines.params import GenerationParams
from ...pipelines.pipeline import Pipeline, split_sampler_name
from .checkpoints import ModelEntry, ModelStore
from .errors import ModelUnavailable, redact
from .jobs import JobContext
from .loras import LoraCatalog
from .schemas import Limits, RequestError, check_memory, memory_budget_bytes, validate_params



def sampler_labels(sampler_name: str, scheduler: str, *, sampler_field: str = "sampler_name",
                   scheduler_field: str = "scheduler") -> tuple[str, str]:
    """(A1111 sampler label, schedule label) for possibly legacy/canonical names; RequestError if unknown."""
    try:
        sid, sched = split_sampler_name(str(sampler_name), str(scheduler))
    except ValueError as e:
        raise RequestError(f"{sampler_field}: {e}", field=sampler_field) from None
    try:
        schedule_id = sigma_schedules.resolve(sched)
    except ValueError as e:
        raise RequestError(f"{scheduler_field}: {e}", field=scheduler_field) from None
    return sampler_registry.INFO[sid].label, sigma_schedules.LABELS.get(schedule_id, schedule_id)


@dataclass
class Outcome:
    """A finished (or interrupted) generation job."""

    images: list[Image.Image]
    info: dict[str, Any]


@dataclass
class VideoSource:
    """Per-step previews of the last image of the last job that asked for save_process."""

    job_id: int
    seed: int
    infotext: str
    x_frames: list[Image.Image]
    denoised_frames: list[Image.Image]
    sigmas: list[float]
    final: Image.Image
    rendered: dict[str, bytes] = field(default_factory=dict)


class Service:
    """The model the server generates with, and the jobs it runs on it."""

    def __init__(self, store: ModelStore, model: str | None, *, limits: Limits, device: str | None = None,
                 dtype=None, loras: LoraCatalog | None = None, embeddings_dir=None):
        import torch
        self.store = store
        self.loras = loras                      # every pipeline built here reads <lora:...> files from its folder
        self.embeddings_dir = embeddings_dir    # and textual-inversion embeddings from this one
        self.limits = limits
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.memory_budget = memory_budget_bytes(limits, self.device)   # bytes a request may need (estimated)
        self.dtype = dtype
        self.clip_skip = 1
        self.selected: ModelEntry | None = None
        if model is not None:
            self.selected = self._entry_for_operator(model)
        self._pipe: Pipeline | None = None
        self._pipe_entry: ModelEntry | None = None
        self._jobs = 0
        self.last_video: VideoSource | None = None

    def _entry_for_operator(self, model: str) -> ModelEntry:
        """The operator (command line) may name a listed model, a shipped one or any path."""
        try:
            return self.store.find(model, field="model")
        except RequestError:
            from ...pipelines.shipped import resolve_model
            return self.store.add_extra(resolve_model(model))

    # ------------------------------------------------------------------ models (worker thread only)
    @property
    def loaded(self) -> Pipeline | None:
        """The pipeline in memory now (read-only glance for other threads)."""
        return self._pipe

    def pipeline(self, entry: ModelEntry | None = None) -> Pipeline:
        entry = entry or self.selected
        if entry is None:
            raise RequestError("no model is selected: start the server with a model, or POST /sdapi/v1/options "
                               "{\"sd_model_checkpoint\": ...}", status=409)
        if self._pipe is None or self._pipe_entry != entry:
            self._pipe = None                       # free the old weights before loading the new ones
            try:
                self._pipe = Pipeline.from_pretrained(entry.path, device=self.device, dtype=self.dtype,
                                                      lora_dir=self.loras.folder if self.loras else None,
                                                      embeddings_dir=self.embeddings_dir)
            except Exception as e:                  # a broken file on the server: not the client's fault
                reason = redact(str(e).replace(str(entry.path), entry.name), self.folders())
                raise ModelUnavailable(f"the model {entry.name!r} cannot be loaded ({type(e).__name__}: "
                                       f"{reason}); select another with POST /sdapi/v1/options") from e
            self._pipe_entry = entry
            self.store.remember_hash(entry, list(self._pipe.parts.files))
        return self._pipe

    def folders(self) -> dict:
        """The server's folders by option name (error messages name these, never the paths)."""
        return {"models_dir": self.store.models_dir, "lora_dir": self.loras.folder if self.loras else None,
                "embeddings_dir": self.embeddings_dir}

    def embeddings_listing(self, refresh: bool = False) -> dict:
        """GET /sdapi/v1/embeddings of the model in memory (nothing before one is loaded); refresh=True
        rescans the folder first (worker thread only: it changes the pipeline's text conditioning)."""
        pipe = self._pipe
        lib = pipe.embeddings if pipe is not None else None
        if lib is None:
            return {"loaded": {}, "skipped": {}}
        if refresh:
            pipe.refresh_embeddings()

        def row(ti):
            return {"step": ti.step, "sd_checkpoint": ti.sd_checkpoint, "sd_checkpoint_name": ti.sd_checkpoint_name,
                    "shape": ti.shape, "vectors": ti.count}
        return {"loaded": {n: row(t) for n, t in lib.loaded.items()},
                "skipped": {n: row(t) for n, (t, _) in lib.skipped.items()}}

    def select(self, ctx: JobContext, entry: ModelEntry) -> dict:
        """POST /options sd_model_checkpoint: load it now, so errors surface in the request that asked."""
        ctx.start_batch(0, f"loading {entry.name}")
        self.pipeline(entry)
        self.selected = entry
        return {"sd_model_checkpoint": self.store.title(entry)}

    # ------------------------------------------------------------------ txt2img / img2img
    def generate(self, ctx: JobContext, p: GenerationParams, *, model: ModelEntry | None, restore: bool,
                 unsupported: list[str]) -> Outcome:
        """Run a job batch by batch (`Pipeline.iter_batches`), so /skip drops one batch and /interrupt the rest."""
        pipe = self.pipeline(model or self.selected)
        if model is not None and not restore:
            self.selected = model
        p = p.copy(width=p.width or pipe.family.default_size, height=p.height or pipe.family.default_size)
        validate_params(p, self.limits)           # again, now that the model's native size is known
        check_memory(p, pipe, self.memory_budget)  # and the memory the request needs on it
        self._jobs += 1
        t0 = time.perf_counter()
        images, seeds, subseeds, infotexts, skipped = [], [], [], [], []
        interrupted, last = False, None
        ctx.set_job_count(p.n_iter)
        batches = pipe.iter_batches(p, callback=lambda info: ctx.on_step(info, job_no=info.job_no),
                                    should_stop=ctx.should_stop)
        with closing(batches):
            for j in range(p.n_iter):
                if ctx.interrupted:
                    interrupted = True
                    break
                ctx.start_batch(j)
                last = next(batches)
                images += last.images
                seeds += last.seeds
                subseeds += last.subseeds
                infotexts += last.infotexts
                if last.interrupted:
                    if ctx.interrupted:
                        interrupted = True
                        break
                    skipped.append(j)
        if p.save_process and last is not None and last.process:
            self._keep_video(pipe, last)
        sampler_label, schedule_label = sampler_labels(p.sampler_name, p.scheduler)
        n = len(images)
        facts = last.info if last is not None else {"seed": p.seed, "subseed": p.subseed, "hashes": {}}
        info = {
            "prompt": p.prompt, "all_prompts": [p.prompt] * n, "negative_prompt": p.negative_prompt,
            "all_negative_prompts": [p.negative_prompt] * n, "seed": facts["seed"], "all_seeds": seeds,
            "subseed": facts["subseed"], "all_subseeds": subseeds, "subseed_strength": p.subseed_strength,
            "width": p.width, "height": p.height, "sampler_name": sampler_label, "scheduler": schedule_label,
            "cfg_scale": p.cfg_scale, "steps": p.steps, "batch_size": p.batch_size, "n_iter": p.n_iter,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": pipe.name,
            "sd_model_hash": pipe.parts.hash10, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": p.denoising_strength if (p.is_img2img or p.enable_hr) else None,
            "extra_generation_params": dict(facts["hashes"]),   # A1111 reports the LoRA / TI hashes here too
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": p.clip_skip,
            "is_using_inpainting_conditioning": bool(pipe.family.is_inpaint and p.mask is not None),
            "version": f"diffusekit {__version__}", "interrupted": interrupted, "skipped_batches": skipped,
            "unsupported_fields": unsupported, "seconds": round(time.perf_counter() - t0, 4),
            "video_available": bool(p.save_process and self.last_video is not None
                                    and self.last_video.job_id == self._jobs),
        }
        return Outcome(images, info)

    def _keep_video(self, pipe: Pipeline, r) -> None:
        """Previews (cheap latent->RGB map, no VAE) of every step of the job's last image."""
        i = len(r.images) - 1
        recs = [rec for rec in r.process if rec["x"].shape[0] > i]
        self.last_video = VideoSource(
            job_id=self._jobs, seed=r.seeds[i], infotext=r.infotexts[i],
            x_frames=[pipe.preview(rec["x"][i:i + 1])[0] for rec in recs],
            denoised_frames=[pipe.preview(rec["denoised"][i:i + 1])[0] for rec in recs],
            sigmas=[float(rec["sigma"]) for rec in recs], final=r.images[i].copy())

    # ------------------------------------------------------------------ compare samplers
    def compare(self, ctx: JobContext, planned: Plan) -> tuple[Image.Image, dict]:
        """Render the cells of `planned` (`media.compare.run`): same prompt and seed, grey tiles once
        interrupted, /skip drops the current cell."""
        from ...media.compare import run
        pipe = self.pipeline()
        for row in planned.cells:                 # the largest cell decides; sizes resolved as `run` resolves them
            for p in row:
                size = p.width or pipe.family.default_size, p.height or pipe.family.default_size
                check_memory(p.copy(width=size[0], height=size[1]), pipe, self.memory_budget)
        total = sum(len(row) for row in planned.cells)
        ctx.set_job_count(total)
        comp = run(pipe, planned, callback=ctx.on_step,
                   on_cell=lambda k, n, label: ctx.start_batch(k, f"cell {k + 1}/{n}"), should_stop=ctx.should_stop)
        done = [im for row, texts in zip(comp.images, comp.infotexts) for im, t in zip(row, texts) if t is not None]
        info = {"seed": planned.cells[0][0].seed, "cells": total, "cells_done": comp.done,
                "interrupted": bool(ctx.interrupted), "infotexts": [t for row in comp.infotexts for t in row],
                "tile_size": list(done[0].size) if done else None, "sd_model_name": pipe.name}
        return comp.grid, info
