"""ComfyUI's HTTP + websocket API on the diffusekit server (real uvicorn on 127.0.0.1, tiny SD1 checkpoints),
driven as ComfyUI's own script_examples/websockets_api_example.py drives ComfyUI: open /ws?clientId=, POST
/prompt with that client_id, read messages until `executing` with node None, then GET /history/{id} and
/view for every image. Also: /object_info, uploads, the queue, /interrupt, auth, and bad input."""
import base64
import io
import json
import struct
import time
import urllib.parse
import uuid

import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
ws_client = pytest.importorskip("websockets.sync.client", reason="the websocket tests need `websockets`")

from diffusekit.interfaces.server import create_app  # noqa: E402
from diffusekit.pipelines.infotext import parse_infotext  # noqa: E402


def graph(seed=1, steps=3, size=32, ckpt="tiny-a.safetensors", text="a photo of a cat", prefix="ComfyUI"):
    """ComfyUI's default txt2img graph (the one websockets_api_example.py posts), at a tiny size."""
    return {
        "3": {"class_type": "KSampler", "inputs": {"cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0],
                                                   "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "euler",
                                                   "scheduler": "normal", "seed": seed, "steps": steps}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": size, "width": size}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": text}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


@pytest.fixture(scope="module")
def comfy(models_dir, tmp_path_factory, serve_in_thread):
    root = tmp_path_factory.mktemp("comfy")
    app = create_app(model="tiny-a", models_dir=str(models_dir), queue_size=1, max_steps=5000,
                     output_dir=root / "output", input_dir=root / "input")
    with serve_in_thread(app) as url:
        yield url, root


@pytest.fixture()
def client(comfy):
    with httpx.Client(base_url=comfy[0], timeout=60) as c:
        yield c


def ws_url(url: str, client_id: str) -> str:
    return url.replace("http://", "ws://") + f"/ws?clientId={client_id}"


def queue_prompt(client, prompt, client_id=None, **extra):
    body = {"prompt": prompt, **({"client_id": client_id} if client_id else {}), **extra}
    r = client.post("/prompt", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def get_images(ws, client, prompt_id):
    """websockets_api_example.py's get_images: wait for the end, then fetch the outputs via history + view."""
    messages, previews = [], 0
    while True:
        out = ws.recv(timeout=60)
        if isinstance(out, str):
            message = json.loads(out)
            messages.append(message)
            if message["type"] == "executing" and message["data"]["node"] is None \
                    and message["data"]["prompt_id"] == prompt_id:
                break
        else:
            assert struct.unpack(">II", out[:8]) == (1, 1) and out[8:10] == b"\xff\xd8"   # preview: JPEG
            previews += 1
    history = client.get(f"/history/{prompt_id}").json()[prompt_id]
    images = {}
    for node_id, node_output in history["outputs"].items():
        images[node_id] = [client.get("/view?" + urllib.parse.urlencode(
            {"filename": im["filename"], "subfolder": im["subfolder"], "type": im["type"]})).content
            for im in node_output.get("images", [])]
    return images, messages, previews, history


def test_the_websocket_client_of_comfyuis_example_gets_its_images(comfy, client):
    url, root = comfy
    client_id = str(uuid.uuid4())
    with ws_client.connect(ws_url(url, client_id)) as ws:
        hello = json.loads(ws.recv(timeout=10))
        ws.send("hello")                                        # clients may talk: ignored, socket stays
        ws.send(b"\x00\x01")
        assert hello["type"] == "status" and hello["data"]["sid"] == client_id
        assert hello["data"]["status"]["exec_info"]["queue_remaining"] >= 0
        queued = queue_prompt(client, graph(seed=8566257), client_id)
        assert queued["node_errors"] == {} and isinstance(queued["number"], (int, float))
        images, messages, previews, history = get_images(ws, client, queued["prompt_id"])
    kinds = [m["type"] for m in messages if m["type"] not in ("status", "progress")]
    assert kinds[:2] == ["execution_start", "execution_cached"]
    assert kinds[-3:] == ["executed", "execution_success", "executing"]
    executed = next(m["data"] for m in messages if m["type"] == "executed")
    assert executed["node"] == "9" and executed["output"]["images"][0]["type"] == "output"
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert [p["value"] for p in progress] == [1, 2, 3] and {p["max"] for p in progress} == {3}
    assert previews == 3                                        # one binary preview per step, to this client
    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    assert history["prompt"][1] == queued["prompt_id"] and history["prompt"][4] == ["9"]
    assert history["prompt"][3]["client_id"] == client_id
    (png,) = images["9"]
    img = Image.open(io.BytesIO(png))
    assert img.size == (32, 32)
    assert json.loads(img.info["prompt"])["3"]["inputs"]["seed"] == 8566257
    assert json.loads(img.info["workflow"])["version"] == 0.4
    info = parse_infotext(img.info["parameters"])
    assert info["Seed"] == "8566257" and info["Model"] == "tiny-a" and info["Negative prompt"] == "bad hands"
    assert (root / "output" / history["outputs"]["9"]["images"][0]["filename"]).is_file()


def test_object_info_describes_every_node_as_comfyui(client):
    info = client.get("/object_info").json()
    for name in ("CheckpointLoaderSimple", "CLIPTextEncode", "CLIPSetLastLayer", "EmptyLatentImage", "KSampler",
                 "KSamplerAdvanced", "VAEDecode", "VAEEncode", "VAEEncodeForInpaint", "SetLatentNoiseMask", "LoadImage",
                 "LoadImageMask", "SaveImage", "PreviewImage", "LatentUpscale", "LatentUpscaleBy", "ImageScale",
                 "LoraLoader", "ConditioningCombine", "ConditioningSetArea", "ConditioningZeroOut", "SaveDenoisingVideo",
                 "VAEDecodeTiled", "VAEEncodeTiled"):
        assert name in info, name
    tiled = info["VAEDecodeTiled"]
    assert tiled["input_order"]["required"] == ["samples", "vae", "tile_size", "overlap", "temporal_size",
                                                "temporal_overlap"]
    assert tiled["input"]["required"]["tile_size"] == ["INT", {"default": 512, "min": 64, "max": 4096, "step": 32}]
    ks = info["KSampler"]
    assert ks["input_order"]["required"] == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                             "negative", "latent_image", "denoise"]
    assert ks["input"]["required"]["steps"] == ["INT", {"default": 20, "min": 1, "max": 10000}]
    assert "dpmpp_2m" in ks["input"]["required"]["sampler_name"][0]
    assert ks["input"]["required"]["scheduler"][0][:3] == ["simple", "sgm_uniform", "karras"]
    assert ks["output"] == ["LATENT"] and ks["output_node"] is False and ks["category"] == "sampling"
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert {"tiny-a.safetensors", "more/tiny-b.safetensors"} <= set(ckpts)
    assert info["SaveImage"]["output_node"] is True and info["SaveImage"]["input"]["hidden"]["prompt"] == "PROMPT"
    assert client.get("/object_info/KSamplerAdvanced").json()["KSamplerAdvanced"]["display_name"] == "KSampler (Advanced)"
    assert client.get("/object_info/NoSuchNode").json() == {}
    assert client.get("/api/object_info/KSampler").json()["KSampler"] == ks          # ComfyUI's /api prefix


def test_listings(client):
    stats = client.get("/system_stats").json()
    assert {"system", "devices"} <= set(stats) and stats["devices"][0]["type"] == "cpu"
    assert client.get("/embeddings").json() == []
    assert "tiny-a.safetensors" in client.get("/models/checkpoints").json()
    assert "checkpoints" in client.get("/models").json()
    r = client.get("/models/unknown")
    assert r.status_code == 404 and "checkpoints" in r.json()["error"]["message"]
    assert client.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}


def png_bytes(color=(200, 30, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_then_img2img_with_load_image(comfy, client):
    url, root = comfy
    up = client.post("/upload/image", files={"image": ("red.png", png_bytes(), "image/png")})
    assert up.status_code == 200 and up.json() == {"name": "red.png", "subfolder": "", "type": "input"}
    again = client.post("/upload/image", files={"image": ("red.png", png_bytes(), "image/png")})
    assert again.json()["name"] == "red.png"                               # same content: not stored twice
    other = client.post("/upload/image", files={"image": ("red.png", png_bytes((0, 0, 255)), "image/png")})
    assert other.json()["name"] == "red (1).png"
    sub = client.post("/upload/image", files={"image": ("b.png", png_bytes(), "image/png")}, data={"subfolder": "mine"})
    assert sub.json() == {"name": "b.png", "subfolder": "mine", "type": "input"}
    g = graph(steps=4)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "red (1).png"}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    g["3"]["inputs"].update(latent_image=["11", 0], denoise=0.5)
    pid = queue_prompt(client, g)["prompt_id"]
    history = wait_history(client, pid)
    assert history["status"]["status_str"] == "success"
    assert "mine/b.png" in client.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0]


def wait_history(client, prompt_id, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = client.get(f"/history/{prompt_id}").json()
        if prompt_id in h:
            return h[prompt_id]
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} did not finish")


BAD_BODIES = [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "no_prompt"),
    (b'{"client_id": "x"}', "no_prompt"),
    (b'{"prompt": "hello"}', "invalid_prompt"),
    (b'{"prompt": {}}', "invalid_prompt"),
    (b'{"prompt": {"1": {"class_type": "Nope", "inputs": {}}}}', "invalid_prompt"),
    (b'{"prompt": {"1": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}}',
     "prompt_outputs_failed_validation"),
]


@pytest.mark.parametrize("body,kind", BAD_BODIES)
def test_bad_prompts_are_400_in_comfyuis_shape(client, body, kind):
    r = client.post("/prompt", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == kind and "node_errors" in r.json()


@pytest.mark.parametrize("node,name,value,kind", [
    ("3", "steps", 10 ** 9, "value_bigger_than_max"),
    ("3", "steps", 5001, "value_bigger_than_max"),              # the server's max_steps=5000
    ("3", "seed", "lots", "invalid_input_type"),
    ("3", "cfg", [1, 2, 3], "bad_linked_input"),
    ("5", "width", 10 ** 6, "value_bigger_than_max"),
    ("4", "ckpt_name", "../../../etc/passwd", "value_not_in_list"),
    ("4", "ckpt_name", "/work/secret.safetensors", "value_not_in_list"),
    ("9", "filename_prefix", {"a": 1}, "invalid_input_type"),
])
def test_bad_values_name_the_node_and_input(client, node, name, value, kind):
    g = graph()
    g[node]["inputs"][name] = value
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 400
    (err,) = r.json()["node_errors"][node]["errors"]
    assert err["type"] == kind and err["extra_info"]["input_name"] == name


def test_path_tricks_are_refused(comfy, client):
    url, root = comfy
    (root / "secret.txt").write_text("no")
    for q in ({"filename": "../secret.txt"}, {"filename": "secret.txt", "subfolder": ".."},
              {"filename": "/etc/passwd"}, {"filename": "x.png", "type": "../"}, {"filename": "..", "type": "input"}):
        r = client.get("/view", params=q)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_path", q
    assert client.get("/view", params={"filename": "missing.png"}).status_code == 404
    r = client.post("/upload/image", files={"image": ("../evil.png", png_bytes(), "image/png")})
    assert r.status_code == 400 or r.json()["name"] == "evil.png"         # the form parser may keep the base name
    assert not (root / "evil.png").exists() and not (root.parent / "evil.png").exists()
    for name, data in (("ok.png", {"subfolder": "../../x"}), ("ok.png", {"type": "etc"})):
        r = client.post("/upload/image", files={"image": (name, png_bytes(), "image/png")}, data=data)
        assert r.status_code == 400, (name, data)
    r = client.post("/upload/image", files={"image": ("fake.png", b"not an image", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_image"
    assert client.post("/upload/image", content=b"x").status_code == 400
    g = graph()
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "../secret.txt"}}
    g["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}
    r = client.post("/prompt", json={"prompt": g})          # ComfyUI runs the good output (9), reports node 10
    assert r.status_code == 200 and r.json()["node_errors"]["10"]["errors"][0]["type"] == "value_not_in_list"
    assert wait_history(client, r.json()["prompt_id"])["status"]["status_str"] == "success"
    r = client.post("/prompt", json={"prompt": {k: g[k] for k in ("10", "11")}})
    assert r.status_code == 400 and r.json()["node_errors"]["10"]["dependent_outputs"] == ["11"]
    assert not list((root / "output").glob("**/evil*")) and client.get("/system_stats").status_code == 200


def test_queue_delete_interrupt_and_a_full_queue(comfy, client):
    url, root = comfy
    long = queue_prompt(client, graph(steps=4000, size=64, seed=2), client_id="owner")["prompt_id"]
    deadline = time.monotonic() + 60
    while [i[1] for i in client.get("/queue").json()["queue_running"]] != [long]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with ws_client.connect(ws_url(url, "owner")) as ws:                   # the owner reconnects mid-prompt
        assert json.loads(ws.recv(timeout=10))["type"] == "status"
        now = json.loads(ws.recv(timeout=10))
        assert now["type"] == "executing" and now["data"]["prompt_id"] == long and now["data"]["node"]
    job = client.get("/sdapi/v1/progress").json()["state"]["job"]       # one worker for both APIs
    assert job == f"workflow {long[:8]}"
    waiting = queue_prompt(client, graph(seed=3))["prompt_id"]
    q = client.get("/queue").json()
    assert [i[1] for i in q["queue_running"]] == [long] and [i[1] for i in q["queue_pending"]] == [waiting]
    full = client.post("/prompt", json={"prompt": graph(seed=4)})           # queue_size=1: one may wait
    assert full.status_code == 503 and full.json()["error"]["type"] == "queue_full"
    assert "Retry-After" in full.headers
    assert client.post("/queue", json={"delete": [waiting]}).status_code == 200
    assert client.get("/queue").json()["queue_pending"] == []
    assert client.post("/interrupt", json={"prompt_id": "someone-else"}).status_code == 200
    assert client.get("/queue").json()["queue_running"]                    # another prompt's id: not stopped
    assert client.post("/interrupt").status_code == 200
    history = wait_history(client, long)
    assert history["status"]["status_str"] == "error"
    assert history["status"]["messages"][-1][0] == "execution_interrupted"
    assert waiting not in client.get("/history").json()
    assert client.post("/history", json={"delete": [long]}).status_code == 200
    assert long not in client.get("/history").json()
    assert client.post("/queue", content=b"{bad").status_code == 400


def test_basic_auth_covers_the_comfy_routes_and_the_websocket(models_dir, tmp_path, serve_in_thread):
    app = create_app(model="tiny-a", models_dir=str(models_dir), api_auth="me:secret", output_dir=tmp_path / "o",
                     input_dir=tmp_path / "i")
    token = "Basic " + base64.b64encode(b"me:secret").decode()
    with serve_in_thread(app) as url:
        assert httpx.post(url + "/prompt", json={"prompt": graph()}).status_code == 401
        assert httpx.get(url + "/object_info").status_code == 401
        with pytest.raises(Exception):
            with ws_client.connect(ws_url(url, "x"), open_timeout=10) as ws:
                ws.recv(timeout=5)
        with ws_client.connect(ws_url(url, "y"), additional_headers={"Authorization": token}) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "status"
        r = httpx.post(url + "/api/prompt", json={"prompt": graph(steps=1)}, headers={"Authorization": token})
        assert r.status_code == 200
