"""Typed training configuration, read from a TOML file (`diffusekit train CONFIG`).

A config has up to six tables; every key is optional and the defaults are the shipped `shapes`
recipe's conventions (see `configs/shapes.toml`):

    [run]    out_dir, seed, threads
    [data]   kind = "shapes" | "digits" | "folder", path (folder), size, length, seed, style (shapes:
             "robust" | "legacy"), pair_share (shapes: share of two-object scenes), caption_dropout,
             preload, workers, captions_per_item (shapes + preload: phrasings per scene)
    [model]  prediction = "eps" | "v" | "x0" | "flow", schedule = "scaled_linear" | "linear",
             beta_start, beta_end, timesteps; sub-tables [model.unet] (`UNetConfig` fields),
             [model.vae] (`VAEConfig` fields; absent = a pixel-space model) and [model.text]
             (`CLIPTextConfig` fields). A flow model may be an SD3-style transformer instead:
             [model.mmdit] (`MMDiTConfig` fields), with shift (its sampling time shift),
             vae_from / text_from (a shipped model whose VAE / text encoder is reused, frozen) and
             context_tokens (joint text tokens, the first N of the 77); init_from (a shipped name or a
             checkpoint file whose UNet, text encoder and VAE weights the run starts from, instead of a
             random init: a warm start; init_sha256 pins that file's contents)
    [vae]    the autoencoder stage, run before the diffusion stage when [model.vae] is given
    [train]  the diffusion stage
    [decoder] optional last stage: fine-tune the VAE decoder with the encoder frozen (as Stability's
             sd-vae-ft-mse), so the latents and the trained UNet stay valid while images sharpen
    [log]    sample prompts and cadence
    [finetune] optional: fine-tune a loaded checkpoint (LoRA, full, textual inversion) instead of
             training [model] from scratch; see `finetune_config.py`
    [distill] optional: Latent Consistency Distillation of a loaded eps / v checkpoint into a 1-4 step
             model (`distill.py`, `DistillConfig`); [train] is its optimisation

Overrides are dotted keys, e.g. {"train.steps": 10, "model.unet.model_channels": 32}.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .finetune_config import FinetuneConfig

DATASETS = ("shapes", "digits", "folder")
PREDICTIONS = ("eps", "v", "x0", "flow")
PRECISIONS = ("fp32", "bf16")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    threads: int = 0            # torch.set_num_threads; 0 leaves torch's default


@dataclass
class DataConfig:
    kind: str = "shapes"
    path: str = ""              # image folder (kind="folder")
    size: int = 64
    length: int = 10_000        # items per epoch (shapes: any index is valid; others: min(length, real size))
    seed: int = 0
    style: str = "robust"       # shapes: "robust" (8 backgrounds, many phrasings) or "legacy" (the first release's data)
    caption_dropout: float = 0.1   # empty caption this often, for classifier-free guidance (Ho & Salimans 2022)
    preload: bool = False       # draw all `length` items up front (in `workers` processes) and keep them, as
                                # uint8 images and token ids, on the training device: for a GPU, which the
                                # per-step drawing on the CPU would otherwise starve
    workers: int = 0            # processes for preloading; 0 = one per CPU core
    pair_share: float | None = None   # shapes: chance of a two-object scene (None: one in three)
    captions_per_item: int = 1  # shapes + preload: k phrasings of each scene drawn up front; every step picks
                                # one per row (step generator), so a cached latent trains with k wordings


@dataclass
class ModelConfig:
    prediction: str = "eps"
    schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    timesteps: int = 1000
    unet: dict = field(default_factory=dict)
    vae: dict | None = None
    text: dict = field(default_factory=dict)
    mmdit: dict | None = None   # an MMDiT (SD3) instead of the UNet; prediction must be "flow"
    shift: float = 1.0          # flow models: the time shift their sampling schedule uses (SD3: 3.0)
    vae_from: str = ""          # a shipped model name: use its VAE (frozen, no [vae] stage) and latent scale
    text_from: str = ""         # a shipped model name: use its text encoder and tokenizer, frozen
    context_tokens: int = 0     # MMDiT: joint text tokens (the first N of 77; causal CLIP makes them exact); 0 = 77
    init_from: str = ""         # warm start: a shipped name or checkpoint file with the same architecture whose
                                # UNet, text encoder and VAE weights (and latent scale) the run starts from
    init_sha256: str = ""       # if set, init_from's file must have this sha256 (the exact weights a recipe used)


@dataclass
class OptimConfig:
    """One optimisation stage. `batch_size` is the global batch of one optimizer step; each of
    `world_size` processes runs `grad_accum` micro-batches of batch_size / (world_size * grad_accum)."""
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8           # AdamW epsilon
    grad_clip: float = 1.0      # 0 = off
    ema_decay: float = 0.999    # 0 = no EMA
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    distributed: str = "ddp"    # under torchrun: "ddp" (replicas) | "fsdp" (parameters, grads, AdamW state sharded)
    checkpoint_every: int = 500    # steps
    checkpoint_minutes: float = 0  # also checkpoint when this much wall time passed (0 = off)
    keep_checkpoints: int = 3
    # diffusion stage only
    min_snr_gamma: float = 0.0  # 0 = plain MSE
    offset_noise: float = 0.0
    cache_latents: bool = True  # keep each item's VAE latent (posterior mode) after its first encode
    timestep_sampling: str = "uniform"   # flow: "uniform" | "logit_normal" (Esser et al. 2024, Sec. 3.1)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # VAE stage only
    kl_weight: float = 1e-6
    recon: str = "l1"           # "l1" | "l2"


@dataclass
class LogConfig:
    every: int = 10             # loss CSV rows (averaged over this many steps)
    sample_every: int = 0       # steps between sample grids; 0 = at every checkpoint
    prompts: list = field(default_factory=lambda: ["a red circle on a white background"])
    sample_seeds: list = field(default_factory=lambda: [1, 2])
    sample_steps: int = 20
    sample_cfg: float = 5.0
    sample_sampler: str = "DPM++ 2M"
    sample_scheduler: str = "Karras"
    progress: bool = True


SOLVERS = ("ddim", "dpmpp_2m")
DISTILL_LOSSES = ("huber", "l2")
DISTILL_METHODS = ("consistency", "trajectory")


@dataclass
class DistillConfig:
    """`[distill]`: few-step distillation of `base` (see `distill.py`): Latent Consistency Distillation
    (Luo et al. 2023, `method = "consistency"`) or regression onto the ends of whole teacher ODE
    trajectories (Luhman & Luhman 2021, at every grid point: `method = "trajectory"`)."""
    base: str = "shapes"        # the teacher: a shipped name, a single file or a diffusers folder (eps / v, one CLIP)
    method: str = "consistency"  # "consistency" (LCD: one teacher step + target network) | "trajectory"
    intervals: int = 24         # N: the teacher's ODE is cut at t_n = 999 n / N (LCM: 50, i.e. skip 20)
    solver: str = "ddim"        # the teacher's ODE step from t_n to t_(n-1) ("consistency": ddim only;
                                # "trajectory": ddim or dpmpp_2m over the whole grid)
    substeps: int = 1           # "trajectory": teacher solver steps per grid interval (N * substeps in all)
    start_share: float = 0.0    # "trajectory": the share of each batch trained at n = N (pure noise, the input
                                # of a 1-step sample); the rest (and 0.0: all) draws n uniformly from 1..N
    guidance: float = 5.0       # fixed CFG scale of the teacher step (project convention: 1 = off), baked in
    target_ema: float = 0.95    # mu of the target network (an EMA of the student; LCM: 0.95)
    loss: str = "huber"         # "huber" (pseudo-Huber, LCM) | "l2"
    huber_c: float = 0.001
    output_name: str = "model"  # the exported file: <run.out_dir>/<output_name>.safetensors (fp16, EMA weights)
    student_from: str = ""      # warm start: the UNet of this model (a file, folder or shipped name; an earlier
                                # student of the same architecture) starts the student; "" = the teacher's UNet

    def validate(self) -> None:
        if self.intervals < 1:
            raise ValueError(f"distill.intervals={self.intervals}: must be >= 1 (LCM: 50)")
        if self.method not in DISTILL_METHODS:
            raise ValueError(f"distill.method={self.method!r}; valid: {', '.join(DISTILL_METHODS)}")
        solvers = SOLVERS if self.method == "trajectory" else ("ddim",)
        if self.solver not in solvers:
            raise ValueError(f"distill.solver={self.solver!r}; valid with method={self.method!r}: {', '.join(solvers)}")
        if self.substeps < 1:
            raise ValueError(f"distill.substeps={self.substeps}: must be >= 1 (teacher steps per grid interval)")
        if not 0.0 <= self.start_share <= 1.0:
            raise ValueError(f"distill.start_share={self.start_share}: must be in [0, 1] (the share of each batch "
                             "at n = N)")
        if self.start_share and self.method != "trajectory":
            raise ValueError(f"distill.start_share={self.start_share} needs method = 'trajectory' (got "
                             f"{self.method!r})")
        if self.loss not in DISTILL_LOSSES:
            raise ValueError(f"distill.loss={self.loss!r}; valid: {', '.join(DISTILL_LOSSES)}")
        if not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"distill.target_ema={self.target_ema}: must be in [0, 1) (0 = the student itself)")
        if self.loss == "huber" and self.huber_c <= 0:
            raise ValueError(f"distill.huber_c={self.huber_c}: must be > 0")
        if self.guidance < 1.0:
            raise ValueError(f"distill.guidance={self.guidance}: must be >= 1 (1 = no guidance)")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: OptimConfig | None = None
    train: OptimConfig = field(default_factory=OptimConfig)
    decoder: OptimConfig | None = None
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig | None = None   # [finetune]: train on a loaded checkpoint (finetune_config.py)
    distill: DistillConfig | None = None     # [distill]: consistency-distil a loaded checkpoint (distill.py)
    source: str = ""            # the file it came from

    def validate(self) -> None:
        if self.data.kind not in DATASETS:
            raise ValueError(f"data.kind={self.data.kind!r}; valid: {', '.join(DATASETS)}")
        if self.model.prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction={self.model.prediction!r}; valid: {', '.join(PREDICTIONS)}")
        for name, stage in (("vae", self.vae), ("train", self.train), ("decoder", self.decoder)):
            if stage is None:
                continue
            if stage.precision not in PRECISIONS:
                raise ValueError(f"{name}.precision={stage.precision!r}; valid: {', '.join(PRECISIONS)}")
            if stage.distributed not in DISTRIBUTED:
                raise ValueError(f"{name}.distributed={stage.distributed!r}; valid: {', '.join(DISTRIBUTED)} "
                                 "(how torchrun's processes share the model)")
            if stage.distributed == "fsdp" and stage.ema_decay > 0:
                raise ValueError(f"{name}.distributed='fsdp' with {name}.ema_decay={stage.ema_decay}: EMA of "
                                 "sharded weights is not implemented; set ema_decay = 0 or distributed = 'ddp'")
            if stage.recon not in ("l1", "l2"):
                raise ValueError(f"{name}.recon={stage.recon!r}; valid: 'l1', 'l2'")
            if stage.steps < 0 or stage.batch_size < 1 or stage.grad_accum < 1:
                raise ValueError(f"{name}: steps >= 0, batch_size >= 1 and grad_accum >= 1 needed; got "
                                 f"{stage.steps}, {stage.batch_size}, {stage.grad_accum}")
        if self.finetune is not None:
            if self.vae is not None or self.decoder is not None:
                raise ValueError("[finetune] trains a loaded checkpoint; drop [vae] and [decoder]")
            self.finetune.validate(self.data.kind)
            if self.train.distributed == "fsdp" and self.finetune.method != "full":
                raise ValueError(f"train.distributed='fsdp' shards a full fine-tune; finetune.method="
                                 f"{self.finetune.method!r} trains a few MB: use distributed = 'ddp'")
        if self.distill is not None:
            if self.finetune is not None or self.vae is not None or self.decoder is not None:
                raise ValueError("[distill] trains a student of a loaded checkpoint; drop [finetune], [vae] and [decoder]")
            self.distill.validate()
        m = self.model
        if m.mmdit is not None and m.prediction != "flow":
            raise ValueError(f"[model.mmdit] is a rectified-flow transformer: model.prediction must be 'flow', "
                             f"got {m.prediction!r}")
        if m.vae_from and (m.vae is not None or self.vae is not None):
            raise ValueError("model.vae_from reuses a shipped VAE: drop [model.vae] and [vae]")
        if self.train.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"train.timestep_sampling={self.train.timestep_sampling!r}; valid: 'uniform', 'logit_normal'")
        if self.train.timestep_sampling != "uniform" and m.prediction != "flow":
            raise ValueError("train.timestep_sampling applies to flow models (model.prediction = 'flow')")
        if self.vae is not None and self.model.vae is None:
            raise ValueError("a [vae] stage needs [model.vae] (the autoencoder's shape)")
        if m.init_from and self.vae is not None:
            raise ValueError("model.init_from brings a trained VAE: drop the [vae] stage (fine-tune its decoder "
                             "with [decoder] instead)")
        if m.init_from and (m.vae_from or m.text_from or m.mmdit is not None):
            raise ValueError("model.init_from warm-starts a whole UNet model; it does not combine with "
                             "vae_from, text_from or [model.mmdit]")
        if m.init_sha256 and not m.init_from:
            raise ValueError("model.init_sha256 pins the file of model.init_from, which is not set")
        if self.decoder is not None and self.vae is None and not m.init_from:
            raise ValueError("a [decoder] stage fine-tunes a VAE trained by the [vae] stage (or brought by "
                             "model.init_from); add [vae] and [model.vae], or model.init_from")
        if self.data.style not in ("robust", "legacy"):
            raise ValueError(f"data.style={self.data.style!r}; valid: 'robust', 'legacy'")
        if self.data.pair_share is not None and not 0 <= self.data.pair_share <= 1:
            raise ValueError(f"data.pair_share={self.data.pair_share}; must be in [0, 1] (unset: one scene in three)")
        if self.data.workers < 0:
            raise ValueError(f"data.workers={self.data.workers}; must be >= 0 (0 = one per CPU core)")
        k = self.data.captions_per_item
        if k < 1 or (k > 1 and (self.data.kind != "shapes" or not self.data.preload)):
            raise ValueError(f"data.captions_per_item={k}: 1, or more with data.kind = 'shapes' and "
                             "data.preload = true (the procedural scenes can be phrased many ways)")
        if not 0 <= self.data.caption_dropout < 1:
            raise ValueError(f"data.caption_dropout={self.data.caption_dropout}; must be in [0, 1)")


def _build(cls, data: Mapping[str, Any], where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{where}]; valid: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        if k == "betas":
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a table")
    node[parts[-1]] = value


def config_from_dict(tree: Mapping[str, Any], source: str = "") -> TrainConfig:
    tables = {"run", "data", "model", "vae", "train", "decoder", "log", "finetune", "distill"}
    unknown = sorted(set(tree) - tables)
    if unknown:
        raise ValueError(f"unknown table(s) {unknown} in {source or 'the config'}; valid: {sorted(tables)}")
    cfg = TrainConfig(
        run=_build(RunConfig, tree.get("run", {}), "run"),
        data=_build(DataConfig, tree.get("data", {}), "data"),
        model=_build(ModelConfig, tree.get("model", {}), "model"),
        vae=_build(OptimConfig, tree["vae"], "vae") if "vae" in tree else None,
        train=_build(OptimConfig, tree.get("train", {}), "train"),
        decoder=_build(OptimConfig, tree["decoder"], "decoder") if "decoder" in tree else None,
        log=_build(LogConfig, tree.get("log", {}), "log"),
        finetune=_build(FinetuneConfig, tree["finetune"], "finetune") if "finetune" in tree else None,
        distill=_build(DistillConfig, tree["distill"], "distill") if "distill" in tree else None,
        source=source,
    )
    cfg.validate()
    return cfg


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a TOML training config; `overrides` maps dotted keys to values (applied after reading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training config at {path} (see configs/shapes.toml for an example)")
    with open(path, "rb") as f:
        tree = tomllib.load(f)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    return config_from_dict(tree, str(path))


def config_to_dict(cfg: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "source" and v is not None}
