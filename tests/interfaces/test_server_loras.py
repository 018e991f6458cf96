"""LoRAs over real HTTP (uvicorn on 127.0.0.1 in a thread, the tiny SD1 checkpoints of conftest):
`serve --lora-dir`, A1111's GET /sdapi/v1/loras and POST /sdapi/v1/refresh-loras, `<lora:NAME:W>` in txt2img
with the `Lora hashes` infotext, and the 4xx answers for an unknown LoRA or a server without a LoRA folder."""
import base64
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusekit.models.lora import addnet_hash
from diffusekit.pipelines.infotext import parse_infotext

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from safetensors.torch import save_file  # noqa: E402

from diffusekit.interfaces.server import create_app  # noqa: E402

_spec = importlib.util.spec_from_file_location("_test_lora_for_server",
                                               Path(__file__).parents[1] / "models" / "test_lora.py")
_lora_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lora_tests)    # SD1_LAYERS and random_lora: a kohya LoRA file for the tiny SD1 model

TINY = dict(width=32, height=32, steps=3, cfg_scale=5.0, seed=7, sampler_name="Euler")


def write_lora(path: Path, seed: int, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_lora_tests.random_lora(_lora_tests.SD1_LAYERS, seed=seed, scale=0.5), path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-root")
    folder = root / "Lora"
    write_lora(folder / "style.safetensors", 1, {"ss_output_name": "Style v1", "ss_tag_frequency": '{"red": 3}'})
    write_lora(folder / "sub" / "detail.safetensors", 2)
    outside = write_lora(root / "secret.safetensors", 3)          # not in the folder: must stay invisible
    (folder / "leak.safetensors").symlink_to(outside)
    return folder


@pytest.fixture(scope="module")
def url(models_dir, lora_dir, serve_in_thread):
    app = create_app(model="tiny-a", models_dir=models_dir, lora_dir=lora_dir, queue_size=2, max_steps=20)
    with serve_in_thread(app) as u:
        yield u


@pytest.fixture()
def client(url):
    with httpx.Client(base_url=url, timeout=90) as c:
        yield c


def txt2img(client, **body):
    r = client.post("/sdapi/v1/txt2img", json={**TINY, **body})
    assert r.status_code == 200, r.text
    data = r.json()
    img = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    img.load()
    return np.asarray(img), json.loads(data["info"]), img.info["parameters"]


def test_loras_listing_is_a1111s_and_refresh_finds_new_files(client, lora_dir):
    items = client.get("/sdapi/v1/loras").json()
    assert [i["name"] for i in items] == ["detail", "style"]     # the symlink leading out of the folder is not listed
    style = items[1]
    assert set(style) == {"name", "alias", "path", "metadata"}
    assert style["path"] == str(lora_dir.resolve() / "style.safetensors") and style["alias"] == "style"
    assert style["metadata"] == {"ss_output_name": "Style v1", "ss_tag_frequency": {"red": 3}}   # JSON decoded
    assert items[0]["path"] == str(lora_dir.resolve() / "sub" / "detail.safetensors") and items[0]["metadata"] == {}
    assert all(Path(i["path"]).resolve().is_relative_to(lora_dir.resolve()) for i in items)
    assert "secret" not in client.get("/sdapi/v1/loras").text

    write_lora(lora_dir / "late.safetensors", 4)
    assert "late" not in [i["name"] for i in client.get("/sdapi/v1/loras").json()]   # a snapshot, as A1111's
    r = client.post("/sdapi/v1/refresh-loras")
    assert r.status_code == 200 and r.json() is None
    assert [i["name"] for i in client.get("/sdapi/v1/loras").json()] == ["detail", "late", "style"]
    assert client.get("/sdapi/v1/cmd-flags").json()["lora_dir"] == str(lora_dir.resolve())


def test_txt2img_with_a_lora_tag_reports_its_hash(client, lora_dir):
    plain, _, _ = txt2img(client, prompt="a red circle")
    image, info, text = txt2img(client, prompt="a red circle <lora:style:0.8>")
    expected = f"style: {addnet_hash(lora_dir / 'style.safetensors')[:12]}"
    parsed = parse_infotext(text)
    assert parsed["Lora hashes"] == expected and info["infotexts"][0] == text
    assert info["extra_generation_params"] == {"Lora hashes": expected}
    assert parsed["Prompt"] == "a red circle <lora:style:0.8>"                # A1111 keeps the tag in the infotext
    assert not np.array_equal(image, plain)
    zero, _, _ = txt2img(client, prompt="a red circle <lora:style:0>")       # weight 0 is exactly no LoRA
    again, plain_info, _ = txt2img(client, prompt="a red circle")             # and nothing stayed merged
    assert np.array_equal(zero, plain) and np.array_equal(again, plain)
    assert "Lora hashes" not in parse_infotext(plain_info["infotexts"][0])
    assert plain_info["extra_generation_params"] == {}


def test_unknown_or_escaping_lora_is_a_422_naming_the_available_ones(client):
    for name in ("nosuch", "leak", "secret"):
        r = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": f"x <lora:{name}:0.8>"})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["field"] == "prompt" and f"'{name}'" in body["detail"]
        assert "available (GET /sdapi/v1/loras): detail, " in body["detail"] and "style" in body["detail"]
        assert "lora-root" not in body["detail"]                              # no server paths in the answer
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "x <lora:style:lots>"})
    assert r.status_code == 422 and "'lots' is not a number" in r.json()["detail"]
    _, info, _ = txt2img(client, prompt="x <lora:detail:0.5>")              # the server goes on serving
    assert parse_infotext(info["infotexts"][0])["Lora hashes"].startswith("detail: ")


def test_a_model_switch_keeps_the_lora_folder(client):
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "more/tiny-b"})
    assert r.status_code == 200, r.text
    try:
        _, info, text = txt2img(client, prompt="a circle <lora:style:0.8>")
        parsed = parse_infotext(text)
        assert parsed["Model"] == "tiny-b" and parsed["Lora hashes"].startswith("style: ")
    finally:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-a"}).status_code == 200


def test_without_a_lora_folder_a_tag_is_a_422_saying_so(models_dir, serve_in_thread):
    app = create_app(model="tiny-a", models_dir=models_dir, queue_size=1)
    with serve_in_thread(app) as u, httpx.Client(base_url=u, timeout=90) as c:
        r = c.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "x <lora:style:0.8>"})
        assert r.status_code == 422 and r.json()["field"] == "prompt"
        assert "no LoRA folder" in r.json()["detail"] and "--lora-dir" in r.json()["detail"]
        assert c.get("/sdapi/v1/loras").json() == [] and c.post("/sdapi/v1/refresh-loras").status_code == 200
        assert c.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "x"}).status_code == 200


def test_serve_command_passes_lora_dir(monkeypatch, tmp_path):
    import diffusekit.interfaces.server as server
    from diffusekit.interfaces.cli import main
    calls = {}
    monkeypatch.setattr(server, "serve", lambda **kw: calls.setdefault("serve", kw))
    assert main(["serve", "--lora-dir", str(tmp_path)]) == 0
    assert calls["serve"]["lora_dir"] == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="lora_dir="):
        create_app(model=None, lora_dir=tmp_path / "missing")
