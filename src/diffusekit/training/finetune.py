"""Fine-tuning a checkpoint people have: `diffusekit train CONFIG` with a `[finetune]` table.

The base is any checkpoint `load_checkpoint` reads (a shipped name, a single file, a diffusers
folder). What trains is one of
- LoRA / LoCon layers on the frozen UNet and optionally text encoders (Hu et al. 2021; kohya-ss
  sd-scripts `train_network.py`), written as a kohya-format `.safetensors` with `ss_*` metadata;
- every UNet weight (and optionally the text encoders): a full fine-tune, written as a checkpoint;
- N new token vectors per text encoder: textual inversion (Gal et al. 2022), written in A1111's
  `embeddings/` format (file stem = the prompt word).
The loss is the base model's own objective (its eps or v prediction on its beta schedule, the
`core.objectives` pair the from-scratch trainer uses), optionally min-SNR weighted and with offset
noise. DreamBooth prior preservation (Ruiz et al. 2023, eq. 2) adds `prior_weight` x the same loss
on class images the base model drew from `class_prompts` before training.

The loop is `Trainer._optimize` (AdamW, warm-up + cosine, clipping, accumulation, EMA, atomic
checkpoints, resume after kill -9, DDP under torchrun, the step-seeded global-batch randomness that
makes 1 and N processes train the same weights); the trainable module is `FinetuneModel`, which
registers only what trains, so checkpoints, optimizer state and EMA hold the LoRA / vectors only.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..core.objectives import TrainingTarget, min_snr_weights, offset_noise, weighted_mse
from ..models.loading import save_checkpoint
from ..pipelines import prompts as P
from ..pipelines.conditioning import adm_vector
from ..pipelines.pipeline import Pipeline
from .buckets import BucketedFolder, BucketOrder
from .config import TrainConfig
from .datasets import build_dataset, to_tensor_array
from .finetune_config import FinetuneConfig
from .lora_network import LoRANetwork, save_kohya_lora
from .distributed import _init_world
from .trainer import DataOrder, Trainer, _unwrap, frozen_base

__all__ = ["FineTuner", "FinetuneModel", "save_embedding"]

STAGE = "finetune"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class FinetuneModel(nn.Module):
    """forward(x, t, ids, ti_index, adm) -> the base UNet's prediction, through what trains.

    ids: one (B, 77) id tensor per text encoder; ti_index: (B, 77) long, j >= 0 where the j-th
    textual-inversion vector goes (-1 elsewhere) or None; adm: per row (original_size, crop_coords,
    target_size) for SDXL's `y`, else None. The frozen model is held unregistered (`self.parts`)."""

    def __init__(self, parts, ft: FinetuneConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.__dict__["parts"] = parts                 # not a submodule: not in state_dict / parameters()
        self.method = ft.method
        self.lora = self.unet = self.text_encoders = self.embeddings = None
        self.trains_text = False
        if ft.method == "lora":
            self.lora = LoRANetwork(parts, rank=ft.rank, alpha=ft.alpha, targets=tuple(ft.targets),
                                    conv_rank=ft.conv_rank, conv_alpha=ft.conv_alpha, generator=generator).attach()
            self.trains_text = any(n.startswith("lora_te") for n in self.lora.layers)
        elif ft.method == "full":
            self.unet = parts.unet.requires_grad_(True)
            if "te" in ft.targets:
                self.text_encoders = nn.ModuleList(parts.text_encoders).requires_grad_(True)
                self.trains_text = True
        else:
            self.embeddings = nn.ParameterList(nn.Parameter(v) for v in _init_vectors(parts, ft))
            self.trains_text = True

    def __deepcopy__(self, memo):
        """Copy what trains (an EMA snapshot); the frozen model is shared, never copied."""
        import copy
        own = {id(p) for p in self.parameters()}
        parts = self.parts
        for m in (parts.unet, parts.vae, *parts.text_encoders):
            if m is not None and not any(id(p) in own for p in m.parameters()):
                memo.update({id(sub): sub for sub in m.modules()})
        memo[id(parts)] = parts
        return copy._reconstruct(self, memo, *self.__reduce_ex__(4))

    def encode(self, ids: list[torch.Tensor], ti_index: torch.Tensor | None):
        """(context (B, 77, C), pooled (B, P) or None) as the pipeline's TextConditioner encodes one chunk."""
        parts = self.parts
        hidden, pooled = [], None
        with nullcontext() if self.trains_text else torch.no_grad():
            encoders = self.text_encoders if self.text_encoders is not None else parts.text_encoders
            for e, (spec, enc) in enumerate(zip(parts.family.text_encoders, encoders)):
                emb = None
                if self.embeddings is not None and ti_index is not None:
                    tok = enc.token_embeddings(ids[e])                              # (B, 77, W)
                    vec = self.embeddings[e].to(tok.dtype)[ti_index.clamp(min=0)]   # (B, 77, W)
                    emb = torch.where((ti_index >= 0)[..., None], vec, tok)
                out = enc(ids[e], layer=spec.layer, final_norm=spec.final_norm, need_pooled=spec.pooled,
                          inputs_embeds=emb)
                hidden.append(out.hidden)
                if spec.pooled:
                    pooled = out.pooled
        return torch.cat(hidden, dim=-1), pooled

    def forward(self, x, t, ids, ti_index=None, adm=None):
        fam = self.parts.family
        context, pooled = self.encode(ids, ti_index)
        y = None
        if fam.adm_inputs:
            y = torch.cat([adm_vector(fam, pooled[i:i + 1], original_size=o, crop_coords=c, target_size=s)
                           for i, (o, c, s) in enumerate(adm)])
        return (self.unet if self.unet is not None else self.parts.unet)(x, t, context, y=y)   # own in a copy


def _init_vectors(parts, ft: FinetuneConfig) -> list[torch.Tensor]:
    """Per encoder (N, W): the token embeddings of `init_text`, repeated / cut to N (A1111 "Initialization text")."""
    ids = parts.tokenizers[0].encode(ft.init_text) or parts.tokenizers[0].encode("*")
    ids = (ids * ft.vectors)[: ft.vectors]
    with torch.no_grad():
        return [enc.token_embeddings(torch.tensor([ids])).reshape(ft.vectors, -1).float().clone()
                for enc in parts.text_encoders]


def save_embedding(vectors: list[torch.Tensor], folder: str | Path, name: str, *, step: int = 0,
                   checkpoint_hash: str | None = None, checkpoint_name: str | None = None) -> Path:
    """A textual-inversion file in A1111's format: `<name>.pt` with string_to_token / string_to_param
    {"*": (N, W)}, name, step, sd_checkpoint (hash10), sd_checkpoint_name for one text encoder (what
    A1111's trainer writes); `<name>.safetensors` with clip_l / clip_g for SDXL's two."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vectors = [v.detach().float().cpu().contiguous() for v in vectors]
    if len(vectors) == 2:
        from safetensors.torch import save_file
        path = folder / f"{name}.safetensors"
        save_file({"clip_l": vectors[0], "clip_g": vectors[1]}, str(path))
        return path
    if len(vectors) != 1:
        raise ValueError(f"{len(vectors)} text encoders: A1111 embeddings exist for one (SD 1/2) or two (SDXL)")
    path = folder / f"{name}.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors[0]}, "name": name, "step": step,
                "sd_checkpoint": checkpoint_hash, "sd_checkpoint_name": checkpoint_name}, path)
    return path


class FineTuner(Trainer):
    """Trainer for a `[finetune]` config; reuses `Trainer._optimize`, `_sample_grid`, `_params`."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg, self.resume, self.ft = cfg, resume, cfg.finetune
        self.world = _init_world()
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        self.out = Path(cfg.run.out_dir)
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            import os
            self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        self.on_step = None
        self.latent_scale = 1.0
        ft = self.ft
        parts = frozen_base(ft.base, ft.family or None)
        self.parts, self.family = parts, parts.family
        self.pipe = Pipeline(parts, device=self.device)
        self.model = FinetuneModel(parts, ft, torch.Generator().manual_seed(cfg.run.seed)).to(self.device)
        self._set_pipe_embeddings(self.model)
        if cfg.train.gradient_checkpointing:
            parts.unet.set_gradient_checkpointing(True)
        d = cfg.data
        self.dataset = (BucketedFolder(d.path, d.size, ft.bucket_step, ft.max_aspect, d.length or None)
                        if ft.buckets else build_dataset(d))
        self._latents: dict[int, tuple[torch.Tensor, str, tuple]] = {}
        self._tokens: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self._claim_out_dir(STAGE)
        self._class = self._class_items() if ft.class_images > 0 else None
        self.started = time.time()

    # ------------------------------------------------------------------ data
    def data_order(self, batch_size: int):
        if isinstance(self.dataset, BucketedFolder):
            return BucketOrder(self.dataset.item_bucket, batch_size, self.cfg.data.seed)
        return DataOrder(len(self.dataset), self.cfg.data.seed)

    def _caption(self, caption: str) -> str:
        return caption if caption.strip() or not self.ft.instance_prompt else self.ft.instance_prompt

    def _ids(self, caption: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(one (77,) id tensor per encoder, (77,) TI index) of the caption's first 75-token chunk
        (longer captions are cut, as kohya does); the prompt syntax is the pipeline's."""
        if caption not in self._tokens:
            chunks = self.pipe.text.chunks(caption)
            chunk = chunks[0] if chunks else P.empty_chunk()
            ids = [torch.tensor(P.build_ids(chunk, pad=spec.pad_id)) for spec in self.family.text_encoders]
            index = torch.full((len(ids[0]),), -1, dtype=torch.long)
            for offset, name in chunk.fixes:
                if name == self.ft.token:
                    n = self.ft.vectors
                    index[1 + offset:1 + offset + n] = torch.arange(n)
            self._tokens[caption] = (ids, index)
        return self._tokens[caption]

    def _item(self, i: int, source=None) -> tuple[torch.Tensor, str, tuple]:
        """(model-space latent (C, h, w), caption, (original_size, crop_coords, target_size)), cached."""
        cache = self._latents if source is None else source["cache"]
        if i not in cache:
            it = self.dataset[i] if source is None else source["items"][i]
            img = torch.from_numpy(to_tensor_array(it["image"]))[None]
            h, w = img.shape[-2:]
            adm = (tuple(it.get("original_size", (h, w))), tuple(it.get("crop_coords", (0, 0))),
                   tuple(it.get("target_size", (h, w))))
            latent = self.pipe.encode(img)[0].cpu()
            if source is not None or self.cfg.train.cache_latents:
                cache[i] = (latent, self._caption(it["caption"]), adm)
            else:
                return latent, self._caption(it["caption"]), adm
        return cache[i]

    def _rows(self, items):
        x0 = torch.stack([it[0] for it in items]).to(self.device)
        toks = [self._ids(it[1]) for it in items]
        n_enc = len(self.family.text_encoders)
        ids = [torch.stack([t[0][e] for t in toks]).to(self.device) for e in range(n_enc)]
        index = torch.stack([t[1] for t in toks]).to(self.device)
        return x0, ids, index, [it[2] for it in items]

    # ------------------------------------------------------------------ DreamBooth class images
    def _class_items(self) -> dict:
        """Class images drawn by the base model (before any training), kept in out_dir/class_images; or,
        with `class_data`, the first `class_images` real items of that dataset (seed `class_seed`)."""
        from dataclasses import replace

        from PIL import Image

        from ..pipelines.params import GenerationParams
        ft, size = self.ft, self.cfg.data.size
        order = DataOrder(ft.class_images, self.cfg.data.seed + 1)
        if ft.class_data:
            data = replace(self.cfg.data, kind=ft.class_data, path="", seed=ft.class_seed, length=ft.class_images)
            return {"items": build_dataset(data), "cache": {}, "order": order}
        folder = self.out / "class_images"
        if self.world.main:
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            for k in range(ft.class_images):
                path = folder / f"{k:05d}.png"
                if path.is_file():
                    continue
                prompt = ft.class_prompts[k % len(ft.class_prompts)]
                img = self.pipe.generate(GenerationParams(prompt=prompt, steps=ft.class_steps, cfg_scale=ft.class_cfg,
                                                          sampler_name="DPM++ 2M", scheduler="Karras", seed=k,
                                                          width=size, height=size)).images[0]
                img.save(path.with_suffix(".tmp.png"))
                path.with_suffix(".tmp.png").replace(path)
            print(f"[finetune] {ft.class_images} class images in {folder} ({time.time() - t0:.1f} s)")
        if self.world.size > 1:
            dist.barrier()
        items = []
        for k in range(ft.class_images):
            with Image.open(folder / f"{k:05d}.png") as im:
                items.append({"image": im.convert("RGB"), "caption": ft.class_prompts[k % len(ft.class_prompts)]})
        return {"items": items, "cache": {}, "order": order}

    # ------------------------------------------------------------------ training
    def run(self) -> Path:
        ocfg, ft = self.cfg.train, self.ft
        target = TrainingTarget(self.family.prediction_type, self.pipe.schedule)
        empty = self._ids("")
        drop_p = self.cfg.data.caption_dropout
        B = ocfg.batch_size

        def loss_of(mod, gen, items, lo, hi):
            x0, ids, index, adm = self._rows(items[lo:hi])
            n = len(items)
            # every draw is made for the global batch (n rows), then this process takes its rows
            t = target.sample(n, generator=gen)
            noise = torch.randn(n, *x0.shape[1:], generator=gen)
            if ocfg.offset_noise > 0:
                noise = offset_noise(noise, ocfg.offset_noise, generator=gen)
            drop = (torch.rand(n, generator=gen) < drop_p)[lo:hi].to(self.device)
            t, noise = t[lo:hi], noise[lo:hi].to(self.device)
            ids = [torch.where(drop[:, None], empty[0][e].to(self.device), ids[e]) for e in range(len(ids))]
            index = torch.where(drop[:, None], empty[1].to(self.device), index)
            pair = target(x0, noise, t)
            pred = mod(pair.model_input, pair.timestep, ids, index, adm)
            w = None
            if ocfg.min_snr_gamma > 0:
                w = min_snr_weights(target.snr(t), ocfg.min_snr_gamma, self.family.prediction_type).float()
            return weighted_mse(pred, pair.target, w)

        def micro_loss(gen, step, indices, lo, hi, mod):
            items = [None] * lo + [self._item(i) for i in indices[lo:hi]] + [None] * (len(indices) - hi)
            loss = loss_of(mod, gen, items, lo, hi)
            if self._class is not None:   # DreamBooth: the same loss on the base model's class images
                cls = self._class
                cidx = cls["order"].indices(step * B, B)
                citems = [None] * lo + [self._item(i, cls) for i in cidx[lo:hi]] + [None] * (B - hi)
                loss = loss + ft.prior_weight * loss_of(mod, gen, citems, lo, hi)
            return loss

        if self._class is not None and self.world.size > 1:
            raise NotImplementedError("prior preservation under DDP runs two forward passes per step; "
                                      "run it in one process")
        ema = self._optimize(STAGE, self.model, ocfg, micro_loss, on_checkpoint=self._on_checkpoint)
        if ema is not None:
            ema.copy_to(self.model)
        if self.world.main:
            path = self.export()
            (self.out / "DONE").write_text(f"finished\n{path}\n")
            print(f"[finetune] wrote {path}")
        if self.world.size > 1:
            dist.barrier()
        return self.out

    # ------------------------------------------------------------------ previews and files
    @contextmanager
    def _weights_of(self, model: nn.Module):
        """The live model (which the pipeline runs) temporarily holds `model`'s weights (an EMA copy)."""
        model = _unwrap(model)
        if model is self.model:
            yield
            return
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(model.state_dict())
        self._set_pipe_embeddings(self.model)
        try:
            yield
        finally:
            self.model.load_state_dict(saved)
            self._set_pipe_embeddings(self.model)

    def _set_pipe_embeddings(self, model: FinetuneModel) -> None:
        if model.embeddings is not None:
            self.pipe.text.set_embeddings({self.ft.token: tuple(v.detach().float() for v in model.embeddings)})

    def pipeline(self, model: nn.Module | None = None):
        self._set_pipe_embeddings(self.model)
        return self.pipe

    def _on_checkpoint(self, step: int, model: nn.Module) -> None:
        with self._weights_of(model):
            self._set_pipe_embeddings(self.model)
            self._sample_grid(step, self.model)
            if self.ft.method != "full":       # the LoRA / embedding as it is now, for a run that gets killed
                self.export(step=step)

    def output_name(self) -> str:
        return self.ft.output_name or self.out.name

    def export(self, path: str | Path | None = None, *, step: int | None = None) -> Path:
        """Write what trained: the kohya LoRA file, the checkpoint, or the A1111 embedding."""
        ft, dtype = self.ft, _DTYPES[self.ft.save_dtype]
        step = self.cfg.train.steps if step is None else step
        m = self.model
        if m.lora is not None:
            path = Path(path or self.out / f"{self.output_name()}.safetensors")
            return save_kohya_lora(m.lora.kohya_state_dict(dtype), path, self.kohya_metadata(step))
        if m.embeddings is not None:
            return save_embedding(list(m.embeddings), Path(path) if path else self.out / "embeddings", ft.token,
                                  step=step, checkpoint_hash=self.parts.hash10, checkpoint_name=self.parts.name)
        path = Path(path or self.out / f"{self.output_name()}.safetensors")
        return save_checkpoint(self.parts, path, family=self.family, dtype=dtype,
                               metadata={"diffusekit.finetune_base": self.parts.name})

    def kohya_metadata(self, step: int) -> dict[str, str]:
        """kohya-ss sd-scripts' `ss_*` training metadata (all values strings, as kohya writes them)."""
        ft, o, d = self.ft, self.cfg.train, self.cfg.data
        fam = self.family
        lora = self.model.lora
        args = {}
        if any(isinstance(b, nn.Conv2d) and b.kernel_size != (1, 1) for b in lora._bases.values()):
            args = {"conv_dim": str(lora.conv_rank), "conv_alpha": str(lora.conv_alpha)}
        captions = {}
        for i in range(min(len(self.dataset), 10_000)):
            c = self._latents[i][1] if i in self._latents else None
            if c is not None:
                for tag in (s.strip() for s in c.split(",")):
                    captions[tag] = captions.get(tag, 0) + 1
        te_lr = o.lr if lora.layers and any(n.startswith("lora_te") for n in lora.layers) else 0.0
        meta = {
            "ss_network_module": "networks.lora", "ss_network_dim": ft.rank, "ss_network_alpha": ft.alpha,
            "ss_network_args": json.dumps(args) if args else None,
            "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(
                fam.name, fam.name),
            "ss_v2": fam.name.startswith("sd2"), "ss_sd_model_name": self.parts.name,
            "ss_sd_model_hash": self.parts.hash10, "ss_v_parameterization": fam.prediction_type == "v",
            "ss_resolution": f"({d.size}, {d.size})", "ss_enable_bucket": ft.buckets,
            "ss_learning_rate": o.lr, "ss_unet_lr": o.lr, "ss_text_encoder_lr": te_lr,
            "ss_max_train_steps": o.steps, "ss_steps": step, "ss_lr_warmup_steps": o.warmup,
            "ss_lr_scheduler": "cosine_with_warmup", "ss_optimizer":
                f"torch.optim.AdamW(weight_decay={o.weight_decay},betas={tuple(o.betas)})",
            "ss_batch_size_per_device": o.batch_size // (self.world.size * o.grad_accum),
            "ss_total_batch_size": o.batch_size, "ss_gradient_accumulation_steps": o.grad_accum,
            "ss_mixed_precision": "bf16" if o.precision == "bf16" else "no",
            "ss_gradient_checkpointing": o.gradient_checkpointing, "ss_max_grad_norm": o.grad_clip,
            "ss_seed": self.cfg.run.seed, "ss_noise_offset": o.offset_noise or None,
            "ss_min_snr_gamma": o.min_snr_gamma or None, "ss_caption_dropout_rate": d.caption_dropout,
            "ss_num_train_images": len(self.dataset), "ss_num_reg_images": ft.class_images,
            "ss_prior_loss_weight": ft.prior_weight, "ss_output_name": self.output_name(),
            "ss_training_started_at": self.started, "ss_training_finished_at": time.time(),
            "ss_dataset_dirs": json.dumps({d.path or d.kind: {"n_repeats": 1, "img_count": len(self.dataset)}}),
            "ss_tag_frequency": json.dumps({d.path or d.kind: captions}),
            "ss_training_comment": "trained by diffusekit (training/finetune.py)",
        }
        return {k: str(v) for k, v in meta.items() if v is not None}
