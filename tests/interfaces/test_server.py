"""The A1111-compatible API over real HTTP: a uvicorn server in its own process on 127.0.0.1, tiny models.

Images are 32x32 with 2-4 steps, so every generation takes well under a second."""
import base64
import hashlib
import inspect
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from diffusekit.pipelines.infotext import parse_infotext

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

TINY = dict(width=32, height=32, steps=3, cfg_scale=5.0)
A1111_INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
                   "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
                   "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
                   "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
                   "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp",
                   "clip_skip", "is_using_inpainting_conditioning", "version"}


def png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def b64png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def txt2img(client, **body):
    r = client.post("/sdapi/v1/txt2img", json={**TINY, **body})
    assert r.status_code == 200, r.text
    data = r.json()
    return data, json.loads(data["info"])


# ------------------------------------------------------------------------------------------ generation
def test_txt2img_a1111_response_and_infotext_inside_the_png(client):
    data, info = txt2img(client, prompt="a red circle", negative_prompt="blurry", seed=123, sampler_name="Euler a")
    assert set(data) == {"images", "parameters", "info"} and isinstance(data["info"], str)
    assert A1111_INFO_KEYS <= set(info)
    img = png(data["images"][0])
    assert img.size == (32, 32) and img.format == "PNG"
    text = img.info["parameters"]                                   # the PNG's own `parameters` chunk
    assert text == info["infotexts"][0]
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a red circle" and parsed["Negative prompt"] == "blurry"
    assert (parsed["Seed"], parsed["Sampler"], parsed["Steps"], parsed["Size-1"]) == ("123", "Euler a", "3", "32")
    assert parsed["Model"] == "tiny-a" == info["sd_model_name"]
    assert info["seed"] == 123 and info["all_seeds"] == [123] and info["sampler_name"] == "Euler a"
    assert data["parameters"]["prompt"] == "a red circle" and data["parameters"]["sampler_index"] == "Euler"
    assert info["unsupported_fields"] == [] and info["interrupted"] is False


def test_seed_minus_one_picks_a_random_seed_and_reports_it(client):
    seeds = []
    for _ in range(2):
        data, info = txt2img(client, prompt="dice", seed=-1, steps=2)
        assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"]]
        assert f"Seed: {info['seed']}," in png(data["images"][0]).info["parameters"]
        seeds.append(info["seed"])
    assert seeds[0] != seeds[1]                     # two draws from 2**32 values
    again, _ = txt2img(client, prompt="dice", seed=seeds[0], steps=2)   # the reported seed reproduces the image
    first, _ = txt2img(client, prompt="dice", seed=seeds[0], steps=2)
    assert np.array_equal(np.asarray(png(again["images"][0])), np.asarray(png(first["images"][0])))


def test_batch_size_and_n_iter_give_consecutive_seeds(client):
    data, info = txt2img(client, prompt="batch", seed=10, batch_size=2, n_iter=2, sampler_name="Euler")
    assert len(data["images"]) == 4 and info["all_seeds"] == [10, 11, 12, 13]
    assert info["batch_size"] == 2 and info["n_iter"] == 2 and len(info["infotexts"]) == 4
    arrays = []
    for b64, seed in zip(data["images"], info["all_seeds"]):
        assert f"Seed: {seed}," in png(b64).info["parameters"]
        arrays.append(np.asarray(png(b64)))
    assert all(not np.array_equal(arrays[0], a) for a in arrays[1:])
    single, sinfo = txt2img(client, prompt="batch", seed=12, sampler_name="Euler")   # image 3 on its own
    assert sinfo["all_seeds"] == [12] and np.array_equal(np.asarray(png(single["images"][0])), arrays[2])


def test_sampler_names_legacy_alias_and_defaults(client):
    _, info = txt2img(client, prompt="x", seed=1, sampler_name="DPM++ 2M Karras")
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]
    _, info = txt2img(client, prompt="x", seed=1, sampler_index="DDIM")         # A1111's older field name
    assert info["sampler_name"] == "DDIM"
    _, info = txt2img(client, prompt="x", seed=1, sampler_name="dpmpp_2m", scheduler="exponential")
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Exponential")
    _, info = txt2img(client, prompt="x", seed=1)                               # no sampler: Euler, as A1111's API
    assert info["sampler_name"] == "Euler"
    schema = client.get("/openapi.json").json()["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert schema["steps"]["default"] == 50 and schema["sampler_index"]["default"] == "Euler"
    assert schema["cfg_scale"]["default"] == 7.0 and schema["seed"]["default"] == -1
    assert client.get("/docs").status_code == 200


def test_img2img_with_init_image_mask_and_data_url(client):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    body = dict(TINY, prompt="repaint", seed=4, init_images=["data:image/png;base64," + b64png(init)],
                denoising_strength=0.5)
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Denoising strength: 0.5" in png(r.json()["images"][0]).info["parameters"]
    assert info["denoising_strength"] == 0.5 and r.json()["parameters"]["init_images"] is None
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = client.post("/sdapi/v1/img2img", json={**body, "mask": b64png(mask), "mask_blur": 0, "denoising_strength": 1.0,
                                                "include_init_images": True})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "inpaint_full_res" in info["unsupported_fields"]          # A1111's default "only masked" is not done here
    assert r.json()["parameters"]["init_images"] is not None
    out = np.asarray(png(r.json()["images"][0])).astype(int)
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False
    assert np.abs(out[outside] - np.asarray(init).astype(int)[outside]).max() <= 1   # kept outside the mask


def test_unsupported_fields_are_accepted_and_reported(client):
    _, info = txt2img(client, prompt="x", seed=1, restore_faces=True, tiling=True, styles=["cinematic"],
                      alwayson_scripts={"controlnet": {"args": []}}, override_settings={"sd_vae": "other.vae"},
                      my_plugin_field=3)
    assert {"restore_faces", "tiling", "styles", "alwayson_scripts", "override_settings.sd_vae",
            "my_plugin_field"} <= set(info["unsupported_fields"])
    _, info = txt2img(client, prompt="x", seed=1, restore_faces=False, tiling=None, styles=[], script_args=[],
                      override_settings={"CLIP_stop_at_last_layers": 2}, save_images=False)
    assert info["unsupported_fields"] == [] and info["clip_skip"] == 2
    assert "Clip skip: 2" in info["infotexts"][0]


def test_send_images_false_and_cfg_rescale_extension(client):
    data, info = txt2img(client, prompt="x", seed=1, send_images=False, cfg_rescale=0.7)
    assert data["images"] == [] and len(info["infotexts"]) == 1 and "CFG rescale: 0.7" in info["infotexts"][0]


# ------------------------------------------------------------------------------------------ listings
def test_samplers_schedulers_and_models(client, models_dir):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = {s["name"] for s in samplers}
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC"} <= names
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert {"dpmpp_2m"} <= set(next(s for s in samplers if s["name"] == "DPM++ 2M")["aliases"])
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"Automatic", "Karras", "Exponential", "SGM Uniform"} <= {s["label"] for s in schedulers}
    assert next(s for s in schedulers if s["name"] == "karras")["default_rho"] == 7.0
    assert all({"name", "label", "aliases"} <= set(s) for s in schedulers)
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert {"tiny-a", "more/tiny-b", "broken"} <= set(models)
    a = models["tiny-a"]
    sha = hashlib.sha256((models_dir / "tiny-a.safetensors").read_bytes()).hexdigest()
    assert a["sha256"] == sha and a["hash"] == sha[:10] and a["title"] == f"tiny-a.safetensors [{sha[:10]}]"
    assert set(a) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == a["title"] and opts["CLIP_stop_at_last_layers"] == 1
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["host"] == "127.0.0.1" and flags["queue_size"] == 3 and flags["max_steps"] == 100
    mem = client.get("/sdapi/v1/memory").json()
    assert mem["ram"]["total"] > 0 and "cuda" in mem
    assert client.get("/sdapi/v1/upscalers").json()[0]["name"] == "Latent"


def test_options_switch_model_and_refuse_names_outside_the_folder(client, models_dir):
    try:
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "more/tiny-b"})
        assert r.status_code == 200, r.text
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("more/tiny-b.safetensors [")
        _, info = txt2img(client, prompt="x", seed=1)
        sha_b = hashlib.sha256((models_dir / "more" / "tiny-b.safetensors").read_bytes()).hexdigest()
        assert info["sd_model_name"] == "tiny-b" and info["sd_model_hash"] == sha_b[:10]
        # per-request override, restored afterwards (A1111's override_settings_restore_afterwards default)
        _, info = txt2img(client, prompt="x", seed=1, override_settings={"sd_model_checkpoint": "tiny-a"})
        assert info["sd_model_name"] == "tiny-a"
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("more/tiny-b")
        for name in ["../tiny-a.safetensors", "more/../tiny-a.safetensors/../../x", str(models_dir / "tiny-a.safetensors"),
                     "/etc/passwd", "..\\..\\windows", "tiny-c", "", "tiny-a.safetensors\x00"]:
            r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
            assert 400 <= r.status_code < 500 and "sd_model_checkpoint" in r.text, (name, r.text)
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken"})     # listed, but not a model
        assert r.status_code == 503 and "'broken.safetensors' cannot be loaded" in r.json()["detail"], r.text
        assert r.json()["error"] == "Service Unavailable" and str(models_dir) not in r.text    # no server paths
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("more/tiny-b")
    finally:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-a"}).status_code == 200
    _, info = txt2img(client, prompt="x", seed=1)
    assert info["sd_model_name"] == "tiny-a"


def test_png_info(client):
    data, info = txt2img(client, prompt="a cat, sitting: calmly", seed=77)
    r = client.post("/sdapi/v1/png-info", json={"image": data["images"][0]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == info["infotexts"][0]
    assert body["parameters"]["Prompt"] == "a cat, sitting: calmly" and body["parameters"]["Seed"] == "77"
    plain = client.post("/sdapi/v1/png-info", json={"image": b64png(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


# ------------------------------------------------------------------------------------------ jobs
def test_progress_preview_skip_and_interrupt(client, server):
    result = {}

    def long_job():
        with httpx.Client(base_url=server.url, timeout=120) as c:
            result["r"] = c.post("/sdapi/v1/txt2img", json=dict(TINY, prompt="long", seed=5, steps=100, n_iter=3,
                                                                sampler_name="Euler"))

    t = threading.Thread(target=long_job)
    t.start()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:                      # /progress answers while the job runs
        p = client.get("/sdapi/v1/progress").json()
        if p["state"]["sampling_step"] > 0 and p["state"]["job_count"] == 3 and p["current_image"] \
                and p["state"]["job_no"] < 2:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "never saw the running job with a preview"
    assert 0 < seen["progress"] <= 1 and seen["state"]["sampling_steps"] == 100 and seen["eta_relative"] >= 0
    assert png(seen["current_image"]).size[0] > 0
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    k = seen["state"]["job_no"]
    assert client.post("/sdapi/v1/skip").status_code == 200               # drop batch k, go on with batch k+1
    deadline = time.monotonic() + 30
    while client.get("/sdapi/v1/progress").json()["state"]["job_no"] <= k and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    t.join(60)
    r = result["r"]
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True and info["skipped_batches"] == [k]
    assert info["all_seeds"] == list(range(5, 5 + k + 2)) == [int(parse_infotext(png(b).info["parameters"])["Seed"])
                                                             for b in r.json()["images"]]   # what was made comes back
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    _, info = txt2img(client, prompt="after", seed=1)                           # the next job is not interrupted
    assert info["interrupted"] is False and len(info["infotexts"]) == 1


LOAD_CLIENT = r'''
import base64, io, json, sys
from concurrent.futures import ThreadPoolExecutor
import httpx
from PIL import Image

url, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def one(i):
    body = {"prompt": f"load test {i}", "seed": 1000 + i, "steps": 2, "width": 32, "height": 32}
    try:
        r = httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=90)
    except httpx.HTTPError as e:
        return {"i": i, "status": None, "error": repr(e)}
    rec = {"i": i, "status": r.status_code, "retry_after": r.headers.get("retry-after")}
    if r.status_code == 200:
        d = r.json()
        rec["infotexts"] = [Image.open(io.BytesIO(base64.b64decode(b))).info.get("parameters") for b in d["images"]]
        rec["all_seeds"] = json.loads(d["info"])["all_seeds"]
    else:
        rec["body"] = r.text[:300]
    return rec

with ThreadPoolExecutor(n) as pool:
    results = list(pool.map(one, range(n)))
json.dump(results, open(out, "w"))
'''


def test_load_40_concurrent_requests_from_another_process(client, server, tmp_path):
    import subprocess
    import sys
    script = tmp_path / "load_client.py"
    script.write_text(LOAD_CLIENT)
    out = tmp_path / "results.json"
    polls, stop = [], threading.Event()

    def poll_progress():
        while not stop.is_set():
            try:
                polls.append(client.get("/sdapi/v1/progress", timeout=10).status_code)
            except httpx.HTTPError as e:
                polls.append(repr(e))
            time.sleep(0.1)

    poller = threading.Thread(target=poll_progress)
    poller.start()
    try:
        proc = subprocess.run([sys.executable, str(script), server.url, str(out), "40"], timeout=150,
                              capture_output=True, text=True)
    finally:
        stop.set()
        poller.join(15)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert sorted(r["i"] for r in results) == list(range(40))                # none lost
    ok = [r for r in results if r["status"] == 200]
    busy = [r for r in results if r["status"] == 503]
    assert len(ok) + len(busy) == 40, [r for r in results if r["status"] not in (200, 503)]
    assert ok and busy, (len(ok), len(busy))                                  # a queue of 3 cannot take 40 at once
    for r in busy:
        assert r["retry_after"] is not None and int(r["retry_after"]) >= 1 and "queue" in r["body"]
    for r in ok:                                                              # none mixed up
        seed = 1000 + r["i"]
        assert r["all_seeds"] == [seed]
        parsed = parse_infotext(r["infotexts"][0])
        assert parsed["Prompt"] == f"load test {r['i']}" and parsed["Seed"] == str(seed)
    assert polls and all(s == 200 for s in polls), polls[:20]                 # /progress kept answering
    assert server.proc.poll() is None
    _, info = txt2img(client, prompt="still up", seed=3)
    assert info["all_seeds"] == [3]


# ------------------------------------------------------------------------------------------ bad input
def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


GOOD_INIT = None


def _init_b64():
    global GOOD_INIT
    if GOOD_INIT is None:
        GOOD_INIT = b64png(Image.new("RGB", (32, 32), (200, 10, 10)))
    return GOOD_INIT


BAD = [  # (endpoint, body or raw string, a word the message must contain)
    ("txt2img", {"steps": "many"}, "steps"),
    ("txt2img", {"steps": 0}, "steps"),
    ("txt2img", {"steps": 10**6}, "max_steps"),
    ("txt2img", {"width": -64}, "width"),
    ("txt2img", {"height": 0}, "height"),
    ("txt2img", {"width": 33}, "width"),
    ("txt2img", {"width": 100_000, "height": 100_000}, "max_pixels"),
    ("txt2img", {"width": 2**40}, "width"),
    ("txt2img", {"batch_size": 100}, "max_batch_size"),
    ("txt2img", {"batch_size": 4, "n_iter": 50}, "max_images"),
    ("txt2img", {"batch_size": -1}, "batch_size"),
    ("txt2img", {"n_iter": 0}, "n_iter"),
    ("txt2img", {"prompt": "x" * 100_000}, "prompt"),
    ("txt2img", {"negative_prompt": "y" * 100_000}, "negative_prompt"),
    ("txt2img", {"prompt": 123}, "prompt"),
    ("txt2img", {"prompt": ["a", "b"]}, "prompt"),
    ("txt2img", '{"cfg_scale": NaN}', "cfg_scale"),
    ("txt2img", {"cfg_scale": 1e9}, "cfg_scale"),
    ("txt2img", {"seed": -5}, "seed"),
    ("txt2img", {"seed": 2**70}, "seed"),
    ("txt2img", {"subseed_strength": 3}, "subseed_strength"),
    ("txt2img", {"subseed": 2**70, "subseed_strength": 0.5}, "subseed"),
    ("txt2img", {"sampler_name": "Nope 9000"}, "sampler_name"),
    ("txt2img", {"sampler_name": 5}, "sampler_name"),
    ("txt2img", {"scheduler": "Bogus"}, "scheduler"),
    ("txt2img", {"enable_hr": True, "hr_scale": 100}, "hr_scale"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "sd_model_checkpoint"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "/tmp/x.safetensors"}}, "sd_model_checkpoint"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": "deep"}}, "CLIP_stop_at_last_layers"),
    ("txt2img", {"override_settings": "fast"}, "override_settings"),
    ("txt2img", {"refiner_checkpoint": "../tiny-a.safetensors", "refiner_switch_at": 0.5}, "refiner_checkpoint"),
    ("txt2img", "{not json", "JSON"),
    ("txt2img", "[1, 2, 3]", "body"),
    ("txt2img", "", "body"),
    ("img2img", {"prompt": "x"}, "init_images"),
    ("img2img", {"init_images": []}, "init_images"),
    ("img2img", {"init_images": "abc"}, "init_images"),
    ("img2img", {"init_images": ["!!!not base64!!!"]}, "init_images[0]"),
    ("img2img", {"init_images": [_b64(b"hello, not an image")]}, "init_images[0]"),
    ("img2img", {"init_images": ["https://example.com/cat.png"]}, "init_images[0]"),
    ("img2img", {"init_images": [_b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)]}, "init_images[0]"),
    ("img2img", {"init_images": "INIT", "mask": "%%%"}, "mask"),
    ("img2img", {"init_images": "INIT", "mask": "SMALLMASK"}, "mask"),
    ("img2img", {"init_images": "INIT", "denoising_strength": 5}, "denoising_strength"),
    ("img2img", {"init_images": "INIT", "inpainting_fill": 7}, "inpainting_fill"),
    ("png-info", {"image": "@@@"}, "image"),
    ("png-info", {}, "image"),
    ("options", {"sd_model_checkpoint": "../more/tiny-b.safetensors"}, "sd_model_checkpoint"),
    ("options", {"CLIP_stop_at_last_layers": 99}, "CLIP_stop_at_last_layers"),
    ("options", "[]", "body"),
    ("options", "{oops", "JSON"),
    ("compare", {"samplers": ["Nope"], "steps": 2, "width": 32, "height": 32}, "samplers"),
    ("compare", {"samplers": ["Euler"], "y_values": ["Bogus"]}, "y_values"),
    ("compare", {"samplers": ["Euler"] * 5, "y_axis": "steps", "y_values": [1, 2, 3]}, "max_images"),
    ("compare", {"y_axis": "colour", "y_values": [1]}, "y_axis"),
    ("compare", {"y_axis": "steps", "y_values": ["ten"]}, "y_values"),
    # hardening (issue 20): each of these was a 500 or was silently accepted
    ("txt2img", {"enable_hr": True, "hr_scale": 1e308}, "hr_scale"),
    ("txt2img", '{"override_settings": {"CLIP_stop_at_last_layers": Infinity}}', "CLIP_stop_at_last_layers"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": True}}, "CLIP_stop_at_last_layers"),
    ("compare", '{"samplers": ["Euler"], "y_axis": "cfg_scale", "y_values": [Infinity]}', "y_values"),
    ("compare", {"samplers": ["Euler"], "y_axis": "steps", "y_values": [True]}, "y_values"),
    ("options", '{"a": ' * 1000 + "1" + "}" * 1000, "nested too deeply"),
    ("options", '{"\\ud800": 1}', "unicode"),
    ("options", {"CLIP_stop_at_last_layers": "2"}, "CLIP_stop_at_last_layers"),
    ("txt2img", '{"comments": {"x": "\\ud800"}}', "comments"),
    ("txt2img", '{"prompt": "a \\ud800 cat"}', "prompt"),
    ("txt2img", '{"negative_prompt": "\\udfff"}', "negative_prompt"),
    ("txt2img", "NESTED300", "nested more than"),
    ("txt2img", {"seed": True}, "seed"),
    ("txt2img", {"seed": "123"}, "seed"),
    ("txt2img", {"cfg_rescale": False}, "cfg_rescale"),
    ("txt2img", {"steps": 20.5}, "steps"),
    ("txt2img", {"width": "32"}, "width"),
    ("txt2img", {"width": 512, "height": 512, "steps": 100, "batch_size": 2}, "max_pixel_steps"),
    ("png-info", {"image": 5}, "image"),
]
PATHS = {"txt2img": "/sdapi/v1/txt2img", "img2img": "/sdapi/v1/img2img", "png-info": "/sdapi/v1/png-info",
         "options": "/sdapi/v1/options", "compare": "/diffusekit/v1/compare"}


def _materialize(body):
    if body == "NESTED300":                           # comments nested 300 deep (a 500 once the image was made)
        inner: dict = {}
        for _ in range(300):
            inner = {"a": inner}
        return {**TINY, "comments": inner}
    if not isinstance(body, dict):
        return body
    out = dict(body)
    if out.get("init_images") == "INIT":
        out["init_images"] = [_init_b64()]
        out.update(TINY)
    if out.get("mask") == "SMALLMASK":
        out["mask"] = b64png(Image.new("L", (16, 16), 255))
    return out


@pytest.mark.parametrize("endpoint, body, word", BAD, ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(client, endpoint, body, word):
    body = _materialize(body)
    if isinstance(body, str):
        r = client.post(PATHS[endpoint], content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(PATHS[endpoint], json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert word.lower() in r.text.lower(), r.text[:500]
    assert len(r.text) < 20_000                       # a 100k prompt is not echoed back


def test_every_bad_request_leaves_the_kept_alive_connection_usable(server):
    """After each refusal the same connection carries the next request (uvicorn drops a connection after
    an exception escapes the app, so every error must be an answer, not an exception)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    sock = None
    try:
        for endpoint, body, _ in BAD:
            body = _materialize(body)
            raw = body if isinstance(body, str) else json.dumps(body)
            conn.request("POST", PATHS[endpoint], body=raw.encode("utf-8", "surrogatepass"),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            assert 400 <= r.status < 500 and r.getheader("connection") != "close", (endpoint, body, r.status)
            sock = sock or conn.sock
            conn.request("GET", "/sdapi/v1/progress?skip_current_image=true")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["state"]["job_count"] == 0
            assert conn.sock is sock, (endpoint, body)        # still the first connection: never reopened
    finally:
        conn.close()


def test_hostile_infotext_in_png_info(client, server):
    """A 325-byte PNG whose zTXt `parameters` holds 120,000 letters froze the server for 64 s (quadratic
    parsing on the event loop). Over max_infotext_chars it is refused unparsed; under it, it parses in one
    pass, and /progress answers meanwhile."""
    def zpng(text: str) -> str:
        from PIL import PngImagePlugin
        meta = PngImagePlugin.PngInfo()
        meta.add_text("parameters", text, zip=True)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=meta)
        return base64.b64encode(buf.getvalue()).decode()

    huge = zpng("a" * 120_000)
    assert len(base64.b64decode(huge)) < 1000
    r = client.post("/sdapi/v1/png-info", json={"image": huge})
    assert r.status_code == 422 and r.json()["field"] == "image" and "max_infotext_chars=65536" in r.text
    hostile = "a prompt\n" + "a" * 30_000 + "\n" + 'Steps: "x, ' * 3_000
    results = {}

    def post():
        with httpx.Client(base_url=server.url, timeout=30) as c:    # a hang guard, not a measurement
            results["r"] = [c.post("/sdapi/v1/png-info", json={"image": zpng(hostile)}) for _ in range(3)]

    t = threading.Thread(target=post)
    t.start()
    while t.is_alive():                                            # the event loop keeps answering
        assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).status_code == 200
        t.join(0.05)
    for r in results["r"]:
        assert r.status_code == 200, r.text
        assert r.json()["info"] == hostile and r.json()["parameters"]["Prompt"].startswith("a prompt\naaa")


def test_body_over_the_limit_and_then_a_good_request(client, server_limits):
    big = "x" * (server_limits["max_body_bytes"] + 10)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": big})
    assert r.status_code == 422 and "max_body_bytes" in r.text
    def chunks():                                     # no Content-Length: counted as it streams
        for _ in range(5):
            yield b"x" * (server_limits["max_body_bytes"] // 4)
    r = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "max_body_bytes" in r.text
    _, info = txt2img(client, prompt="fine", seed=9)  # the server is still up and well
    assert info["all_seeds"] == [9]


# ------------------------------------------------------------------------------------------ web UI helpers
def test_compare_grid_and_denoising_video(client, tmp_path):
    r = client.post("/diffusekit/v1/compare", json={"prompt": "grid", "seed": 8, "steps": 2, "width": 32, "height": 32,
                                                    "samplers": ["Euler", "DPM++ 2M Karras"], "y_axis": "steps",
                                                    "y_values": [2, 3]})
    assert r.status_code == 200, r.text
    body = r.json()
    grid = png(body["image"])
    assert body["info"]["cells"] == body["info"]["cells_done"] == 4 and body["info"]["seed"] == 8
    assert all("Seed: 8," in t for t in body["info"]["infotexts"])
    assert grid.width > 2 * 192 and grid.height > 2 * 192          # 2x2 tiles, enlarged for the labels
    data, info = txt2img(client, prompt="video", seed=2, steps=4, save_process=True, batch_size=2)
    assert info["video_available"] is True
    r = client.get("/diffusekit/v1/video")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.content[4:8] == b"ftyp"
    assert r.headers["x-seed"] == "3"                               # the last image of the job
    from diffusekit.media.video import read_video_info
    (tmp_path / "v.mp4").write_bytes(r.content)
    assert read_video_info(tmp_path / "v.mp4")["frames"] == 4       # one frame per step
    g = client.get("/diffusekit/v1/video", params={"format": "gif"})
    assert g.status_code == 200 and g.content[:6] == b"GIF89a"
    assert client.get("/diffusekit/v1/video", params={"format": "avi"}).status_code == 422


def test_compare_seed_rows_use_their_own_seeds(client):
    """y_axis "seed": each row its seed (the grid once gave every row the first row's seed)."""
    r = client.post("/diffusekit/v1/compare", json={"prompt": "g", "seed": 8, "steps": 1, "width": 32, "height": 32,
                                                    "samplers": ["Euler"], "y_axis": "seed", "y_values": [4, 9]})
    assert r.status_code == 200, r.text
    texts = r.json()["info"]["infotexts"]
    assert "Seed: 4," in texts[0] and "Seed: 9," in texts[1]
    assert r.json()["info"]["rows"] == ["4", "9"] and r.json()["info"]["y_axis"] == "seed"


def test_web_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and 'id="generate"' in r.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/%2e%2e/app.py").status_code == 404


# ------------------------------------------------------------------------------------------ safety
def test_serve_binds_loopback_by_default():
    from diffusekit.interfaces.server import serve
    params = inspect.signature(serve).parameters
    assert params["host"].default == "127.0.0.1" and params["port"].default == 7860


def test_api_auth(models_dir, serve_in_thread):
    from diffusekit.interfaces.server import create_app
    app = create_app(model=None, models_dir=str(models_dir), api_auth="alice:s3cret,bob:hunter2")
    with serve_in_thread(app) as url:
        for path in ("/sdapi/v1/samplers", "/", "/docs", "/sdapi/v1/progress", "/static/app.js"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
        assert httpx.get(url + "/sdapi/v1/samplers", auth=("alice", "wrong")).status_code == 401
        assert httpx.get(url + "/sdapi/v1/samplers", auth=("mallory", "s3cret")).status_code == 401
        assert httpx.get(url + "/sdapi/v1/samplers", headers={"Authorization": "Basic %%%"}).status_code == 401
        assert httpx.get(url + "/sdapi/v1/samplers", auth=("bob", "hunter2")).status_code == 200
        flags = httpx.get(url + "/sdapi/v1/cmd-flags", auth=("alice", "s3cret"))
        assert flags.status_code == 200 and flags.json()["api_auth"] is True and "s3cret" not in flags.text
        r = httpx.post(url + "/sdapi/v1/txt2img", json=TINY, auth=("alice", "s3cret"), timeout=30)
        assert r.status_code == 409 and "no model is selected" in r.text             # nothing loaded yet
        r = httpx.get(url + "/diffusekit/v1/video", auth=("alice", "s3cret"))
        assert r.status_code == 404 and "save_process" in r.text
    with pytest.raises(ValueError, match="api_auth"):
        create_app(model=None, api_auth="no-colon-here")


def test_an_unexpected_error_in_a_job_is_a_500_and_the_server_stays_up(models_dir, serve_in_thread):
    """A bug inside a job (simulated by replacing the generation function) is reported, not fatal."""
    from diffusekit.interfaces.server import create_app
    app = create_app(model=None, models_dir=str(models_dir), preload=False)

    def broken(ctx, p, **kw):
        raise RuntimeError("simulated bug")

    app.state.service.generate = broken
    with serve_in_thread(app) as url:
        for _ in range(2):
            r = httpx.post(url + "/sdapi/v1/txt2img", json=TINY, timeout=30)
            assert r.status_code == 500 and "RuntimeError: simulated bug" in r.text
        assert httpx.get(url + "/sdapi/v1/progress").status_code == 200
        assert app.state.worker.jobs_done == 2
