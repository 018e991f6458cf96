"""The trainer behind `diffusekit train CONFIG`: an autoencoder stage, then the diffusion stage.

The diffusion stage is the notes' loop (Ho et al. 2020, Algorithm 1) grown up: take a batch of
images (their VAE latents for a latent model, Rombach et al. 2022), draw a step t and noise,
form the network input and target of the chosen parameterization (`core.objectives`), regress
with (optionally min-SNR-weighted) MSE. The text encoder is trained jointly with the UNet;
captions are dropped 10% of the time so one network learns the conditional and the
unconditional model that classifier-free guidance combines (Ho & Salimans 2022).

Reproducibility contract (what makes `resume` and multi-process training exact):
- the data order is a pure function of (data seed, epoch): `DataOrder`;
- every random draw of step s (timesteps, noise, caption dropout, posterior noise) is made for the
  whole global batch from a generator seeded by (run seed, stage, s), and each process takes its
  slice, so the result does not depend on the number of processes or on where a run was resumed;
- weights, optimizer, EMA, RNG state and the step are checkpointed together.
Under `torchrun --nproc_per_node N` the trainable module is wrapped in DistributedDataParallel
(gloo on CPU, nccl on GPU), or with `distributed = "fsdp"` a copy of it is sharded by FSDP2
(`distributed._fully_sharded`); each process sees 1/N of every global batch; rank 0 writes files, which are the
same for 1 process, DDP and FSDP (full state dicts), so each resumes the others.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..core.objectives import TrainingTarget, min_snr_weights, offset_noise, weighted_mse
from ..core.schedules import DiscreteSchedule, betas
from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.families import SD_PREFIX_CLIP, BetaSchedule, ModelFamily, TextEncoderSpec
from ..models.mmdit import MMDiT, MMDiTConfig
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNetConfig, UNetModel
from ..models.vae import AutoencoderKL, VAEConfig
from .checkpoint import list_checkpoints, load_training_checkpoint, save_training_checkpoint
from .config import OptimConfig, TrainConfig, config_to_dict, load_config
from .datasets import build_dataset, preload, to_tensor_array
from .distributed import _fully_sharded, _gather_into, _init_world, _named_optimizer_state
from .ema import EMA
from .logs import LossLog, Progress

__all__ = ["train_from_config", "Trainer", "DataOrder", "lr_at", "build_models", "model_family",
           "TextToImage", "JointTextToImage", "export_model"]


STAGES = ("vae", "diffusion", "decoder")


# ---------------------------------------------------------------------------------- pieces
def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of every random draw of one optimizer step (same on every process)."""
    h = hashlib.sha256(f"{seed}:{stage}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


class DataOrder:
    """Global sample order: epoch e visits dataset indices `randperm(n)` seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"the dataset is empty (n={n})")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        """Dataset indices at global positions start .. start + count - 1 (across epochs)."""
        return [self._permutation(p // self.n)[p % self.n] for p in range(start, start + count)]


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr * min_lr_ratio at `steps`."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def frozen_base(name_or_path, family: str | None = None):
    """The ModelParts of a checkpoint to train on (fine-tuning, distillation), fp32, every module frozen;
    a shipped model keeps its name (infotext, metadata)."""
    from ..models.loading import load_checkpoint
    from ..pipelines.shipped import SHIPPED, resolve_model
    parts = load_checkpoint(resolve_model(name_or_path), family=family, dtype=torch.float32)
    if name_or_path in SHIPPED:
        parts.name = name_or_path
    for m in (parts.unet, parts.vae, *parts.text_encoders):
        if m is not None:
            m.requires_grad_(False)
    return parts


def _shipped_parts(name: str):
    """The ModelParts of a shipped model (its VAE / text encoder reused by vae_from / text_from), fp32."""
    from ..models.loading import load_checkpoint
    from ..pipelines.shipped import resolve_model
    return load_checkpoint(resolve_model(name), dtype=torch.float32)


def build_configs(cfg: TrainConfig) -> tuple[UNetConfig | MMDiTConfig, VAEConfig | None, CLIPTextConfig]:
    """The three architecture configs of a training config (UNet / MMDiT channels follow the VAE, the
    context width the text encoder; vae_from / text_from take theirs from the shipped model)."""
    m = cfg.model
    tcfg = (_shipped_family(m.text_from).text_encoders[0].config if m.text_from
            else CLIPTextConfig(**_tuples(cfg.model.text)))
    vcfg = (_shipped_family(m.vae_from).vae if m.vae_from
            else VAEConfig(**_tuples(cfg.model.vae)) if cfg.model.vae is not None else None)
    channels = vcfg.embed_dim if vcfg is not None else 3
    if m.mmdit is not None:
        pooled = tcfg.projection_dim or tcfg.width
        d = {"in_channels": channels, "out_channels": channels, "context_dim": tcfg.width,
             "adm_in_channels": pooled, **_tuples(m.mmdit)}
        return MMDiTConfig(**d), vcfg, tcfg
    u = {"in_channels": channels, "out_channels": channels, "context_dim": tcfg.width, **_tuples(cfg.model.unet)}
    return UNetConfig(**u), vcfg, tcfg


class TextToImage(nn.Module):
    """The jointly trained pair: CLIP text encoder -> context -> cross-attention UNet."""

    def __init__(self, unet: UNetModel, text_encoder: CLIPTextModel):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        context = self.text_encoder(ids, need_pooled=False).hidden   # (B, 77, width), last layer + final norm
        return self.unet(x, t, context)


class JointTextToImage(nn.Module):
    """SD3's conditioning in miniature (Esser et al. 2024, Sec. 4): text encoder -> its first
    `context_tokens` hidden states are the MMDiT's joint context tokens and its pooled EOS state is the
    vector y that joins the timestep embedding. The text encoder is frozen unless `train_text`."""

    def __init__(self, mmdit: MMDiT, text_encoder: CLIPTextModel, context_tokens: int = 0, train_text: bool = False):
        super().__init__()
        self.mmdit, self.text_encoder = mmdit, text_encoder
        self.context_tokens, self.train_text = int(context_tokens), train_text
        if not train_text:
            text_encoder.requires_grad_(False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            out = self.text_encoder(ids, need_pooled=True)          # hidden (B, 77, width), pooled (B, width)
        n = self.context_tokens or out.hidden.shape[1]
        return self.mmdit(x, t, out.hidden[:, :n], out.pooled)

    @property
    def unet(self) -> MMDiT:
        """The family's denoising-network slot (`ModelFamily.unet`, `ModelParts.unet`): the MMDiT."""
        return self.mmdit


class VAEObjective(nn.Module):
    """Reconstruction and KL of the KL autoencoder (Rombach et al. 2022, Sec. 3; Kingma & Welling
    2014): decode(mean + std * noise) with the posterior noise passed in (drawn per step)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, img: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = self.vae.encode(img)
        z = post.mean + post.std * noise
        return self.vae.decode(z), post.kl()     # (B, 3, H, W), (B,)


class DecoderObjective(nn.Module):
    """Decoder fine-tuning: reconstruct from the frozen encoder's posterior mean (the latents the
    diffusion model was trained on), so the latent space does not move."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.vae.encode(img).mode()
        return self.vae.decode(z)


def build_models(cfg: TrainConfig) -> tuple[TextToImage | JointTextToImage, AutoencoderKL | None]:
    """The diffusion model (text encoder included) and the VAE, freshly initialised, or the shipped
    model's VAE / text encoder where vae_from / text_from name one."""
    m = cfg.model
    ucfg, vcfg, tcfg = build_configs(cfg)
    torch.manual_seed(cfg.run.seed)
    vae = AutoencoderKL(vcfg) if vcfg is not None and not m.vae_from else None
    g = torch.Generator().manual_seed(cfg.run.seed + 1)
    text = CLIPTextModel(tcfg, generator=g) if not m.text_from else None
    shipped = {name: _shipped_parts(name) for name in {m.vae_from, m.text_from} - {""}}
    if m.vae_from:
        vae = shipped[m.vae_from].vae.eval().requires_grad_(False)
    if m.text_from:
        text = shipped[m.text_from].text_encoders[0]
    if isinstance(ucfg, MMDiTConfig):
        return JointTextToImage(MMDiT(ucfg), text, m.context_tokens, train_text=not m.text_from), vae
    model = TextToImage(UNetModel(ucfg), text)
    if m.init_from:
        _warm_start(cfg, model, vae)
    return model, vae


def _init_file(cfg: TrainConfig) -> Path:
    """model.init_from as a file, its sha256 checked against model.init_sha256 when that is given."""
    from ..pipelines.shipped import resolve_model
    path = resolve_model(cfg.model.init_from)
    want = cfg.model.init_sha256.lower()
    if want and path.is_file():
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != want:
            raise ValueError(f"model.init_from={cfg.model.init_from!r} ({path}) has sha256 {got}, but "
                             f"model.init_sha256 asks for {want}: these are not the weights the recipe starts from")
    return path


def _warm_start(cfg: TrainConfig, model: TextToImage, vae: AutoencoderKL | None) -> None:
    """Copy model.init_from's UNet, text encoder and VAE weights into the freshly built modules. The
    config's architecture must be the checkpoint's (every field is compared, so a mismatch names itself)."""
    from ..models.loading import load_checkpoint
    parts = load_checkpoint(_init_file(cfg), dtype=torch.float32)
    fam = parts.family
    ucfg, vcfg, tcfg = build_configs(cfg)
    theirs = {"unet": fam.unet, "vae": fam.vae, "text": fam.text_encoders[0].config}
    for name, ours in (("unet", ucfg), ("vae", vcfg), ("text", tcfg)):
        if ours != theirs[name]:
            a, b = (asdict(x) if x is not None else {} for x in (ours, theirs[name]))
            diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            raise ValueError(f"model.init_from={cfg.model.init_from!r}: [model.{name}] differs from the checkpoint's "
                             f"(field: (config, checkpoint)) {diff}")
    if fam.prediction_type != cfg.model.prediction:
        raise ValueError(f"model.init_from={cfg.model.init_from!r} is a {fam.prediction_type!r} model; "
                         f"model.prediction={cfg.model.prediction!r}")
    model.unet.load_state_dict(parts.unet.state_dict())
    model.text_encoder.load_state_dict(parts.text_encoders[0].state_dict())
    if vae is not None:
        vae.load_state_dict(parts.vae.state_dict())


def init_latent_scale(cfg: TrainConfig) -> float:
    """The latent scale of model.init_from (the latent space its UNet was trained in)."""
    from ..models.loading import read_family
    return read_family(_init_file(cfg)).latent_scale


def _shipped_family(name: str) -> ModelFamily:
    from ..models.loading import read_family
    from ..pipelines.shipped import resolve_model
    return read_family(resolve_model(name))


def model_family(cfg: TrainConfig, latent_scale: float = 1.0) -> ModelFamily:
    """The "custom" ModelFamily that the exported checkpoint carries in its metadata; vae=None (a
    pixel-space family, latent scale 1) for a config without [model.vae]."""
    ucfg, vcfg, tcfg = build_configs(cfg)
    if isinstance(ucfg, MMDiTConfig):   # SD3 in miniature: the pooled text joins the timestep embedding
        spec = TextEncoderSpec("clip", tcfg, SD_PREFIX_CLIP, pooled=True, context_tokens=cfg.model.context_tokens)
        return ModelFamily("custom", ucfg, vcfg, (spec,), prediction_type="flow", latent_scale=latent_scale,
                           default_size=cfg.data.size, flow_shift=cfg.model.shift)
    if cfg.model.prediction not in ("eps", "v"):
        raise ValueError(f"only eps and v UNet models and flow MMDiT models can be exported as a generation "
                         f"checkpoint; this run is a {cfg.model.prediction!r} UNet")
    spec = TextEncoderSpec("clip", tcfg, SD_PREFIX_CLIP)
    return ModelFamily("custom", ucfg, vcfg, (spec,), prediction_type=cfg.model.prediction,
                       latent_scale=latent_scale if vcfg is not None else 1.0,
                       default_size=cfg.data.size,
                       beta_schedule=BetaSchedule(cfg.model.schedule, cfg.model.beta_start, cfg.model.beta_end,
                                                  cfg.model.timesteps))


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    """Runs the stages of one config in `cfg.run.out_dir`. `run()` trains; `resume=True` continues
    from the newest readable checkpoint as if never stopped."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg, self.resume = cfg, resume
        self.world = _init_world()
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        self.out = Path(cfg.run.out_dir)
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        self.dataset = build_dataset(cfg.data)
        self.tokenizer = CLIPTokenizer.from_bpe_gz()
        self.model, self.vae = build_models(cfg)
        self.model.to(self.device)
        if self.vae is not None:
            self.vae.to(self.device)
        if self.device.type == "cuda":   # TF32 tensor cores for fp32 matmuls and convolutions
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.latent_scale = 1.0
        self.on_step: Callable[[str, int], None] | None = None   # called after every optimizer step (tests, tools)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None   # preloaded (uint8 NCHW, ids) on device
        self._pool_latents: torch.Tensor | None = None
        if cfg.data.preload:
            self._preload()
        self._claim_out_dir("vae", "diffusion")

    def _claim_out_dir(self, *stages: str) -> None:
        """Refuse an out_dir that holds checkpoints of `stages` unless resuming; write config.json (rank 0)."""
        if not self.world.main:
            return
        if not self.resume and any(list_checkpoints(self.out, st) for st in stages):
            raise FileExistsError(f"{self.out} already holds checkpoints: pass resume=True (--resume) to "
                                  "continue that run, or choose another run.out_dir")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))

    # ------------------------------------------------------------------ data
    def _preload(self) -> None:
        """Draw every item of the dataset up front and keep it on the device (`data.preload`)."""
        t0 = time.time()
        k = self.cfg.data.captions_per_item
        pixels, captions = preload(self.dataset, self.cfg.data.workers, captions_per_item=k)
        ids = (self.tokenizer(captions) if k == 1   # (N, 77), or (N, k, 77) with k phrasings per item
               else self.tokenizer([c for cs in captions for c in cs]).view(len(captions), k, -1))
        self._pool = (torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(self.device), ids.to(self.device))
        if self.world.main:
            print(f"[data] preloaded {len(captions)} items in {time.time() - t0:.1f} s")

    def _images(self, indices: list[int]) -> torch.Tensor:
        if self._pool is not None:   # to_tensor_array's mapping, equal to within float32 rounding
            idx = torch.tensor(indices, device=self.device)
            return self._pool[0][idx].float() / 127.5 - 1.0
        arrs = [to_tensor_array(self.dataset[i]["image"]) for i in indices]
        return torch.from_numpy(np.stack(arrs)).to(self.device)

    def _encode(self, img: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return img
        with torch.no_grad():
            return self.vae.encode(img).mode().float() * self.latent_scale

    def _latents_and_ids(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) scaled latents (or pixels) and (B, 77) token ids, cached per item if asked;
        (B, k, 77) with `data.captions_per_item` = k > 1 (`_pick_caption` chooses)."""
        use_cache = self.cfg.train.cache_latents
        if self._pool is not None:
            idx = torch.tensor(indices, device=self.device)
            if not use_cache:
                return self._encode(self._images(indices)), self._pool[1][idx]
            if self._pool_latents is None:   # every item's latent, once (kept in the run folder for resumes)
                self._pool_latents = self._cached_pool_latents()
            return self._pool_latents[idx], self._pool[1][idx]
        todo = [i for i in indices if i not in self._cache] if use_cache else list(indices)
        if todo:
            items = [self.dataset[i] for i in todo]
            img = torch.from_numpy(np.stack([to_tensor_array(it["image"]) for it in items])).to(self.device)
            x = self._encode(img)
            ids = self.tokenizer([it["caption"] for it in items])
            fresh = {i: (x[k].cpu(), ids[k]) for k, i in enumerate(todo)}
            if use_cache:
                self._cache.update(fresh)
        else:
            fresh = {}
        src = self._cache if use_cache else fresh
        return (torch.stack([src[i][0] for i in indices]).to(self.device),
                torch.stack([src[i][1] for i in indices]).to(self.device))

    def _cached_pool_latents(self) -> torch.Tensor:
        """The preloaded items' latents: read from `out_dir/latent-cache.pt` when it was written for this
        data config, this VAE (a digest of its weights) and this latent scale, else encoded and written
        there, so a `--resume` does not spend minutes re-encoding the data."""
        n = len(self._pool[1])
        key = None
        if self.vae is not None:
            h = hashlib.sha256(json.dumps(asdict(self.cfg.data), sort_keys=True).encode())
            h.update(f"{self.latent_scale!r}".encode())
            for name, t in sorted(self.vae.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            key = h.hexdigest()
            path = self.out / "latent-cache.pt"
            if path.exists():
                try:
                    saved = torch.load(path, map_location=self.device, weights_only=True)
                    if saved.get("key") == key and len(saved["latents"]) == n:
                        return saved["latents"]
                except Exception:   # an unreadable cache (a kill mid-write) is re-made, never trusted
                    pass
        lat = torch.cat([self._encode(self._images(list(range(lo, min(n, lo + 512))))) for lo in range(0, n, 512)])
        if key is not None and self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / "latent-cache.pt.tmp"
            torch.save({"key": key, "latents": lat.cpu()}, tmp)
            os.replace(tmp, path)
        return lat

    def _pick_caption(self, ids: torch.Tensor, gen: torch.Generator, n: int, lo: int, hi: int) -> torch.Tensor:
        """(B, 77) ids: with k phrasings per item, one per row of the global batch (n rows) drawn from the
        step generator, then this micro-batch's rows lo..hi-1; with one, `ids` itself (no draw)."""
        if ids.dim() == 2:
            return ids
        pick = torch.randint(ids.shape[1], (n,), generator=gen)[lo:hi].to(ids.device)
        return ids[torch.arange(hi - lo, device=ids.device), pick]

    # ------------------------------------------------------------------ the generic loop
    def _optimize(self, stage: str, module: nn.Module, ocfg: OptimConfig,
                  micro_loss: Callable[..., torch.Tensor],
                  on_checkpoint: Callable[[int, nn.Module], None] | None = None,
                  extra_state: Callable[[], dict] | None = None,
                  after_step: Callable[[nn.Module], None] | None = None) -> EMA | None:
        """AdamW + warm-up/cosine + clipping + accumulation + EMA + checkpoints for `module`.

        micro_loss(gen, step, global_indices, lo, hi, module): loss of global-batch rows lo..hi-1
        (this process's micro-batch), random draws made for the whole global batch from `gen`.
        after_step(module): called after every optimizer step, before the checkpoint (a consistency
        target network's EMA update); what it keeps belongs in `extra_state` for resume."""
        w, B = self.world, ocfg.batch_size
        per_micro, rem = divmod(B, w.size * ocfg.grad_accum)
        if rem or per_micro == 0:
            raise ValueError(f"{stage}.batch_size={B} must be a positive multiple of processes x grad_accum "
                             f"= {w.size} x {ocfg.grad_accum}")
        start, elapsed, found = 0, 0.0, None
        log = LossLog(self.out / "loss.csv", enabled=w.main)
        if self.resume:
            found = load_training_checkpoint(self.out, stage)
            if found is not None:
                start, weights, state, folder = found
                module.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
        fsdp = w.size > 1 and ocfg.distributed == "fsdp"
        # FSDP: the step runs on a sharded copy (parameters, gradients and AdamW state 1/N per process);
        # `module` stays whole and is refreshed from the shards at each checkpoint, which it writes
        train_mod = (_fully_sharded(copy.deepcopy(module)) if fsdp
                     else nn.parallel.DistributedDataParallel(module) if w.size > 1 else module)
        trained = train_mod if fsdp else module
        groups = ([], []), ([], [])              # (names, params) with and without weight decay
        for n, p in trained.named_parameters():
            g = groups[1] if p.ndim < 2 or "embedding" in n else groups[0]
            g[0].append(n)
            g[1].append(p)
        opt = torch.optim.AdamW([{"params": groups[0][1], "weight_decay": ocfg.weight_decay},
                                 {"params": groups[1][1], "weight_decay": 0.0}], lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps)
        names = groups[0][0] + groups[1][0]      # the optimizer's parameter order (its state-dict indices)
        ema = EMA(module, ocfg.ema_decay) if ocfg.ema_decay > 0 else None
        if found is not None:
            if fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(train_mod, opt, _named_optimizer_state(state["optimizer"], names),
                                         options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            torch.set_rng_state(state["torch_rng"])
            elapsed = float(state["wall_s"])
            self._restore(state.get("extra", {}))
            log.truncate(stage, start)
            if w.main:
                print(f"[{stage}] resumed from {folder} at step {start}")
        if start >= ocfg.steps:
            return ema
        order = self.data_order(B)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if ocfg.precision == "bf16"
                    else nullcontext())
        params = [p for p in trained.parameters() if p.requires_grad]
        progress = Progress(stage, start, ocfg.steps, enabled=w.main and self.cfg.log.progress)
        last_ckpt_time, t0 = time.time(), time.time() - elapsed
        last_plot = [time.time()]
        train_mod.train()

        def checkpoint(step: int) -> None:
            optim_state = opt.state_dict() if not fsdp else _gather_into(module, train_mod, opt, names)
            if w.main:
                weights = {f"model.{k}": v for k, v in module.state_dict().items()}
                state = {"step": step, "optimizer": optim_state, "ema": ema.state_dict() if ema else {},
                         "torch_rng": torch.get_rng_state(), "wall_s": time.time() - t0,
                         "samples_seen": step * B, "extra": extra_state() if extra_state else {}}
                save_training_checkpoint(self.out, stage, step, weights, state, keep=ocfg.keep_checkpoints)
                if step == ocfg.steps or time.time() - last_plot[0] > 120:   # matplotlib is slow to start
                    log.plot()
                    last_plot[0] = time.time()
                if on_checkpoint is not None:
                    on_checkpoint(step, module if ema is None else _with_ema(module, ema))
            if w.size > 1:
                dist.barrier()

        for step in range(start, ocfg.steps):
            lr = lr_at(step, ocfg)
            for group in opt.param_groups:
                group["lr"] = lr
            indices = order.indices(step * B, B)
            total = 0.0
            for k in range(ocfg.grad_accum):
                # a fresh generator per micro-batch: each call draws the same global-batch randomness
                gen = step_generator(self.cfg.run.seed, stage, step)
                lo = (k * w.size + w.rank) * per_micro
                sync = k == ocfg.grad_accum - 1 or w.size == 1
                with (nullcontext() if sync or fsdp else train_mod.no_sync()), autocast:
                    loss = micro_loss(gen, step, indices, lo, lo + per_micro, train_mod) / ocfg.grad_accum
                loss.backward()
                total += float(loss.detach())
            if w.size > 1:   # the logged loss is the global-batch mean
                t = torch.tensor([total], device=self.device)
                dist.all_reduce(t)
                total = float(t) / w.size
            gnorm = torch.nn.utils.clip_grad_norm_(params, ocfg.grad_clip if ocfg.grad_clip > 0 else float("inf"))
            if fsdp:   # the norm over every shard (a replicated DTensor)
                gnorm = gnorm.full_tensor()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(module)
            if after_step is not None:
                after_step(module)
            done = step + 1
            log.add(stage, done, total, lr, float(gnorm), every=self.cfg.log.every, wall=time.time() - t0)
            progress.update(B, total)
            due = done % ocfg.checkpoint_every == 0 or done == ocfg.steps or (
                ocfg.checkpoint_minutes > 0 and time.time() - last_ckpt_time > 60 * ocfg.checkpoint_minutes)
            if w.size > 1:   # every process must agree to enter the barrier
                flag = torch.tensor([int(due)], device=self.device)
                dist.broadcast(flag, 0)
                due = bool(flag)
            if due:
                checkpoint(done)
                last_ckpt_time = time.time()
            if self.on_step is not None:
                self.on_step(stage, done)
        progress.close()
        return ema

    def data_order(self, batch_size: int):
        """The global sample order: `order.indices(step * batch_size, batch_size)` is step's batch."""
        return DataOrder(len(self.dataset), self.cfg.data.seed)

    def _restore(self, extra: dict) -> None:
        if "latent_scale" in extra:
            self.latent_scale = float(extra["latent_scale"])

    # ------------------------------------------------------------------ stages
    def train_vae(self) -> None:
        ocfg, vae = self.cfg.vae, self.vae
        objective = VAEObjective(vae)
        vcfg = vae.config
        f = vcfg.downsample_factor
        size = self.cfg.data.size

        def micro_loss(gen, step, indices, lo, hi, mod):
            # (B, embed_dim, H/f, W/f) posterior noise for the whole global batch, then our slice
            noise = torch.randn(len(indices), vcfg.embed_dim, size // f, size // f, generator=gen)[lo:hi]
            img = self._images(indices[lo:hi])
            rec, kl = mod(img, noise.to(self.device))
            err = (rec.float() - img).abs() if ocfg.recon == "l1" else (rec.float() - img) ** 2
            return err.mean() + ocfg.kl_weight * kl.float().mean() / (3 * size * size)

        ema = self._optimize("vae", objective, ocfg, micro_loss, on_checkpoint=self._vae_grid)
        if ema is not None:
            ema.copy_to(objective)
        vae.eval().requires_grad_(False)

    def _measure_latent_scale(self, n: int = 256) -> float:
        """1 / std of the VAE latents (posterior mean) of the first n training items (SD: 0.18215)."""
        z, n = [], min(n, len(self.dataset))
        with torch.no_grad():
            for lo in range(0, n, 32):
                z.append(self.vae.encode(self._images(list(range(lo, min(n, lo + 32))))).mode().float())
        return float(1.0 / torch.cat(z).std())

    def train_diffusion(self) -> None:
        ocfg, mcfg = self.cfg.train, self.cfg.model
        if self.vae is not None:
            self.vae.eval().requires_grad_(False)
            found = load_training_checkpoint(self.out, "diffusion") if self.resume else None
            if found:
                self.latent_scale = float(found[2]["extra"]["latent_scale"])
            elif mcfg.vae_from:   # the latent space the shipped model's diffusion was trained in
                self.latent_scale = _shipped_family(mcfg.vae_from).latent_scale
            elif mcfg.init_from:  # a warm start keeps the latent space its UNet knows
                self.latent_scale = init_latent_scale(self.cfg)
            else:
                self.latent_scale = self._measure_latent_scale()
            if self.world.main:
                print(f"[diffusion] latent scale 1/std = {self.latent_scale:.5f}")
        if ocfg.gradient_checkpointing:
            if not isinstance(self.model, TextToImage):
                raise ValueError("train.gradient_checkpointing is implemented for the UNet only")
            self.model.unet.set_gradient_checkpointing(True)
        flow = mcfg.prediction == "flow"
        schedule = None if flow else DiscreteSchedule.from_betas(
            betas(mcfg.schedule, mcfg.timesteps, beta_start=mcfg.beta_start, beta_end=mcfg.beta_end))
        target = TrainingTarget(mcfg.prediction, schedule)
        empty = self.tokenizer([""])[0]
        drop_p = self.cfg.data.caption_dropout

        def micro_loss(gen, step, indices, lo, hi, mod):
            x0, ids = self._latents_and_ids(indices[lo:hi])
            n = len(indices)
            # every draw for the global batch (n rows) from the step generator, then our rows
            t_all = target.sample(n, generator=gen, sampling=ocfg.timestep_sampling, loc=ocfg.logit_mean,
                                  scale=ocfg.logit_std)
            noise = torch.randn(n, *x0.shape[1:], generator=gen)
            if ocfg.offset_noise > 0:
                noise = offset_noise(noise, ocfg.offset_noise, generator=gen)
            drop = torch.rand(n, generator=gen) < drop_p
            ids = self._pick_caption(ids, gen, n, lo, hi)
            t, noise, drop = t_all[lo:hi], noise[lo:hi].to(self.device), drop[lo:hi]
            ids = torch.where(drop[:, None].to(self.device), empty.to(self.device), ids)
            pair = target(x0, noise, sigma=t) if flow else target(x0, noise, t)
            pred = mod(pair.model_input, pair.timestep, ids)
            weights = None
            if ocfg.min_snr_gamma > 0 and not flow:
                weights = min_snr_weights(target.snr(t), ocfg.min_snr_gamma, mcfg.prediction).float()
            return weighted_mse(pred, pair.target, weights)

        self._optimize("diffusion", self.model, ocfg, micro_loss, on_checkpoint=self._sample_grid,
                       extra_state=lambda: {"latent_scale": self.latent_scale})

    def train_decoder(self) -> None:
        ocfg, vae, size = self.cfg.decoder, self.vae, self.cfg.data.size
        vae.train()
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
        for m in (vae.decoder, vae.post_quant_conv):
            if m is not None:
                m.requires_grad_(True)
        objective = DecoderObjective(vae)

        def micro_loss(gen, step, indices, lo, hi, mod):
            img = self._images(indices[lo:hi])
            rec = mod(img).float()
            return (rec - img).abs().mean() if ocfg.recon == "l1" else ((rec - img) ** 2).mean()

        ema = self._optimize("decoder", objective, ocfg, micro_loss,
                             on_checkpoint=lambda step, m: self._vae_grid(step, m, "decoder"))
        if ema is not None:
            ema.copy_to(objective)
        vae.eval().requires_grad_(False)

    def run(self, stages: tuple[str, ...] = STAGES) -> Path:
        """Train the configured stages among `stages` in order: vae, diffusion, decoder. A stage that
        is left out but needed later (the VAE) is loaded from its newest checkpoint."""
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
        if self.cfg.vae is not None:
            if "vae" in stages:
                self.train_vae()
            else:
                self._load_stage_weights("vae", VAEObjective(self.vae))
        elif self.vae is not None and not (self.cfg.model.vae_from or self.cfg.model.init_from):
            raise ValueError("[model.vae] is given but there is no [vae] stage to train it (nor model.init_from "
                             "to bring one)")
        if "diffusion" in stages:
            self.train_diffusion()
        if self.cfg.decoder is not None and "decoder" in stages:
            self.train_decoder()
        if self.world.main and tuple(stages) == STAGES:
            (self.out / "DONE").write_text("finished\n")
        return self.out

    def _load_stage_weights(self, stage: str, module: nn.Module) -> None:
        found = load_training_checkpoint(self.out, stage)
        if found is None:
            raise FileNotFoundError(f"{self.out} has no readable {stage} checkpoint to start from")
        _load_module(module, found[1], found[2])

    # ------------------------------------------------------------------ previews
    def _vae_grid(self, step: int, objective: nn.Module, stage: str = "vae") -> None:
        from ..media.grid import xy_grid
        from .logs import tensor_images
        vae = _unwrap(objective).vae
        was = vae.training
        vae.eval()
        with torch.no_grad():
            img = self._images(list(range(min(8, len(self.dataset)))))
            rec = vae.decode(vae.encode(img).mode())
        vae.train(was)
        grid = xy_grid([tensor_images(img), tensor_images(rec)], [str(i) for i in range(len(img))], ["data", "recon"])
        _save_png(grid, self.out / "samples" / f"{stage}-{step:08d}.png")

    def _sample_grid(self, step: int, model: nn.Module) -> None:
        every = self.cfg.log.sample_every
        if not self.cfg.log.prompts or (every and step % every and step != self.cfg.train.steps):
            return
        from ..media.grid import xy_grid
        pipe = self.pipeline(model)
        rows = []
        for prompt in self.cfg.log.prompts:
            row = []
            for seed in self.cfg.log.sample_seeds:
                row.extend(pipe.generate(self._params(prompt, seed)).images)
            rows.append(row)
        labels = [str(s) for s in self.cfg.log.sample_seeds]
        grid = xy_grid(rows, labels, [p[:40] for p in self.cfg.log.prompts], title=f"step {step}")
        _save_png(grid, self.out / "samples" / f"diffusion-{step:08d}.png")

    def _params(self, prompt: str, seed: int):
        from ..pipelines.params import GenerationParams
        lg = self.cfg.log
        return GenerationParams(prompt=prompt, steps=lg.sample_steps, sampler_name=lg.sample_sampler,
                                scheduler=lg.sample_scheduler, cfg_scale=lg.sample_cfg, seed=seed,
                                width=self.cfg.data.size, height=self.cfg.data.size)

    def pipeline(self, model: nn.Module | None = None):
        """A generation Pipeline over copies of the current (or given, e.g. EMA) weights."""
        from ..models.loading import ModelParts
        from ..pipelines.pipeline import Pipeline
        model = copy.deepcopy(_unwrap(model if model is not None else self.model)).eval()
        vae = copy.deepcopy(self.vae).eval() if self.vae is not None else None
        parts = ModelParts(unet=model.unet, vae=vae, text_encoders=[model.text_encoder],
                           tokenizers=[self.tokenizer], family=model_family(self.cfg, self.latent_scale),
                           name="training")
        return Pipeline(parts, device=self.device)


def _load_module(module: nn.Module, weights: dict, state: dict) -> None:
    """Checkpoint weights into `module`, then its EMA weights if the checkpoint has them."""
    module.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
    if state.get("ema"):
        e = EMA(module, state["ema"]["decay"])
        e.load_state_dict(state["ema"])
        e.copy_to(module)


def _with_ema(module: nn.Module, ema: EMA) -> nn.Module:
    shadow = copy.deepcopy(module)
    ema.copy_to(shadow)
    return shadow


def _save_png(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- entry points
def train_from_config(path: str | Path, *, resume: bool = False, overrides: dict | None = None,
                      stages: tuple[str, ...] = STAGES) -> Path:
    """`diffusekit train CONFIG [--resume]`: train the stages of the config; returns the run folder."""
    cfg = load_config(path, overrides)
    if cfg.finetune is not None:   # [finetune]: a loaded checkpoint, not a model from scratch
        from .finetune import FineTuner
        return FineTuner(cfg, resume=resume).run()
    if cfg.distill is not None:    # [distill]: a few-step consistency student of a loaded checkpoint
        from .distill import Distiller
        return Distiller(cfg, resume=resume).run()
    return Trainer(cfg, resume=resume).run(stages)


def load_run(out_dir: str | Path, *, ema: bool = True) -> tuple[TrainConfig, TextToImage, AutoencoderKL | None, float]:
    """The config, trained (EMA) model, VAE and latent scale of a run's newest checkpoints."""
    from .config import config_from_dict
    out = Path(out_dir)
    cfg = config_from_dict(json.loads((out / "config.json").read_text()), str(out / "config.json"))
    model, vae = build_models(cfg)
    found = load_training_checkpoint(out, "diffusion")
    if found is None:
        raise FileNotFoundError(f"{out} has no readable diffusion checkpoint")
    step, weights, state, _ = found
    _load_module(model, weights, state if ema else {"ema": {}})
    if vae is not None and not cfg.model.vae_from:   # vae_from: the shipped model's frozen VAE, as built
        for stage in ("decoder", "vae"):   # a fine-tuned decoder replaces the VAE stage's weights
            vfound = load_training_checkpoint(out, stage)
            if vfound is not None:
                _load_module(VAEObjective(vae), vfound[1], vfound[2] if ema else {"ema": {}})
                break
        else:
            if not cfg.model.init_from:   # a warm start's VAE is init_from's when no stage changed it
                raise FileNotFoundError(f"{out} has no readable vae checkpoint")
    scale = float(state["extra"].get("latent_scale", 1.0))
    return cfg, model.eval(), vae.eval() if vae is not None else None, scale


def export_model(out_dir: str | Path, path: str | Path, *, dtype: torch.dtype = torch.float16,
                 metadata: dict | None = None) -> Path:
    """Write a run's EMA weights as a single-file checkpoint that `Pipeline.from_pretrained` loads
    (no first_stage_model.* weights for a pixel-space run: its family says vae=None)."""
    from ..models.loading import save_checkpoint
    cfg, model, vae, scale = load_run(out_dir)
    fam = model_family(cfg, scale)
    parts = {"unet": model.unet, "text_encoders": [model.text_encoder]} | ({"vae": vae} if vae is not None else {})
    return save_checkpoint(parts, path, family=fam, dtype=dtype, metadata=metadata)
