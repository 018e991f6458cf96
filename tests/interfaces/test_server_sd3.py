"""The server lists and runs an SD3 model like any other: the SD3.5 release layout in the models folder
(MMDiT + VAE file, text_encoders/ beside it, a tokenizer_3/ folder for T5), over real HTTP."""
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


def test_sd3_model_is_listed_selected_and_generates(tmp_path, t5_tokenizer_dir, serve_in_thread):
    from dataclasses import replace

    from diffusekit.interfaces.server import create_app
    from diffusekit.models.loading import save_checkpoint

    fam, parts = _helpers.build_tiny_parts("sd3", seed=3)
    models = tmp_path / "models"
    optional = replace(fam, text_encoders=tuple(replace(s, optional=True) for s in fam.text_encoders))
    save_checkpoint({**parts, "text_encoders": [None] * 3}, models / "sd3-mmdit.safetensors", family=optional)
    (models / "text_encoders").mkdir()
    for name, enc in zip(("clip_l", "clip_g", "t5xxl_fp16"), parts["text_encoders"]):
        write_safetensors(models / "text_encoders" / f"{name}.safetensors", enc.state_dict(), {})
    shutil.copytree(t5_tokenizer_dir, models / "tokenizer_3")
    app = create_app(model=None, models_dir=str(models), preload=False)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        listed = [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert "sd3-mmdit" in listed and not any(n.startswith("text_encoders/") for n in listed)
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd3-mmdit"}).status_code == 200
        r = client.post("/sdapi/v1/txt2img", json=dict(prompt="a red circle", negative_prompt="blurry", seed=5,
                                                       width=32, height=32, steps=2, cfg_scale=4.0,
                                                       sampler_name="Euler"))
        assert r.status_code == 200, r.text
        info = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
        assert info["Model"] == "sd3-mmdit" and info["Negative prompt"] == "blurry" and info["Steps"] == "2"
