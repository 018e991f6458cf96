"""Fine-tuning ([finetune]): LoRA / full / textual inversion on a loaded checkpoint, kohya files that our
loader and diffusers + peft apply alike, exact resume, DDP == one process, prior preservation, buckets.

Bases are the tiny random-weight checkpoints of tests/pipelines (SD1: one CLIP, SDXL: CLIP-L + bigG).
Runs are 32x32 shapes for a few steps on one thread. AdamW eps = 1e-2 as in test_trainer (sign noise)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from diffusekit.models.loading import load_checkpoint
from diffusekit.models.lora import LoRATargets, addnet_hash, load_lora, merged
from diffusekit.training.buckets import BucketOrder, BucketedFolder, make_buckets, nearest_bucket
from diffusekit.training.checkpoint import load_training_checkpoint
from diffusekit.training.config import config_from_dict
from diffusekit.training.finetune import FineTuner
from diffusekit.training.lora_network import LoRANetwork, kohya_layer_names, save_kohya_lora

_here = Path(__file__).parents[1]


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, _here / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_tiny = _load("_pipelines_conftest", "pipelines/conftest.py")          # build_tiny_parts / save_tiny
_trainer_tests = _load("_trainer_tests", "training/test_trainer.py")    # Stop, assert_same, _free_port


def ft_tree(out: Path, base: Path, *, steps: int = 4, batch: int = 4, train=None, **ft) -> dict:
    return {
        "run": {"out_dir": str(out), "seed": 3, "threads": 1},
        "data": {"kind": "shapes", "size": 32, "length": 8, "seed": 0, "caption_dropout": 0.25},
        "finetune": {"base": str(base), "method": "lora", "rank": 2, "alpha": 1.0, **ft},
        "train": {"steps": steps, "batch_size": batch, "lr": 1e-2, "warmup": 1, "ema_decay": 0.0, "eps": 1e-2,
                  "checkpoint_every": 2, "min_snr_gamma": 5.0, "offset_noise": 0.1, **(train or {})},
        "log": {"every": 1, "sample_every": 10_000, "progress": False, "prompts": ["a red circle"],
                "sample_seeds": [1], "sample_steps": 2},
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _tiny.save_tiny(tmp_path_factory.mktemp("base") / "tiny-sd1.safetensors", "sd1")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, base) -> Path:
    out = tmp_path_factory.mktemp("lora")
    FineTuner(config_from_dict(ft_tree(out, base, targets=["attn", "proj", "ff", "conv", "te"]))).run()
    return out


def lora_weights(out: Path) -> dict:
    return load_training_checkpoint(out, "finetune")[1]


# ------------------------------------------------------------------------------------- files
def test_lora_run_writes_a_kohya_file_with_metadata_loss_and_samples(straight):
    path = straight / f"{straight.name}.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    modules = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in keys}
    for m in modules:   # every module has down, up and alpha, and a kohya prefix
        assert re.match(r"^lora_(unet|te)_[a-z0-9_]+$", m), m
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(keys)
    assert any(m.startswith("lora_te_") for m in modules) and any("resnets" in m for m in modules)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == "1.0" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_max_train_steps"] == "4" and meta["ss_seed"] == "3" and meta["ss_min_snr_gamma"] == "5.0"
    assert meta["sshs_model_hash"] == addnet_hash(path)            # the hash A1111 shows, over the tensors
    rows = (straight / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("stage,step,loss") and len(rows) == 5
    assert list((straight / "samples").glob("diffusion-00000004.png"))
    assert (straight / "DONE").is_file()
    # only the LoRA is trained and checkpointed, not the 1000s of frozen weights
    assert all(k.startswith("model.lora.layers.") for k in lora_weights(straight))


def test_the_file_acts_as_the_training_hooks_through_our_loader(straight, base):
    """Training-time forward (hooks on the frozen model) == the loader's merged weights on a fresh load."""
    from diffusekit.models.loading import load_checkpoint
    tuner = FineTuner(config_from_dict(ft_tree(straight, base, targets=["attn", "proj", "ff", "conv", "te"])),
                      resume=True)
    tuner.model.load_state_dict({k[len("model."):]: v for k, v in lora_weights(straight).items()})
    fresh = load_checkpoint(base)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 700])
    ids = [torch.randint(0, 49000, (2, 77), generator=g)]
    with torch.no_grad():
        hooked = tuner.model(x, t, ids)
        plain_ctx = fresh.text_encoders[0](ids[0], need_pooled=False).hidden
        plain = fresh.unet(x, t, plain_ctx)
        with merged(LoRATargets.of(fresh), [(load_lora(straight / f"{straight.name}.safetensors"), 1.0, 1.0)]):
            ctx = fresh.text_encoders[0](ids[0], need_pooled=False).hidden
            via_file = fresh.unet(x, t, ctx)
    assert (hooked - plain).abs().max() > 1e-3 * plain.abs().max()    # the LoRA does something
    assert (hooked - via_file).abs().max() <= 1e-5 * via_file.abs().max()


def test_kohya_names_sd1_follow_the_diffusers_module_tree():
    """kohya sd-scripts (networks/lora.py): every Linear / Conv2d inside a Transformer2DModel, named
    lora_unet_ + its diffusers path with '_'; conv_dim adds ResnetBlock2D / Down- / Upsample2D children;
    text encoder: Linear layers of CLIPAttention / CLIPMLP, lora_te_ + transformers path. The expected
    names are read off diffusers' and transformers' own module trees."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    _, parts = _tiny.build_tiny_parts("sd1")
    parts = SimpleNamespace(**parts, family=SimpleNamespace(name="sd1"))
    fam = _tiny.tiny_family("sd1")
    u = fam.unet
    ref = diffusers.UNet2DConditionModel(
        block_out_channels=tuple(u.model_channels * m for m in u.channel_mult), layers_per_block=u.num_res_blocks,
        norm_num_groups=u.norm_num_groups, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=2, cross_attention_dim=u.context_dim)
    te_cfg = fam.text_encoders[0].config
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=te_cfg.width, intermediate_size=te_cfg.mlp_dim, num_attention_heads=te_cfg.heads,
        num_hidden_layers=te_cfg.layers))

    def kohya(root, classes, prefix):
        names = set()
        for path, m in root.named_modules():
            if type(m).__name__ in classes:
                for sub, c in m.named_modules():
                    if sub and type(c).__name__ in ("Linear", "Conv2d", "LoRACompatibleConv", "LoRACompatibleLinear"):
                        names.add(prefix + f"{path}.{sub}".replace(".", "_"))
        return names

    want = kohya(ref, ("Transformer2DModel",), "lora_unet_")
    assert set(kohya_layer_names(parts, ("attn", "proj", "ff"))) == want
    conv = kohya(ref, ("ResnetBlock2D", "Downsample2D", "Upsample2D"), "lora_unet_")
    assert set(kohya_layer_names(parts, ("conv",))) == conv
    text_root = getattr(te, "text_model", te)
    prefix = "lora_te_text_model_" if hasattr(te, "text_model") else "lora_te_"
    te_want = kohya(text_root, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"), prefix)
    got = set(kohya_layer_names(parts, ("te",))) - set(kohya_layer_names(parts, ("attn",)))
    assert {n.replace("lora_te_text_model_", prefix) for n in got} == te_want


def test_kohya_names_sdxl_use_ldm_paths_and_te1_te2():
    """kohya's SDXL UNet (sdxl_original_unet.py) keeps the LDM names: lora_unet_input_blocks_4_1_... at full size;
    SDXL's text encoders are lora_te1_ (CLIP-L) and lora_te2_ (bigG)."""
    _, parts = _tiny.build_tiny_parts("sdxl")
    parts = SimpleNamespace(**parts, family=SimpleNamespace(name="sdxl"))
    names = kohya_layer_names(parts, ("attn", "proj", "ff", "te"))
    unet = [n for n in names if n.startswith("lora_unet_")]
    assert unet and all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", n) for n in unet)
    # tiny SDXL: two levels, attention (depth 2) at the second: LDM input_blocks.3.1 = diffusers down_blocks.1.attentions.0
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in unet
    assert "lora_unet_input_blocks_3_1_proj_in" in unet and "lora_unet_input_blocks_3_1_transformer_blocks_0_ff_net_2" in unet
    assert not any("down_blocks" in n for n in unet)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj" in names
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in names
    targets = LoRATargets.of(parts)      # every name is one our loader resolves
    assert all(n in targets.lookup for n in names)


def test_lora_file_acts_the_same_in_diffusers_peft(tmp_path):
    """A LoRA (attention, feed-forward, LoCon convs, text encoder) saved by save_kohya_lora, loaded into a
    diffusers StableDiffusionPipeline with `load_lora_weights` (peft layers, not fused) and applied by
    our loader to the same weights: UNet and text-encoder outputs agree to 1e-5 of the output scale."""
    pytest.importorskip("peft")
    parity = _load("_parity", "pipelines/test_parity_diffusers.py")
    from diffusekit import Pipeline
    ref = parity.tiny_diffusers_pipeline(tmp_path)
    ref.save_pretrained(tmp_path / "pipe")
    ours = Pipeline.from_pretrained(tmp_path / "pipe").parts          # a diffusers folder as the base
    net = LoRANetwork(ours, rank=3, alpha=1.5, targets=("attn", "proj", "ff", "conv", "te"), conv_rank=2,
                      conv_alpha=2.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                                            # a "trained" LoRA: both factors non-zero
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = save_kohya_lora(net.kohya_state_dict(), tmp_path / "l.safetensors", {"ss_network_dim": "3"})
    ref.load_lora_weights(str(path), adapter_name="l")
    n_unet = sum(1 for n in net.layers if n.startswith("lora_unet_"))
    assert sum(1 for n, _ in ref.unet.named_modules() if n.endswith("lora_A.l")) == n_unet  # every layer landed

    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    ids = torch.randint(0, 49000, (2, 77), generator=g)
    with torch.no_grad():
        plain = ours.unet(x, t, ctx)
        with merged(LoRATargets.of(ours), [(load_lora(path), 1.0, 1.0)]):
            mine = ours.unet(x, t, ctx)
            mine_te = ours.text_encoders[0](ids, need_pooled=False).hidden
        theirs = ref.unet(x, t, encoder_hidden_states=ctx).sample
        theirs_te = ref.text_encoder(ids).last_hidden_state
        net.attach()
        hooked = ours.unet(x, t, ctx)
        net.detach()
    assert (mine - plain).abs().max() > 1e-2 * plain.abs().max()
    assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert (hooked - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert (mine_te - theirs_te).abs().max() <= 1e-5 * theirs_te.abs().max()


def test_sdxl_lora_from_the_trainer_acts_the_same_in_diffusers_peft(tmp_path, clip_vocab_files):
    """A tiny random-weight SDXL (diffusers folder: UNet with text_time conditioning, CLIP-L, bigG with
    projection) fine-tuned by our trainer (LoRA on attention, proj, ff, LoCon convs, both text encoders),
    its kohya file loaded by diffusers' `StableDiffusionXLPipeline.load_lora_weights` (peft, unfused):
    UNet (with `y` / added_cond_kwargs), CLIP-L penultimate hidden states, bigG penultimate hidden states
    and pooled projection agree with diffusekit's loader and the training hooks within 1e-5. The file's
    names are kohya's SDXL ones: LDM UNet paths, lora_te1_ / lora_te2_ with transformers paths."""
    pytest.importorskip("peft")
    loading = _load("_loading_tests", "models/test_loading.py")
    diffusers, unet, vae, sched = loading._diffusers_parts("sdxl")
    bpe = clip_vocab_files(tmp_path / "bpe")
    te1, te2 = loading._hf_text(32, "quick_gelu"), loading._hf_text(48, "gelu", projection=24, seed=1)
    ref = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2,
                                              tokenizer=loading._hf_tokenizer(bpe),
                                              tokenizer_2=loading._hf_tokenizer(bpe, pad_token="!"),
                                              unet=unet, scheduler=sched)
    ref.save_pretrained(tmp_path / "xl")
    tree = ft_tree(tmp_path / "run", tmp_path / "xl", steps=2, batch=2, targets=["attn", "proj", "ff", "conv", "te"],
                   conv_rank=2, conv_alpha=2.0, train={"lr": 5e-2, "warmup": 0})
    tree["log"]["prompts"] = []
    tuner = FineTuner(config_from_dict(tree))
    assert tuner.family.name == "sdxl"
    tuner.run()
    path = tmp_path / "run" / "run.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and not any("down_blocks" in k for k in keys)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in keys

    ref.load_lora_weights(str(path), adapter_name="l")
    lora_modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith("lora_down.weight")}
    landed = sum(1 for m in (ref.unet, ref.text_encoder, ref.text_encoder_2) for n, _ in m.named_modules()
                 if n.endswith("lora_A.l"))
    assert landed == len(lora_modules)                                     # every layer of the file landed

    ours = FineTuner(config_from_dict(tree), resume=True)                  # the trained hooks, from the checkpoint
    ours.model.load_state_dict({k[len("model."):]: v for k, v in lora_weights(tmp_path / "run").items()})
    fresh = load_checkpoint(tmp_path / "xl", dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 49000, (2, 77), generator=g) for _ in range(2)]
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600])
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)
    adm = [((32, 32), (0, 0), (32, 32))] * 2

    def ours_encode(parts):
        o1 = parts.text_encoders[0](ids[0], layer=-2, final_norm=False, need_pooled=False)
        o2 = parts.text_encoders[1](ids[1], layer=-2, final_norm=False, need_pooled=True)
        return o1.hidden, o2.hidden, o2.pooled

    with torch.no_grad():
        plain = ours_encode(fresh)
        with merged(LoRATargets.of(fresh), [(load_lora(path), 1.0, 1.0)]):
            h1, h2, pooled = ours_encode(fresh)
            ctx = torch.cat([h1, h2], dim=-1)
            y = torch.cat([pooled, unet.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
            mine = fresh.unet(x, t, ctx, y)
        hooked = ours.model(x, t, ids, None, adm)
        r1 = ref.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
        r2 = ref.text_encoder_2(ids[1], output_hidden_states=True)
        theirs = ref.unet(x, t, encoder_hidden_states=torch.cat([r1, r2.hidden_states[-2]], dim=-1),
                          added_cond_kwargs={"text_embeds": r2.text_embeds, "time_ids": time_ids}).sample

    def close(a, b):
        return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())

    assert not close(h1, plain[0]) and not close(h2, plain[1]) and not close(pooled, plain[2])   # it trained
    assert close(h1, r1) and close(h2, r2.hidden_states[-2]) and close(pooled, r2.text_embeds)
    assert close(mine, theirs) and close(hooked, theirs)


# ------------------------------------------------------------------------------------- the loop
def test_resume_after_a_kill_equals_uninterrupted(straight, base, tmp_path):
    tree = ft_tree(tmp_path, base, targets=["attn", "proj", "ff", "conv", "te"])
    tuner = FineTuner(config_from_dict(tree))

    def hook(stage, step):
        if step == 2:
            raise _trainer_tests.Stop     # as a kill -9 right after the checkpoint at step 2

    tuner.on_step = hook
    with pytest.raises(_trainer_tests.Stop):
        tuner.run()
    assert not (tmp_path / "DONE").exists()
    with pytest.raises(FileExistsError, match="resume"):
        FineTuner(config_from_dict(tree))
    FineTuner(config_from_dict(tree), resume=True).run()
    _trainer_tests.assert_same(lora_weights(tmp_path), lora_weights(straight))


def _ddp_worker(rank: int, world: int, port: int, tree: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    FineTuner(config_from_dict(tree)).run()
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_single_process(straight, base, tmp_path):
    """torchrun-style 2-process gloo run, global batch 4 = 2 x 2: the same LoRA as one process."""
    tree = ft_tree(tmp_path, base, targets=["attn", "proj", "ff", "conv", "te"])
    mp.spawn(_ddp_worker, args=(2, _trainer_tests._free_port(), tree), nprocs=2, join=True)
    _trainer_tests.assert_same(lora_weights(tmp_path), lora_weights(straight))


def _stop_at(step: int):
    def hook(stage, done):
        if done == step:
            raise _trainer_tests.Stop     # as a kill -9 right after the checkpoint at `step`
    return hook


def _fsdp_worker(rank: int, world: int, port: int, tree: dict, resume: bool, stop: int, record: str) -> None:
    """One torchrun process of a full fine-tune under FSDP; writes each parameter's (local, full) numel."""
    import diffusekit.training.trainer as trainer_mod
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    shard = trainer_mod._fully_sharded

    def spy(module):
        out = shard(module)
        sizes = [(p.to_local().numel(), p.numel()) for p in out.parameters()]
        Path(f"{record}.{rank}.json").write_text(json.dumps(sizes))
        return out

    trainer_mod._fully_sharded = spy
    tuner = FineTuner(config_from_dict(tree), resume=resume)
    tuner.on_step = _stop_at(stop) if stop else None
    try:
        tuner.run()
    except _trainer_tests.Stop:
        pass
    torch.distributed.destroy_process_group()


def _fsdp(tree: dict, record: Path, *, resume: bool = False, stop: int = 0) -> None:
    mp.spawn(_fsdp_worker, args=(2, _trainer_tests._free_port(), tree, resume, stop, str(record)), nprocs=2, join=True)


def test_fsdp_two_processes_equal_single_process_and_resume_across(base, tmp_path):
    """Full fine-tune (UNet + text encoder), global batch 4, clipped: 2 steps under FSDP on 2 gloo processes
    (parameters and AdamW state sharded: each process holds about half) resumed in one process, and 2
    one-process steps resumed under FSDP, both end at the weights of 4 one-process steps."""
    def tree(name):
        return ft_tree(tmp_path / name, base, method="full", targets=["te"],
                       train={"distributed": "fsdp", "grad_clip": 0.05})   # clips every step: the norm spans the shards

    FineTuner(config_from_dict(tree("one"))).run()
    ref = lora_weights(tmp_path / "one")
    # steps 1-2 under FSDP, 3-4 in one process (together: FSDP steps == one-process steps, as they compose)
    _fsdp(tree("a"), tmp_path / "sizes", stop=2)
    for rank in (0, 1):
        sizes = json.loads((tmp_path / f"sizes.{rank}.json").read_text())
        local, full = sum(a for a, _ in sizes), sum(b for _, b in sizes)
        assert 0.4 * full < local < 0.6 * full and len(sizes) == len(ref)
    assert load_training_checkpoint(tmp_path / "a", "finetune")[0] == 2 and not (tmp_path / "a" / "DONE").exists()
    FineTuner(config_from_dict(tree("a")), resume=True).run()
    _trainer_tests.assert_same(lora_weights(tmp_path / "a"), ref)
    # one process -> FSDP
    tuner = FineTuner(config_from_dict(tree("b")))
    tuner.on_step = _stop_at(2)
    with pytest.raises(_trainer_tests.Stop):
        tuner.run()
    _fsdp(tree("b"), tmp_path / "sizes", resume=True)
    _trainer_tests.assert_same(lora_weights(tmp_path / "b"), ref)


def test_textual_inversion_file_is_a1111s_and_the_pipeline_reads_it_as_trained(base, tmp_path):
    from diffusekit import Pipeline
    from diffusekit.models.embeddings import load_embedding
    tree = ft_tree(tmp_path, base, method="textual_inversion", token="zorbl", init_text="red", vectors=2,
                   instance_prompt="a zorbl shape")
    tree["data"].update(kind="folder", path=str(_concept_folder(tmp_path / "data", word="zorbl")))
    tuner = FineTuner(config_from_dict(tree))
    tuner.run()
    emb = load_embedding(tmp_path / "embeddings" / "zorbl.pt")
    raw = torch.load(tmp_path / "embeddings" / "zorbl.pt", weights_only=True)
    assert set(raw) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert emb.count == 2 and raw["step"] == 4 and raw["name"] == "zorbl"
    init = tuner.parts.text_encoders[0].token_embeddings(torch.tensor([tuner.parts.tokenizers[0].encode("red") * 2]))[0]
    assert (emb.vectors["*"] - init).abs().max() > 1e-3                       # it trained
    # the pipeline's conditioning of a prompt naming the embedding == the training encoder's
    pipe = Pipeline.from_pretrained(base, embeddings_dir=tmp_path / "embeddings")
    cond = pipe.text.schedule("a zorbl on a blue background", steps=1).at(0).context
    ids, index = tuner._ids("a zorbl on a blue background")
    with torch.no_grad():
        ctx, _ = tuner.model.encode([ids[0][None]], index[None])
    assert (index >= 0).sum() == 2
    torch.testing.assert_close(ctx, cond, rtol=0, atol=1e-5)


def _concept_folder(folder: Path, word: str = "orange") -> Path:
    from diffusekit.evaluation.concept import write_concept_folder
    return write_concept_folder(folder, n=8, word=word, size=32)


def test_full_finetune_writes_a_checkpoint_that_loads(base, tmp_path):
    from diffusekit import GenerationParams, Pipeline
    from diffusekit.models.loading import load_checkpoint
    tree = ft_tree(tmp_path, base, method="full", steps=2, targets=[], train={"ema_decay": 0.9})
    FineTuner(config_from_dict(tree)).run()
    out = tmp_path / f"{tmp_path.name}.safetensors"
    a, b = load_checkpoint(base), load_checkpoint(out)
    assert b.family.name == "sd1"
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(a.unet.parameters(), b.unet.parameters()))
    assert diff > 1e-4                                                       # the UNet moved
    assert all(torch.equal(p, q) for p, q in zip(a.text_encoders[0].parameters(), b.text_encoders[0].parameters()))
    Pipeline.from_pretrained(out).generate(GenerationParams(prompt="a red circle", steps=2, width=32, height=32))


def test_prior_preservation_with_real_dataset_images(base, tmp_path):
    """class_data = "shapes": the regularisation items are the dataset's own (seed class_seed), and the
    prior term is in the loss: with prior_weight 0 the run trains other weights."""
    from diffusekit.training.datasets import ShapesDataset
    tree = ft_tree(tmp_path / "a", base, steps=2, class_images=5, class_data="shapes", class_seed=4)
    tuner = FineTuner(config_from_dict(tree))
    want = ShapesDataset(seed=4, size=32)
    items = tuner._class["items"]
    assert len(items) == 5 and not (tmp_path / "a" / "class_images").exists()
    assert items[3]["caption"] == want[3]["caption"] and items[3]["image"].tobytes() == want[3]["image"].tobytes()
    tuner.run()
    FineTuner(config_from_dict(ft_tree(tmp_path / "b", base, steps=2, class_images=5, class_data="shapes",
                                       class_seed=4, prior_weight=0.0))).run()
    a, b = lora_weights(tmp_path / "a"), lora_weights(tmp_path / "b")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


def test_prior_preservation_draws_class_images_with_the_base_model(base, tmp_path):
    tree = ft_tree(tmp_path, base, steps=2, class_images=3, class_prompts=["a red circle", "a blue square"],
                   class_steps=2)
    tuner = FineTuner(config_from_dict(tree))
    imgs = sorted((tmp_path / "class_images").glob("*.png"))
    assert len(imgs) == 3
    from diffusekit import GenerationParams
    again = tuner.pipe.generate(GenerationParams(prompt="a blue square", steps=2, cfg_scale=5.0, seed=1,
                                                 sampler_name="DPM++ 2M", scheduler="Karras", width=32, height=32))
    from PIL import Image
    assert list(Image.open(imgs[1]).getdata()) == list(again.images[0].getdata())   # base model, seed k, prompt k
    tuner.run()
    meta = load_lora(tmp_path / f"{tmp_path.name}.safetensors").metadata
    assert meta["ss_num_reg_images"] == "3" and meta["ss_prior_loss_weight"] == "1.0"


def test_v_prediction_base_bf16_and_gradient_checkpointing_train(tmp_path):
    """A v-prediction base (SD 2-v convention) trains under bf16 autocast with checkpointing."""
    from diffusekit.models.families import tiny_family
    from diffusekit.models.loading import save_checkpoint
    from dataclasses import replace
    fam, parts = _tiny.build_tiny_parts("sd1")
    path = save_checkpoint(parts, tmp_path / "v.safetensors", family=replace(fam, prediction_type="v"))
    tree = ft_tree(tmp_path / "run", path, steps=2, train={"precision": "bf16", "gradient_checkpointing": True})
    tuner = FineTuner(config_from_dict(tree))
    assert tuner.family.prediction_type == "v"
    tuner.run()
    rows = (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]
    assert all(float(r.split(",")[2]) > 0 for r in rows)
    assert load_lora(tmp_path / "run" / "run.safetensors").metadata["ss_v_parameterization"] == "True"


# ------------------------------------------------------------------------------------- buckets, config
def test_buckets_keep_aspect_and_sdxl_size_numbers(tmp_path):
    from PIL import Image
    buckets = make_buckets(128, 32, 2.0)            # widths 32..256: the largest height with w h <= 128^2, ratio <= 2
    assert buckets == [(96, 160), (128, 128), (160, 96)]
    assert nearest_bucket(300, 150, buckets) == (160, 96) and nearest_bucket(100, 100, buckets) == (128, 128)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(200, 100), (100, 200), (120, 120), (210, 100), (90, 190)]):
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    ds = BucketedFolder(folder, 128, 32, 2.0)
    it = ds[0]
    assert it["image"].size == it["bucket"] and it["bucket"][0] > it["bucket"][1]
    assert it["original_size"] == (100, 200) and it["target_size"] == (it["bucket"][1], it["bucket"][0])
    order = BucketOrder(ds.item_bucket, 2, seed=0)
    for step in range(6):
        batch = order.indices(step * 2, 2)
        assert len({ds.item_bucket[i] for i in batch}) == 1      # one tensor shape per batch
    assert BucketOrder(ds.item_bucket, 2, 0).indices(8, 2) == order.indices(8, 2)   # pure function of (seed, step)


def test_config_errors_teach(base, tmp_path):
    with pytest.raises(ValueError, match="finetune.method='dream'; valid: lora, full, textual_inversion"):
        config_from_dict(ft_tree(tmp_path, base, method="dream"))
    with pytest.raises(ValueError, match="needs finetune.token"):
        config_from_dict(ft_tree(tmp_path, base, method="textual_inversion"))
    with pytest.raises(ValueError, match="class_prompts"):
        config_from_dict(ft_tree(tmp_path, base, class_images=4))
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['mlp'\]; valid: attn, proj, ff, conv, te"):
        FineTuner(config_from_dict(ft_tree(tmp_path, base, targets=["mlp"])))
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict(ft_tree(tmp_path, base, ranks=3))
    with pytest.raises(ValueError, match="train.distributed='zero3'; valid: ddp, fsdp"):
        config_from_dict(ft_tree(tmp_path, base, method="full", train={"distributed": "zero3"}))
    with pytest.raises(ValueError, match="finetune.method='lora' trains a few MB: use distributed = 'ddp'"):
        config_from_dict(ft_tree(tmp_path, base, train={"distributed": "fsdp"}))
    with pytest.raises(ValueError, match="EMA of sharded weights is not implemented; set ema_decay = 0"):
        config_from_dict(ft_tree(tmp_path, base, method="full", train={"distributed": "fsdp", "ema_decay": 0.99}))
    with pytest.raises(ValueError, match="class_data='imagenet'; valid: 'shapes', 'digits'"):
        config_from_dict(ft_tree(tmp_path, base, class_images=4, class_data="imagenet"))


def test_shipped_finetune_configs_parse_and_the_shapes_lora_recipe_runs(tmp_path):
    """configs/finetune_*.toml parse; the hexagon recipe (shipped `shapes` base, LoCon, prior preservation)
    runs end to end, shrunk to 2 steps on 8 images, and its file goes through the pipeline's LoRA tag."""
    from diffusekit import GenerationParams, Pipeline
    from diffusekit.training.config import load_config
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("finetune_shapes_lora.toml", "finetune_shapes_ti.toml", "finetune_sd15_lora.toml"):
        assert load_config(root / name).finetune is not None
    data = _concept_folder(tmp_path / "data")
    cfg = load_config(root / "finetune_shapes_lora.toml", {
        "run.out_dir": str(tmp_path / "run"), "data.path": str(data), "data.size": 32, "train.steps": 2,
        "train.batch_size": 2, "finetune.class_images": 2, "finetune.class_steps": 2, "log.sample_steps": 2})
    FineTuner(cfg).run()
    path = tmp_path / "run" / "shapes-hexagon.safetensors"
    pipe = Pipeline.from_pretrained("shapes", lora_dir=path.parent)
    img = pipe.generate(GenerationParams(prompt="a red hexagon <lora:shapes-hexagon:1>", steps=2, width=32,
                                         height=32)).images[0]
    assert "Lora hashes" in img.info["parameters"]
