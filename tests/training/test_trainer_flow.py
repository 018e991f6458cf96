"""The SD3-in-miniature recipe (configs/shapes_flow.toml) at toy size: an MMDiT trained with the
rectified-flow objective on the shipped `shapes` model's frozen VAE and text encoder.

Checks: only the MMDiT learns (VAE and text encoder stay the shipped weights), resume equals an
uninterrupted run, the export is a "custom" flow family whose MMDiT and conditioning reload."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_trainer import assert_same, final_weights, run_interrupted

from diffusekit.models.loading import load_checkpoint
from diffusekit.models.mmdit import MMDiT
from diffusekit.training.config import config_from_dict, load_config
from diffusekit.training.trainer import JointTextToImage, Trainer, _shipped_parts, build_models, export_model


def flow_tree(out_dir: Path, steps: int = 4) -> dict:
    return {
        "run": {"out_dir": str(out_dir), "seed": 5, "threads": 1},
        "data": {"kind": "shapes", "size": 32, "length": 8, "seed": 0, "caption_dropout": 0.25},
        "model": {"prediction": "flow", "shift": 1.0, "vae_from": "shapes", "text_from": "shapes",
                  "context_tokens": 20, "mmdit": {"depth": 1, "hidden_size": 32, "num_heads": 2,
                                                  "pos_embed_max_size": 8}},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-3, "warmup": 1, "ema_decay": 0.9, "eps": 1e-2,
                  "checkpoint_every": 2, "timestep_sampling": "logit_normal"},
        "log": {"every": 1, "progress": False, "prompts": []},
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("flow") / "run"
    Trainer(config_from_dict(flow_tree(out))).run()
    return out


def test_only_the_mmdit_learns(straight):
    weights = final_weights(straight)
    shipped = _shipped_parts("shapes").text_encoders[0].state_dict()
    text = {k[len("model.text_encoder."):]: v for k, v in weights.items() if k.startswith("model.text_encoder.")}
    assert text.keys() == shipped.keys()
    assert all(torch.equal(text[k], shipped[k]) for k in text)           # frozen: the shipped weights
    start = build_models(config_from_dict(flow_tree(straight)))[0].mmdit.state_dict()
    moved = [k for k, v in weights.items() if k.startswith("model.mmdit.") and
             not torch.equal(v, start[k[len("model.mmdit."):]])]
    assert len(moved) > 10


def test_resume_equals_uninterrupted(straight, tmp_path):
    tree = flow_tree(tmp_path / "run")
    run_interrupted(tree, "diffusion", 2)
    Trainer(config_from_dict(tree), resume=True).run()
    assert_same(final_weights(tmp_path / "run"), final_weights(straight))


def test_export_is_a_flow_mmdit_family(straight, tmp_path):
    path = export_model(straight, tmp_path / "m.safetensors")
    parts = load_checkpoint(path)
    fam = parts.family
    assert fam.name == "custom" and fam.prediction_type == "flow" and fam.is_mmdit and fam.flow_shift == 1.0
    assert isinstance(parts.unet, MMDiT) and parts.unet.config.adm_in_channels == 64
    spec = fam.text_encoders[0]
    assert spec.pooled and spec.context_tokens == 20 and spec.max_length == 77 and spec.layer == -1 and spec.final_norm
    assert fam.latent_scale == pytest.approx(_shipped_parts("shapes").family.latent_scale)
    # the reloaded MMDiT is the run's EMA network (fp16 file): same velocity to fp16 rounding
    model = build_models(config_from_dict(flow_tree(straight)))[0]
    from diffusekit.training.trainer import load_run
    _, trained, _, _ = load_run(straight)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0])
    ids = parts.tokenizers[0](["a red circle", ""])
    assert isinstance(model, JointTextToImage)
    with torch.no_grad():
        want = trained(x, t, ids)
        enc = parts.text_encoders[0].float()(ids, need_pooled=True)
        got = parts.unet.float()(x, t, enc.hidden[:, :20], enc.pooled)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)


def test_flow_config_errors_teach():
    tree = flow_tree(Path("unused"))
    tree["model"]["prediction"] = "v"
    with pytest.raises(ValueError, match="must be 'flow'"):
        config_from_dict(tree)
    tree = flow_tree(Path("unused"))
    tree["train"]["timestep_sampling"] = "cosmap"
    with pytest.raises(ValueError, match="logit_normal"):
        config_from_dict(tree)


def test_shipped_flow_config_parses():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "shapes_flow.toml")
    assert cfg.model.mmdit is not None and cfg.train.timestep_sampling == "logit_normal" and cfg.run.threads == 1


def test_export_generates_through_the_pipeline(straight, tmp_path):
    """txt2img with an ODE and two noise-drawing samplers, and img2img, on the exported flow model."""
    from diffusekit import GenerationParams, Pipeline
    pipe = Pipeline.from_pretrained(str(export_model(straight, tmp_path / "m.safetensors")))
    assert pipe.denoiser.noise_form == "flow"
    for sampler in ("Euler", "Euler a", "DPM++ 2M SDE"):
        img = pipe.generate(GenerationParams(prompt="a red circle", steps=3, cfg_scale=5, seed=1, width=32, height=32,
                                             sampler_name=sampler)).images[0]
        assert img.size == (32, 32)
    again = pipe.generate(GenerationParams(prompt="a red circle", steps=4, seed=2, width=32, height=32,
                                           init_images=[img], denoising_strength=0.5)).images[0]
    assert again.size == (32, 32)
