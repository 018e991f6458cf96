"""The server lists and runs a Flux.1 model in BFL's release layout (the transformer file without prefix,
ae.safetensors, text_encoders/, a tokenizer_2/ folder for T5) over real HTTP; Forge's `distilled_cfg_scale`
reaches the model and the infotext ("Distilled CFG Scale")."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from diffusekit.models.weight_files import write_safetensors
from diffusekit.pipelines.infotext import parse_infotext

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
_spec = importlib.util.spec_from_file_location("pipelines_conftest",
                                               Path(__file__).parents[1] / "pipelines" / "conftest.py")
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)


def test_flux_model_is_listed_selected_and_generates(tmp_path, t5_tokenizer_dir, serve_in_thread):
    import torch

    from diffusekit.interfaces.server import create_app
    from diffusekit.models.loading import FAMILY_METADATA_KEY

    fam, parts = _helpers.build_tiny_parts("flux-dev", seed=3)
    models = tmp_path / "models"
    # our family metadata (the toy sizes) on the bare transformer file; the keys are BFL's, no prefix
    write_safetensors(models / "flux1-dev.safetensors", parts["unet"].state_dict(),
                      {FAMILY_METADATA_KEY: fam.to_json()}, torch.bfloat16)
    write_safetensors(models / "ae.safetensors", parts["vae"].state_dict(), {})
    (models / "text_encoders").mkdir()
    for name, enc in zip(("clip_l", "t5xxl_fp16"), parts["text_encoders"]):
        write_safetensors(models / "text_encoders" / f"{name}.safetensors", enc.state_dict(), {})
    shutil.copytree(t5_tokenizer_dir, models / "tokenizer_2")
    app = create_app(model=None, models_dir=str(models), preload=False)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        listed = [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert "flux1-dev" in listed and "ae" not in listed and not any(n.startswith("text_encoders/") for n in listed)
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "flux1-dev"}).status_code == 200
        infos = []
        for extra in ({}, {"distilled_cfg_scale": 2.0}):
            r = client.post("/sdapi/v1/txt2img", json=dict(prompt="a red circle", seed=5, width=32, height=32, steps=2,
                                                           **extra))
            assert r.status_code == 200, r.text
            infos.append(parse_infotext(json.loads(r.json()["info"])["infotexts"][0]))
        # null fields: Flux's defaults (Euler, Simple, CFG 1: no CFG batch), the model's guidance 3.5
        assert infos[0]["Model"] == "flux1-dev" and infos[0]["Sampler"] == "Euler" and infos[0]["CFG scale"] == "1.0"
        assert infos[0]["Distilled CFG Scale"] == "3.5" and infos[1]["Distilled CFG Scale"] == "2.0"
        assert r.json()["images"][0] != client.post("/sdapi/v1/txt2img", json=dict(
            prompt="a red circle", seed=5, width=32, height=32, steps=2)).json()["images"][0]
