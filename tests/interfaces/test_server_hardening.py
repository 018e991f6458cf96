"""Server hardening (issue 20) over real HTTP on loopback, uvicorn in a thread: errors on the right side
(a broken server file is a 500/503 of one shape, a bad field a 422 naming it), abandoned jobs give their
slot back, the cost budget (pixel-steps, estimated memory), and non-finite output as a clear error."""
import base64
import io
import json
import shutil
import threading
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusekit.models.families import get_family
from diffusekit.pipelines.cost import estimate_memory, pixel_steps
from diffusekit.pipelines.params import GenerationParams

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from diffusekit.interfaces.server import create_app  # noqa: E402
from diffusekit.interfaces.server.schemas import RequestError, check_memory  # noqa: E402

TINY = dict(width=32, height=32, steps=2, cfg_scale=5.0, seed=3, sampler_name="Euler")
ERROR_KEYS = {"detail", "error"}


def _rewrite(src, dst, edit_tensors=None, edit_family=None):
    """Copy a checkpoint, changing its tensors and/or its stored family (metadata)."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_family:
        fam = json.loads(meta["diffusekit.family"])
        edit_family(fam)
        meta["diffusekit.family"] = json.dumps(fam)
    save_file(tensors, str(dst), metadata=meta)


@pytest.fixture(scope="module")
def folders(models_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("hard-models")
    shutil.copy(models_dir / "tiny-a.safetensors", d / "tiny-a.safetensors")
    shutil.copy(models_dir / "broken.safetensors", d / "broken.safetensors")

    def nan_unet(t):
        key = next(k for k in t if k.startswith("model.diffusion_model.out."))
        t[key] = torch.full_like(t[key], float("nan"))
    _rewrite(d / "tiny-a.safetensors", d / "nan-unet.safetensors", edit_tensors=nan_unet)
    _rewrite(d / "tiny-a.safetensors", d / "size7.safetensors", edit_family=lambda f: f.update(default_size=7))
    loras = tmp_path_factory.mktemp("hard-loras")
    (loras / "corrupt.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": oops" + b" " * 80)
    return d, loras


@pytest.fixture(scope="module")
def hard(folders, serve_in_thread):
    models, loras = folders
    app = create_app(model="tiny-a", models_dir=models, lora_dir=loras, queue_size=1, max_steps=1000,
                     max_images=100, max_pixel_steps=32 * 32 * 1000 * 100, max_memory_mb=64)
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200    # loaded and working
            yield app, url, client


def _ok(client):
    r = client.post("/sdapi/v1/txt2img", json=TINY)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("model, status, words", [
    ("broken", 503, ["'broken.safetensors' cannot be loaded"]),
    ("size7", 503, ["'size7.safetensors' cannot be loaded", "default_size=7"]),
    ("nan-unet", 500, ["non-finite latents", "'nan-unet'", "UNet weights"]),
])
def test_a_broken_model_file_is_the_servers_error(hard, folders, model, status, words):
    _, _, client = hard
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "override_settings": {"sd_model_checkpoint": model}})
    body = r.json()
    assert r.status_code == status and set(body) == ERROR_KEYS, r.text
    assert all(w in body["detail"] for w in words), body["detail"]
    assert str(folders[0]) not in r.text and "field" not in body                      # no server paths, no field
    _ok(client)                                                                         # nothing else broken


def test_a_corrupt_lora_file_is_a_500_of_the_same_shape(hard, folders):
    _, _, client = hard
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "x <lora:corrupt:0.5>"})
    body = r.json()
    assert r.status_code == 500 and set(body) == ERROR_KEYS and body["error"] == "Internal Server Error", r.text
    assert "failed inside the server (not because of the request)" in body["detail"]
    assert "<lora_dir>" in body["detail"] and str(folders[1]) not in r.text
    _ok(client)


def test_client_errors_name_their_field(hard):
    _, url, client = hard
    r = client.post("/sdapi/v1/txt2img", content='{"prompt": "a \\ud800"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "prompt" in r.text and "surrogate" in r.text, r.text
    init = base64.b64encode(_png(Image.new("RGB", (32, 32)))).decode()
    mask = base64.b64encode(_png(Image.new("L", (16, 16), 255))).decode()
    r = client.post("/sdapi/v1/img2img", json={**TINY, "init_images": [init], "mask": mask})
    assert r.status_code == 422 and r.json()["field"] == "mask" and "16x16" in r.json()["detail"], r.text
    r = httpx.request("OPTIONS", url + "/sdapi/v1/options")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST" and set(r.json()) == ERROR_KEYS
    r = client.get("/sdapi/v1/nothing-here")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found", "error": "Not Found"}
    r = client.post("/sdapi/v1/txt2img", content=b"\xff\xfe not utf-8", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and set(r.json()) >= ERROR_KEYS


def test_the_cost_budget_names_itself(hard):
    _, _, client = hard
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "width": 512, "height": 512, "batch_size": 4})
    assert r.status_code == 422 and r.json()["field"] == "max_memory_mb" and "GiB" in r.json()["detail"], r.text
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "width": 64, "height": 64, "steps": 1000, "n_iter": 50,
                                               "batch_size": 2})
    assert r.status_code == 422 and r.json()["field"] == "max_pixel_steps", r.text
    _ok(client)


def test_cost_estimates():
    sd1 = get_family("sd1")
    p = GenerationParams(width=512, height=768, steps=30, batch_size=2, n_iter=3, enable_hr=True, hr_scale=2.0,
                         hr_second_pass_steps=10)
    assert pixel_steps(p) == 512 * 768 * 30 * 6 + 1024 * 1536 * 10 * 6
    one = estimate_memory(sd1, GenerationParams(batch_size=1), width=512, height=512)
    two = estimate_memory(sd1, GenerationParams(batch_size=2), width=512, height=512)
    assert two["unet"] == 2 * one["unet"] and two["vae"] == 2 * one["vae"]     # both images in one VAE call
    big = estimate_memory(sd1, GenerationParams(batch_size=8), width=2048, height=2048)
    assert big["vae"] == 16 * one["vae"]                                       # 16x the pixels, one image per call
    assert big["peak"] > 24 * 2**30 > 4 * 2**30 > one["peak"]                  # the "33 GB on 24 GB"


def test_abandoned_jobs_free_their_slot(hard):
    """queue_size=1: a running job whose client gave up is interrupted, a waiting one is dropped, and a
    new client gets the slot instead of a 503."""
    app, url, client = hard
    worker = app.state.worker
    long = {**TINY, "steps": 1000, "n_iter": 50}           # minutes of work if nobody stopped it
    done_before, gone = worker.jobs_done, []
    def give_up(timeout):
        try:
            httpx.post(url + "/sdapi/v1/txt2img", json=long, timeout=timeout)
        except httpx.TimeoutException:
            gone.append(timeout)

    running = threading.Thread(target=give_up, args=(4.0,))
    running.start()
    _wait(lambda: worker.snapshot()["state"]["job_count"] == 50 and worker.snapshot()["state"]["sampling_step"] > 0,
          "the long job to start")
    give_up(0.5)                                           # waits in the queue, then its client leaves
    _wait(lambda: worker.pending() == 0, "the waiting job to leave the queue")
    assert worker.snapshot()["state"]["job_count"] == 50   # the long one still runs
    r = client.post("/sdapi/v1/txt2img", json=TINY)        # queued behind it: not refused
    assert r.status_code == 200, r.text                    # ... and ran once the long job was interrupted
    running.join(30)
    assert gone == [0.5, 4.0] and worker.jobs_done == done_before + 2   # the dropped job never ran


def test_openapi_documents_the_options_body_and_every_error(hard):
    _, url, client = hard
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/sdapi/v1/options"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/OptionsRequest")
    props = spec["components"]["schemas"]["OptionsRequest"]["properties"]
    assert {"sd_model_checkpoint", "CLIP_stop_at_last_layers"} <= set(props)
    for op in (post, spec["paths"]["/sdapi/v1/txt2img"]["post"]):
        assert {"400", "422", "500", "503"} <= set(op["responses"])
        assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _wait(cond, what, timeout=60.0):
    deadline = time.monotonic() + timeout                  # a hang guard: each wait ends in well under a second
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
