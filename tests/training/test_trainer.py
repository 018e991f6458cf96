"""Trainer: exact resume, corrupt-checkpoint fallback, DDP == single process, schedules, export.

Everything runs a toy latent model (16x16 shapes, factor-2 VAE, 16-wide CLIP, 16-channel UNet)
for a few steps on one CPU thread. Tolerances: resume, accumulation and DDP compare weights with
atol 1e-5 (float32 sums in a different order: micro-batches, all-reduce). AdamW's eps is 1e-2 here:
with the default 1e-8 its first steps are ~lr * sign(grad), and the UNet's zero-initialised output
layers have gradients ~1e-9 whose sign is float noise, so equal runs would differ by 2 lr."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from diffusekit.training.checkpoint import list_checkpoints, load_training_checkpoint
from diffusekit.training.config import OptimConfig, config_from_dict, load_config
from diffusekit.training.trainer import DataOrder, Trainer, export_model, lr_at


def tiny_tree(out_dir: Path, *, vae_steps: int = 2, steps: int = 4, batch: int = 4, **train) -> dict:
    return {
        "run": {"out_dir": str(out_dir), "seed": 3, "threads": 1},
        "data": {"kind": "shapes", "size": 16, "length": 12, "seed": 0, "caption_dropout": 0.25},
        "model": {"prediction": "eps",
                  "vae": {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False, "norm_groups": 4},
                  "text": {"width": 16, "layers": 1, "heads": 2, "mlp_dim": 32},
                  "unet": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                           "transformer_depth": [0, 1], "transformer_depth_middle": 0, "num_heads": 2,
                           "norm_num_groups": 8}},
        "vae": {"steps": vae_steps, "batch_size": batch, "lr": 1e-3, "warmup": 1, "ema_decay": 0.0, "eps": 1e-2,
                "checkpoint_every": 1},
        "train": {"steps": steps, "batch_size": batch, "lr": 1e-3, "warmup": 2, "ema_decay": 0.9, "eps": 1e-2,
                  "checkpoint_every": 2, "min_snr_gamma": 5.0, "offset_noise": 0.1, **train},
        "log": {"every": 1, "sample_every": 10_000, "progress": False, "prompts": ["a red circle"],
                "sample_seeds": [1], "sample_steps": 2},
    }


def final_weights(out_dir: Path, stage: str = "diffusion") -> dict[str, torch.Tensor]:
    found = load_training_checkpoint(out_dir, stage)
    assert found is not None
    return found[1]


def assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst


class Stop(Exception):
    pass


def run_interrupted(tree: dict, stage: str, at: int) -> None:
    trainer = Trainer(config_from_dict(tree))

    def hook(s, step):
        if s == stage and step == at:
            raise Stop  # as a kill right after the checkpoint at `at` steps

    trainer.on_step = hook
    with pytest.raises(Stop):
        trainer.run()


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    Trainer(config_from_dict(tiny_tree(out))).run()
    return out


def test_run_writes_logs_checkpoints_and_samples(straight):
    assert (straight / "DONE").is_file()
    assert [s for s, _ in list_checkpoints(straight, "diffusion")] == [2, 4]
    rows = (straight / "loss.csv").read_text().splitlines()
    assert rows[0] == "stage,step,loss,lr,grad_norm,wall_s" and len(rows) == 1 + 2 + 4
    assert (straight / "loss.png").is_file()
    assert (straight / "samples" / "diffusion-00000004.png").is_file()   # the last step always samples
    assert (straight / "samples" / "vae-00000002.png").is_file()
    state = load_training_checkpoint(straight, "diffusion")[2]
    assert state["samples_seen"] == 16 and state["ema"]["num_updates"] == 4
    assert state["extra"]["latent_scale"] > 0


@pytest.mark.parametrize("stage,at", [("diffusion", 2), ("vae", 1)])
def test_resume_equals_uninterrupted(straight, tmp_path, stage, at):
    tree = tiny_tree(tmp_path)
    run_interrupted(tree, stage, at)
    assert not (tmp_path / "DONE").exists()
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(config_from_dict(tree))                 # refuses to overwrite a run silently
    Trainer(config_from_dict(tree), resume=True).run()
    assert_same(final_weights(tmp_path), final_weights(straight))
    assert_same(final_weights(tmp_path, "vae"), final_weights(straight, "vae"))
    a = load_training_checkpoint(tmp_path, "diffusion")[2]["ema"]["shadow"]
    b = load_training_checkpoint(straight, "diffusion")[2]["ema"]["shadow"]
    assert_same(a, b)
    # the loss curve continues the interrupted one: same rows as the straight run
    rows = lambda p: [r.split(",")[:3] for r in (p / "loss.csv").read_text().splitlines()]
    ra, rb = rows(tmp_path), rows(straight)
    assert [r[:2] for r in ra] == [r[:2] for r in rb]
    assert all(abs(float(x[2]) - float(y[2])) < 1e-4 for x, y in zip(ra[1:], rb[1:]))


def test_corrupt_last_checkpoint_falls_back(tmp_path):
    tree = tiny_tree(tmp_path, steps=4)
    run_interrupted(tree, "diffusion", 4)   # both checkpoints (2, 4) exist
    last = tmp_path / "checkpoints" / "diffusion-00000004" / "weights.safetensors"
    last.write_bytes(last.read_bytes()[:100])   # a torn write
    with pytest.warns(UserWarning, match="unreadable"):
        step, *_ = load_training_checkpoint(tmp_path, "diffusion")
    assert step == 2


def test_grad_accumulation_matches_full_batch(tmp_path):
    full, acc = tmp_path / "full", tmp_path / "acc"
    Trainer(config_from_dict(tiny_tree(full, vae_steps=1, steps=2))).run()
    t = tiny_tree(acc, vae_steps=1, steps=2, grad_accum=2)
    Trainer(config_from_dict(t)).run()
    assert_same(final_weights(full), final_weights(acc))


def test_preloaded_data_trains_the_same_weights(straight, tmp_path):
    """data.preload (all items drawn up front in worker processes, kept as uint8 + ids) changes where
    the pixels come from, not what they are: the run equals the per-step-drawing run."""
    tree = tiny_tree(tmp_path)
    tree["data"].update(preload=True, workers=2)
    Trainer(config_from_dict(tree)).run()
    assert_same(final_weights(tmp_path, "vae"), final_weights(straight, "vae"), atol=1e-6)
    assert_same(final_weights(tmp_path), final_weights(straight), atol=1e-6)


def test_preload_matches_items_in_order():
    from diffusekit.training.datasets import ShapesDataset, preload, to_tensor_array
    ds = ShapesDataset(seed=4, size=16, length=9)
    pixels, captions = preload(ds, workers=2, chunk=4)
    assert pixels.shape == (9, 16, 16, 3) and pixels.dtype.name == "uint8"
    for i in (0, 4, 8):
        assert captions[i] == ds[i]["caption"]
        assert (torch.from_numpy(pixels[i]).permute(2, 0, 1).float() / 127.5 - 1
                == torch.from_numpy(to_tensor_array(ds[i]["image"]))).all()


def test_captions_per_item_phrases_one_scene_many_ways():
    from diffusekit.training.datasets import ShapesDataset, preload
    from diffusekit.training.datasets.shapes import HELDOUT_SINGLE_TEMPLATES, HELDOUT_PAIR_TEMPLATES, fill_template
    ds = ShapesDataset(seed=4, size=16, length=6)
    caps = [ds.captions(i, 6) for i in range(6)]
    assert caps == [ds.captions(i, 6) for i in range(6)]              # deterministic
    held = {fill_template(t, ds.scene(i)) for i in range(6)
            for t in (HELDOUT_SINGLE_TEMPLATES if len(ds.scene(i).objects) == 1 else HELDOUT_PAIR_TEMPLATES)}
    for i, cs in enumerate(caps):
        assert cs[0] == ds[i]["caption"] and len(set(cs)) >= 3           # its own caption, then others
        assert not held & set(cs)                                       # never a held-out phrasing
    _, drawn = preload(ds, workers=2, chunk=4, captions_per_item=6)
    assert drawn == caps
    with pytest.raises(ValueError, match="captions_per_item"):
        preload(ds, captions_per_item=0)


def test_captions_per_item_trains_resumes_and_reuses_the_latent_cache(straight, tmp_path, monkeypatch):
    tree = tiny_tree(tmp_path / "a")
    tree["data"].update(preload=True, workers=1, captions_per_item=4)
    tree["train"]["cache_latents"] = True
    trainer = Trainer(config_from_dict(tree))
    seen, forward = [], trainer.model.forward
    trainer.model.forward = lambda x, t, ids, *a, **kw: seen.append(ids.clone()) or forward(x, t, ids, *a, **kw)
    trainer.run()
    assert (tmp_path / "a" / "latent-cache.pt").is_file()
    # the model is fed the items' phrasings (2-D ids), other than the first caption in some rows, never a mix
    pool = trainer._pool[1]                                    # (12, 4, 77)
    fed = torch.cat(seen)
    assert pool.shape == (12, 4, 77) and fed.dim() == 2
    empty = trainer.tokenizer([""])[0]
    as_row = [[bool((row == pool[i, j]).all()) for i in range(12) for j in range(4)] for row in fed]
    assert all(any(m) or bool((row == empty).all()) for m, row in zip(as_row, fed))
    firsts = {tuple(pool[i, 0].tolist()) for i in range(12)}
    assert any(tuple(row.tolist()) not in firsts and not bool((row == empty).all()) for row in fed)
    a = final_weights(tmp_path / "a")
    # kill after step 2, resume: same weights, and the latents come from the run folder's cache
    tree_b = tiny_tree(tmp_path / "b")
    tree_b["data"].update(preload=True, workers=1, captions_per_item=4)
    tree_b["train"]["cache_latents"] = True
    run_interrupted(tree_b, "diffusion", 2)
    encoded = []
    real_encode = Trainer._encode
    monkeypatch.setattr(Trainer, "_encode", lambda self, img: encoded.append(len(img)) or real_encode(self, img))
    Trainer(config_from_dict(tree_b), resume=True).run()
    assert not encoded                                                  # nothing re-encoded on resume
    assert_same(final_weights(tmp_path / "b"), a)
    # a cache written for other data is not trusted
    tree_c = tiny_tree(tmp_path / "c")
    tree_c["data"].update(preload=True, workers=1, captions_per_item=4)
    tree_c["train"]["cache_latents"] = True
    run_interrupted(tree_c, "diffusion", 2)
    import shutil
    shutil.copy(tmp_path / "a" / "latent-cache.pt", tmp_path / "c" / "latent-cache.pt")
    saved = torch.load(tmp_path / "c" / "latent-cache.pt", weights_only=True)
    saved["key"] = "another data config"
    torch.save(saved, tmp_path / "c" / "latent-cache.pt")
    Trainer(config_from_dict(tree_c), resume=True).run()
    assert encoded and torch.load(tmp_path / "c" / "latent-cache.pt", weights_only=True)["key"] != "another data config"


def test_captions_per_item_needs_procedural_preloaded_data(tmp_path):
    for data in ({"captions_per_item": 3}, {"captions_per_item": 3, "preload": True, "kind": "digits"},
                 {"captions_per_item": 0}):
        tree = tiny_tree(tmp_path)
        tree["data"].update(data)
        with pytest.raises(ValueError, match="captions_per_item"):
            config_from_dict(tree)


def _ddp_worker(rank: int, world: int, port: int, tree: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    Trainer(config_from_dict(tree)).run()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_single_process(straight, tmp_path):
    """torchrun-style 2-process gloo run with the same global batch (4 = 2 x 2) and seeds."""
    tree = tiny_tree(tmp_path)
    mp.spawn(_ddp_worker, args=(2, _free_port(), tree), nprocs=2, join=True)
    assert_same(final_weights(tmp_path), final_weights(straight))
    assert_same(final_weights(tmp_path, "vae"), final_weights(straight, "vae"))


def test_export_loads_in_pipeline(straight, tmp_path):
    from diffusekit import GenerationParams, Pipeline
    path = export_model(straight, tmp_path / "m.safetensors")
    pipe = Pipeline.from_pretrained(str(path))
    assert pipe.family.name == "custom" and pipe.factor == 2
    assert pipe.scale == pytest.approx(load_training_checkpoint(straight, "diffusion")[2]["extra"]["latent_scale"])
    img = pipe.generate(GenerationParams(prompt="a red circle", steps=2, cfg_scale=5, seed=1, width=16,
                                         height=16)).images[0]
    assert img.size == (16, 16)


def test_lr_schedule_warmup_then_cosine():
    c = OptimConfig(steps=110, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.55)          # half way down the cosine: (1 + 0.1) / 2
    assert lr_at(110, c) == pytest.approx(0.1)


def test_data_order_is_a_fixed_permutation_per_epoch():
    o = DataOrder(5, seed=1)
    first, second = o.indices(0, 5), o.indices(5, 5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    assert DataOrder(5, seed=1).indices(3, 4) == first[3:] + second[:2]


def test_config_errors_teach(tmp_path):
    with pytest.raises(ValueError, match="valid"):
        config_from_dict({"data": {"kind": "cifar"}})
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict({"train": {"stepz": 3}})
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[train]\nsteps = 7\n[model.unet]\nmodel_channels = 8\n')
    cfg = load_config(cfg_file, {"train.steps": 9, "model.unet.num_res_blocks": 1})
    assert cfg.train.steps == 9 and cfg.model.unet == {"model_channels": 8, "num_res_blocks": 1}


def test_shipped_configs_parse():
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("shapes.toml", "digits.toml", "folder.toml", "shapes_robust.toml", "shapes_robust_2.toml"):
        cfg = load_config(root / name)
        assert cfg.train.steps > 0


def test_folder_example_config_trains_and_exports(tmp_path):
    """configs/folder.toml on a folder of 6 captioned images (metadata.jsonl), shrunk to a few steps at
    16x16: trains both stages, exports, and the export generates."""
    import json

    from PIL import Image

    from diffusekit import GenerationParams, Pipeline
    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = []
    for i, colour in enumerate(["red", "green", "blue", "yellow", "white", "black"]):
        Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {colour} square"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    root = Path(__file__).resolve().parents[2] / "configs"
    small = {"run.out_dir": str(tmp_path / "run"), "run.threads": 1, "data.path": str(folder), "data.size": 16,
             "model.vae.ch": 8, "model.vae.ch_mult": [1, 2], "model.vae.norm_groups": 4,
             "model.unet.channel_mult": [1, 2], "model.unet.transformer_depth": [0, 1],
             "vae.steps": 2, "vae.batch_size": 2, "train.steps": 2, "train.batch_size": 2,
             "log.progress": False, "log.sample_steps": 2}
    out = Trainer(load_config(root / "folder.toml", small)).run()
    pipe = Pipeline.from_pretrained(str(export_model(out, tmp_path / "mine.safetensors")))
    img = pipe.generate(GenerationParams(prompt="a red square", steps=2, seed=1, width=16, height=16)).images[0]
    assert img.size == (16, 16) and pipe.factor == 2


def test_decoder_stage_keeps_the_encoder(straight, tmp_path):
    """The [decoder] stage (sd-vae-ft-mse style) changes only the decoder, so latents stay valid."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    tree = tiny_tree(out)
    tree["decoder"] = dict(tree["vae"], steps=2)
    Trainer(config_from_dict(tree), resume=True).run(("decoder",))
    before, after = final_weights(out, "vae"), final_weights(out, "decoder")
    enc = [k for k in before if ".encoder." in k or "quant_conv" in k and "post" not in k]
    dec = [k for k in before if ".decoder." in k]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)


def test_pixel_space_run_exports_and_generates(tmp_path):
    """A config without [model.vae] trains the UNet on the pixels; its export carries a family with
    vae=None and no VAE weights, and the pipeline samples, and starts img2img from, the pixels."""
    import numpy as np
    from PIL import Image

    from diffusekit import GenerationParams, Pipeline
    from diffusekit.models import read_safetensors_header
    from diffusekit.training.trainer import model_family
    tree = tiny_tree(tmp_path / "run", steps=2)
    del tree["model"]["vae"], tree["vae"]
    cfg = config_from_dict(tree)
    Trainer(cfg).run()
    fam = model_family(cfg)
    assert fam.vae is None and (fam.unet.in_channels, fam.unet.out_channels, fam.latent_scale) == (3, 3, 1.0)
    path = export_model(tmp_path / "run", tmp_path / "px.safetensors")
    header, _ = read_safetensors_header(path)
    assert not [k for k in header if k.startswith("first_stage_model.")]
    pipe = Pipeline.from_pretrained(str(path))
    assert pipe.vae is None and pipe.parts.vae is None and pipe.family == fam
    assert (pipe.latent_channels, pipe.factor, pipe.scale) == (3, 1, 1.0)
    p = GenerationParams(prompt="a red circle", steps=2, cfg_scale=5, seed=1, width=16, height=16)
    img = pipe.generate(p).images[0]
    assert img.size == (16, 16)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    same = pipe.generate(p.copy(init_images=[init], denoising_strength=0.0)).images[0]
    assert np.array_equal(np.asarray(same), np.asarray(init))       # pixels are the latents: nothing to decode
    moved = pipe.generate(p.copy(init_images=[init], denoising_strength=0.75)).images[0]
    assert moved.size == (16, 16) and not np.array_equal(np.asarray(moved), np.asarray(init))


def warm_tree(out_dir: Path, init: Path, **model) -> dict:
    """tiny_tree warm-started from `init`: no [vae] stage (init_from brings the VAE), a [decoder] stage."""
    tree = tiny_tree(out_dir, steps=2)
    vae_stage = tree.pop("vae")
    tree["decoder"] = dict(vae_stage, steps=1)
    tree["model"].update(init_from=str(init), **model)
    return tree


def test_init_from_warm_starts_every_part_and_keeps_the_latent_space(straight, tmp_path):
    """model.init_from copies the checkpoint's UNet, text encoder and VAE exactly (an fp32 export) and
    its latent scale; the run then trains from there, and exports without a [vae] stage."""
    import hashlib

    from diffusekit.models.loading import load_checkpoint, read_family
    from diffusekit.training.trainer import build_models
    init = export_model(straight, tmp_path / "init.safetensors", dtype=torch.float32)
    parts = load_checkpoint(init, dtype=torch.float32)
    cfg = config_from_dict(warm_tree(tmp_path / "run", init))
    model, vae = build_models(cfg)
    for ours, theirs in ((model.unet, parts.unet), (model.text_encoder, parts.text_encoders[0]), (vae, parts.vae)):
        assert_same(ours.state_dict(), theirs.state_dict(), atol=0)
    cold, _ = build_models(config_from_dict(tiny_tree(tmp_path / "cold")))
    assert any(not torch.equal(a, b) for a, b in zip(cold.state_dict().values(), model.state_dict().values()))
    out = Trainer(cfg).run()
    scale = load_training_checkpoint(out, "diffusion")[2]["extra"]["latent_scale"]
    assert scale == pytest.approx(read_family(init).latent_scale)
    assert list_checkpoints(out, "decoder") and not list_checkpoints(out, "vae")
    assert any(not torch.equal(final_weights(out)[f"model.{k}"], v) for k, v in model.state_dict().items())
    from diffusekit import Pipeline
    assert Pipeline.from_pretrained(str(export_model(out, tmp_path / "tuned.safetensors"))).factor == 2
    # the sha256 pin: the right file passes, another one is refused by name
    good = hashlib.sha256(init.read_bytes()).hexdigest()
    build_models(config_from_dict(warm_tree(tmp_path / "r2", init, init_sha256=good)))
    with pytest.raises(ValueError, match="sha256"):
        build_models(config_from_dict(warm_tree(tmp_path / "r3", init, init_sha256="0" * 64)))


def test_init_from_refuses_another_architecture_and_a_vae_stage(straight, tmp_path):
    from diffusekit.training.trainer import build_models
    init = export_model(straight, tmp_path / "init.safetensors")
    tree = warm_tree(tmp_path / "run", init)
    tree["model"]["unet"]["model_channels"] = 8
    with pytest.raises(ValueError, match="model_channels"):
        build_models(config_from_dict(tree))
    tree = warm_tree(tmp_path / "run", init)
    tree["vae"] = dict(tree["decoder"])
    with pytest.raises(ValueError, match="drop the \\[vae\\] stage"):
        config_from_dict(tree)
    tree = tiny_tree(tmp_path / "x")
    tree["model"]["init_sha256"] = "ab"
    with pytest.raises(ValueError, match="init_sha256"):
        config_from_dict(tree)
