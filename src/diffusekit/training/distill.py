"""Latent Consistency Distillation: `diffusekit train CONFIG` with a `[distill]` table.

A few-step student of a trained eps / v text-to-image model (Luo et al. 2023, "Latent Consistency
Models", Algorithm 1; consistency distillation of Song et al. 2023, Algorithm 2), as `shapes-turbo`
is made from `shapes`. Per optimizer step, for a batch of data latents x0 and their captions c:

    n ~ U{1..N}, eps ~ N(0, I), x_n = x0 + sigma_n eps                      (t_n = 999 n / N)
    D_w  = D_T(x_n, sigma_n, "") + w (D_T(x_n, sigma_n, c) - D_T(x_n, sigma_n, ""))   teacher, CFG w
    x_{n-1} = D_w + (x_n - D_w) sigma_{n-1} / sigma_n                       one DDIM step of the ODE
    loss = d(f_theta(x_n, sigma_n, c), f_target(x_{n-1}, sigma_{n-1}, c))  d: pseudo-Huber or L2

f = c_skip x + c_out D is the consistency parameterisation (`core.consistency`): f(x, sigma_0) = x,
so at n = 1 the target is the teacher's step itself, and the consistency propagates up the grid.
f_target is an EMA (mu = `target_ema`) of the student, updated after every optimizer step; the
trainer's own EMA (`train.ema_decay`) of the student is what ships. The guidance scale is fixed
(the teacher's recommended CFG) rather than sampled with a w-embedding (LCM's optional w-condition):
the student then needs no new input and is sampled with CFG off (scale 1, one UNet call per step).
The student starts as a copy of the teacher's UNet; the text encoder and VAE stay the teacher's,
frozen. Why LCD and not adversarial diffusion distillation (ADD, SDXL Turbo): ADD trains a
discriminator on features of a pretrained image network beside a score-distillation loss, i.e. a
second network, a feature backbone this project does not have, and GAN tuning; LCD needs only the
teacher and converges in a few thousand steps, which fits a CPU hour.

Trajectory distillation (`method = "trajectory"`; Luhman & Luhman 2021, "Knowledge Distillation in
Iterative Generative Models for Improved Sampling Speed", extended to every grid point as the
consistency function asks): for each scene the teacher solves its guided ODE once, from seeded noise
at sigma_N down to sigma_0 (DDIM or DPM-Solver++(2M), `substeps` steps per grid interval), on the
scene's caption; the points x_N .. x_0 at the grid sigmas are kept on disk (`<out_dir>/trajectories`,
fp16, made once and reused on resume). The loss is then a plain regression, no target network:

    n ~ U{1..N},  loss = d(f_theta(x_n, sigma_n, c), x_0)                (x_n, x_0: one teacher trajectory)

so every grid point learns the end of *its* teacher trajectory directly instead of through the
bootstrapped chain of LCD, whose error grows with the chain length. The price is the up-front solves
(N * substeps guided teacher calls per scene, cheap for a small teacher); a 1-step student then
copies the teacher's own noise -> image map, the multi-step LCM sampler re-noises onto points the
grid trained.

The loop is `Trainer._optimize` (AdamW, warm-up + cosine, clipping, EMA, atomic checkpoints that also
hold the target network, resume after kill -9, the step-seeded randomness that makes a resumed run
equal an uninterrupted one); the data is `Trainer`'s (preloaded items, each VAE-encoded once).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core import samplers
from ..core.consistency import ConsistencyDenoiser, ddim_step, pseudo_huber, timestep_grid
from ..core.denoisers import Denoiser
from ..core.guidance import cfg as guided_denoiser
from ..models.loading import ModelParts, save_checkpoint
from ..pipelines.pipeline import Pipeline, UNetAdapter
from .checkpoint import load_training_checkpoint
from .config import TrainConfig, config_from_dict, config_to_dict
from .datasets import build_dataset
from .distributed import _init_world
from .trainer import Trainer, _unwrap, frozen_base

__all__ = ["Distiller", "ConsistencyStudent", "teacher_step", "export_student"]

STAGE = "distill"
TRAJECTORY_CHUNK = 256   # scenes per trajectory file (a kill loses at most one chunk's solves)
TEACHER_BATCH = 64       # scenes per guided teacher call while solving


class ConsistencyStudent(nn.Module):
    """forward(x, sigma, context) -> f_theta(x, sigma): the consistency function over `unet` (the only
    registered module, so checkpoints, optimizer and EMA hold the UNet's weights)."""

    def __init__(self, unet: nn.Module, base: type[Denoiser], schedule):
        super().__init__()
        self.unet = unet
        self.__dict__["f"] = ConsistencyDenoiser(base(UNetAdapter(unet), schedule))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.f(x, sigma, context=context)


@torch.no_grad()
def teacher_step(denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, context: torch.Tensor,
                 uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """x_{n-1} from x_n: the teacher's classifier-free-guided x0 estimate (cond and uncond in one batch,
    D_u + w (D_c - D_u)), then one DDIM step per row from sigma to sigma_next."""
    if guidance == 1.0:
        d = denoiser(x, sigma, context=context)
    else:
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context=torch.cat([context, uncond]))
        d_c, d_u = both.chunk(2)
        d = d_u + guidance * (d_c - d_u)
    return ddim_step(d, x, sigma, sigma_next)


def _denoiser_class(pipe: Pipeline) -> type[Denoiser]:
    fam = pipe.family
    if fam.prediction_type not in ("eps", "v") or fam.consistency or fam.pixel_space:
        raise ValueError(f"[distill] needs a latent eps or v teacher that is not itself a consistency model; "
                         f"{pipe.name!r} is a {fam.prediction_type!r} model"
                         + (" (already consistency-distilled)" if fam.consistency else "")
                         + (" in pixel space" if fam.pixel_space else ""))
    if len(fam.text_encoders) != 1 or fam.adm_inputs:
        raise ValueError(f"[distill] supports one-CLIP UNets without a `y` vector (SD 1.x / 2.x layouts); "
                         f"{pipe.name!r} has {len(fam.text_encoders)} text encoders and adm inputs {fam.adm_inputs}")
    return type(pipe.denoiser)


class Distiller(Trainer):
    """Trainer for a `[distill]` config. `run()` trains and writes `<out_dir>/<output_name>.safetensors`."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg, self.resume, self.dc = cfg, resume, cfg.distill
        self.world = _init_world()
        if self.world.size > 1:
            raise NotImplementedError("[distill] runs in one process (the target network is not synchronised)")
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        self.out = Path(cfg.run.out_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.on_step = None
        parts = frozen_base(self.dc.base)
        self.teacher = Pipeline(parts, device=self.device)
        self.parts, self.family = parts, replace(parts.family, consistency=True)
        base = _denoiser_class(self.teacher)
        self.schedule = self.teacher.schedule
        self.vae, self.text_encoder, self.tokenizer = parts.vae, parts.text_encoders[0], parts.tokenizers[0]
        self.latent_scale = parts.family.latent_scale
        self.model = ConsistencyStudent(self._student_unet(parts.unet).requires_grad_(True), base,
                                        self.schedule).to(self.device)
        self.target = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.dataset = build_dataset(cfg.data)
        if self.dc.method == "trajectory" and not cfg.data.preload:
            raise ValueError("distill.method='trajectory' needs data.preload = true (the captions of every scene "
                             "are solved up front)")
        self._cache, self._pool, self._pool_latents, self._uncond = {}, None, None, None
        self._traj = self._traj_ids = None
        grid = timestep_grid(len(self.schedule), self.dc.intervals)
        self.sigmas = self.schedule.t_to_sigma(grid).float()          # (N + 1,) ascending, sigma_0 = sigma_min
        self._claim_out_dir(STAGE)

    def _student_unet(self, teacher_unet: nn.Module) -> nn.Module:
        """The student's starting UNet: a copy of the teacher's, or `distill.student_from`'s (warm start)."""
        if not self.dc.student_from:
            return copy.deepcopy(teacher_unet)
        unet = frozen_base(self.dc.student_from).unet
        if getattr(unet, "config", None) != getattr(teacher_unet, "config", None):
            raise ValueError(f"distill.student_from={self.dc.student_from!r}: its UNet is not the teacher's "
                             f"architecture ({getattr(unet, 'config', type(unet).__name__)} vs "
                             f"{getattr(teacher_unet, 'config', type(teacher_unet).__name__)})")
        return unet

    # ------------------------------------------------------------------ pieces
    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, 77) token ids -> the frozen text encoder's context (B, 77, width), as the pipeline conditions."""
        spec = self.parts.family.text_encoders[0]
        with torch.no_grad():
            return self.text_encoder(ids, layer=spec.layer, final_norm=spec.final_norm, need_pooled=False).hidden

    @torch.no_grad()
    def update_target(self, student: nn.Module) -> None:
        """target <- mu target + (1 - mu) student (Song et al. 2023, Algorithm 2)."""
        mu = self.dc.target_ema
        t, s = self.target.state_dict(), _unwrap(student).state_dict()
        keys = [k for k in t if t[k].is_floating_point()]
        torch._foreach_lerp_([t[k] for k in keys], [s[k].detach() for k in keys], 1.0 - mu)

    def _uncond_context(self) -> torch.Tensor:
        if self._uncond is None:
            self._uncond = self.encode(self.tokenizer([""]).to(self.device))   # (1, 77, width)
        return self._uncond

    def _restore(self, extra: dict) -> None:
        if "target" in extra:
            self.target.load_state_dict(extra["target"])

    def consistency_pair(self, gen: torch.Generator, x0: torch.Tensor, ids: torch.Tensor, lo: int, hi: int, n: int,
                         student: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student f(x_n, sigma_n), target f^-(x_{n-1}, sigma_{n-1}), n) for global-batch rows lo..hi-1
        (x0, ids are those rows); the grid index n and the noise are drawn for all rows from `gen`."""
        k = torch.randint(1, self.dc.intervals + 1, (n,), generator=gen)[lo:hi]
        noise = torch.randn(n, *x0.shape[1:], generator=gen)[lo:hi].to(self.device)
        s_hi, s_lo = self.sigmas[k].to(self.device), self.sigmas[k - 1].to(self.device)
        x = x0 + s_hi.view(-1, 1, 1, 1) * noise
        context = self.encode(ids)
        with torch.no_grad():
            x_prev = teacher_step(self.teacher.denoiser, x, s_hi, s_lo, context, self._uncond_context().expand_as(context),
                                  self.dc.guidance)
            target = self.target(x_prev, s_lo, context)
        return student(x, s_hi, context), target, k

    # ------------------------------------------------------------------ trajectories
    def solve_trajectories(self, ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(B, N + 1, C, h, w): the teacher's guided ODE solved from `noise` * sigma_N on captions `ids`
        ((B, 77)), its points at the grid sigmas, index n <-> sigma_n (0: the end, N: the start)."""
        N, sub = self.dc.intervals, self.dc.substeps
        sig = self.schedule.t_to_sigma(timestep_grid(len(self.schedule), N * sub)).float().flip(0).to(self.device)
        context = self.encode(ids.to(self.device))
        den = guided_denoiser(self.teacher.denoiser, self.dc.guidance, {"context": context},
                              {"context": self._uncond_context().expand_as(context)})
        points = []

        def keep(info):
            if info["i"] % sub == 0:
                points.append(info["x"].float())

        with torch.no_grad():
            end = samplers.SAMPLERS[self.dc.solver](den, noise.to(self.device) * sig[0], sig, callback=keep)
        return torch.stack(points + [end.float()], 1).flip(1)

    def _trajectories(self) -> tuple[torch.Tensor, torch.Tensor]:
        """((L, N + 1, C, h, w) fp16 trajectory points, (L, 77) caption ids) for the L scenes of the data,
        solved chunk by chunk into `<out_dir>/trajectories` (each chunk's caption picks and noise seeded by
        run.seed and the chunk index, so a resumed run solves exactly what the first one would have)."""
        folder = self.out / "trajectories"
        folder.mkdir(parents=True, exist_ok=True)
        pool = self._pool[1]
        shape = self._encode(self._images([0])).shape[1:]
        xs, ids_out, t0, solved = [], [], time.time(), 0
        # what a chunk's solves depend on: a chunk made otherwise (an edited config) is solved again
        # (data.length aside: scene i does not depend on the scene count, so a longer run keeps these chunks)
        data = {k: v for k, v in config_to_dict(self.cfg)["data"].items() if k != "length"}
        made_by = json.dumps({"teacher": self.parts.name, "hash": self.parts.hash10, "seed": self.cfg.run.seed,
                              "data": data,
                              **{k: getattr(self.dc, k) for k in ("intervals", "solver", "substeps", "guidance")}},
                             sort_keys=True)
        for c, lo in enumerate(range(0, len(pool), TRAJECTORY_CHUNK)):
            hi = min(len(pool), lo + TRAJECTORY_CHUNK)
            path = folder / f"chunk-{c:05d}.safetensors"
            want = (hi - lo, self.dc.intervals + 1, *shape)
            got = _load_chunk(path, made_by)
            if got is None or tuple(got["x"].shape) != want:
                gen = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + c)
                ids = pool[lo:hi].cpu()
                if ids.dim() == 3:   # one of the k phrasings per scene
                    ids = ids[torch.arange(hi - lo), torch.randint(ids.shape[1], (hi - lo,), generator=gen)]
                noise = torch.randn(hi - lo, *shape, generator=gen)
                x = torch.cat([self.solve_trajectories(ids[b:b + TEACHER_BATCH], noise[b:b + TEACHER_BATCH]).cpu()
                               for b in range(0, hi - lo, TEACHER_BATCH)])
                got = {"x": x.half().contiguous(), "ids": ids.contiguous()}
                tmp = path.with_suffix(".tmp")
                save_file(got, str(tmp), metadata={"diffusekit.trajectories": made_by})
                tmp.replace(path)
                solved += hi - lo
                if self.world.main:
                    print(f"[distill] teacher trajectories {hi}/{len(pool)} ({time.time() - t0:.0f} s)", flush=True)
            xs.append(got["x"])
            ids_out.append(got["ids"])
        if self.world.main and solved:
            print(f"[distill] solved {solved} teacher trajectories in {time.time() - t0:.1f} s")
        return torch.cat(xs).to(self.device), torch.cat(ids_out).to(self.device)

    def trajectory_pair(self, gen: torch.Generator, indices: list[int], lo: int, hi: int, n: int,
                        student: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student f(x_n, sigma_n), the trajectory's end x_0, n) for global-batch rows lo..hi-1."""
        k = torch.randint(1, self.dc.intervals + 1, (n,), generator=gen)
        if self.dc.start_share > 0:   # rows moved to n = N: the input of a 1-step sample (pure noise)
            k = torch.where(torch.rand(n, generator=gen) < self.dc.start_share, self.dc.intervals, k)
        k = k[lo:hi].to(self.device)
        idx = torch.tensor(indices[lo:hi], device=self.device)
        traj = self._traj[idx]
        rows = torch.arange(hi - lo, device=self.device)
        x, x0 = traj[rows, k].float(), traj[:, 0].float()
        return student(x, self.sigmas.to(self.device)[k], self.encode(self._traj_ids[idx])), x0, k

    def _distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.dc.loss == "huber":
            return pseudo_huber(pred, target, self.dc.huber_c)
        return (pred.float() - target.float()).pow(2).mean()

    def loss(self, gen: torch.Generator, x0: torch.Tensor, ids: torch.Tensor, lo: int, hi: int, n: int,
             student: nn.Module) -> torch.Tensor:
        """The consistency-distillation loss d(f(x_n), f^-(x_{n-1})): pseudo-Huber or mean squared error."""
        pred, target, _ = self.consistency_pair(gen, x0, ids, lo, hi, n, student)
        return self._distance(pred, target)

    # ------------------------------------------------------------------ training
    def run(self) -> Path:
        ocfg = self.cfg.train
        if self.cfg.data.preload:
            self._preload()
        t0 = time.time()
        trajectory = self.dc.method == "trajectory"
        if trajectory:
            self._traj, self._traj_ids = self._trajectories()
        else:
            self._latents_and_ids([0])   # every item's latent, once, in fp32 (outside the autocast of the loop)
            if self.world.main and self.cfg.train.cache_latents:
                print(f"[distill] latents of the data in {time.time() - t0:.1f} s; teacher {self.teacher.name!r}")

        def micro_loss(gen, step, indices, lo, hi, mod):
            if trajectory:
                pred, target, _ = self.trajectory_pair(gen, indices, lo, hi, len(indices), mod)
                return self._distance(pred, target)
            x0, ids = self._latents_and_ids(indices[lo:hi])
            ids = self._pick_caption(ids, gen, len(indices), lo, hi)
            return self.loss(gen, x0, ids, lo, hi, len(indices), mod)

        ema = self._optimize(STAGE, self.model, ocfg, micro_loss, on_checkpoint=self._sample_grid,
                             extra_state=None if trajectory else lambda: {"target": self.target.state_dict()},
                             after_step=None if trajectory else self.update_target)
        if ema is not None:
            ema.copy_to(self.model)
        if self.world.main:
            path = self.export()
            (self.out / "DONE").write_text(f"finished\n{path}\n")
            print(f"[distill] wrote {path}")
        return self.out

    def student_parts(self, model: nn.Module | None = None) -> ModelParts:
        """ModelParts of the student (a copy of `model`'s UNet, default the live one) with the teacher's
        VAE, text encoder and tokenizer, family marked `consistency`."""
        unet = copy.deepcopy(_unwrap(model if model is not None else self.model).unet).eval()
        return ModelParts(unet=unet, vae=self.vae, text_encoders=[self.text_encoder], tokenizers=[self.tokenizer],
                          family=self.family, name="training")

    def pipeline(self, model: nn.Module | None = None) -> Pipeline:
        return Pipeline(self.student_parts(model), device=self.device)

    def export(self, path: str | Path | None = None, model: nn.Module | None = None) -> Path:
        """The student as a single-file fp16 checkpoint (family `consistency`, the teacher's VAE / text)."""
        path = Path(path or self.out / f"{self.dc.output_name}.safetensors")
        meta = {"diffusekit.distilled_from": self.parts.name, "diffusekit.distill": json.dumps(config_to_dict(self.cfg))}
        return save_checkpoint(self.student_parts(model), path, family=self.family, dtype=torch.float16, metadata=meta)


def _same_maker(tag: str | None, made_by: str) -> bool:
    """Whether a chunk tagged `tag` was solved by the settings `made_by` describes (tags written before
    data.length left them still match: the length is dropped from the stored tag)."""
    try:
        stored = json.loads(tag)
        stored.get("data", {}).pop("length", None)
    except (TypeError, ValueError, AttributeError):
        return False
    return json.dumps(stored, sort_keys=True) == made_by


def _load_chunk(path: Path, made_by: str) -> dict | None:
    """A trajectory chunk's tensors, or None when it is missing, unreadable or made by other settings."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if not _same_maker((f.metadata() or {}).get("diffusekit.trajectories"), made_by):
                return None
        return load_file(str(path))
    except Exception:   # a torn or foreign file: solve it again
        return None


def export_student(out_dir: str | Path, path: str | Path, *, ema: bool = True) -> Path:
    """Write the newest checkpoint of a distillation run as a model file: its EMA weights (`ema=True`,
    what `run()` exports at the end) or the online student's."""
    out = Path(out_dir)
    cfg = config_from_dict(json.loads((out / "config.json").read_text()), str(out / "config.json"))
    d = Distiller(cfg, resume=True)
    found = load_training_checkpoint(out, STAGE)
    if found is None:
        raise FileNotFoundError(f"{out} has no readable {STAGE} checkpoint")
    _, weights, state, _ = found
    d.model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
    if ema and state.get("ema"):
        from .ema import EMA
        e = EMA(d.model, state["ema"]["decay"])
        e.load_state_dict(state["ema"])
        e.copy_to(d.model)
    return d.export(path)
