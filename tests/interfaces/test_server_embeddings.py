"""Textual-inversion embeddings over real HTTP (uvicorn in a thread, the tiny SD1 checkpoint of conftest):
`serve --embeddings-dir`, A1111's GET /sdapi/v1/embeddings (loaded / skipped by the model's text-encoder
width), POST /sdapi/v1/refresh-embeddings, and a prompt naming an embedding (its `TI hashes` in the info)."""
import json

import pytest
import torch

from diffusekit.models import read_family

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from safetensors.torch import save_file  # noqa: E402

from diffusekit.interfaces.server import create_app  # noqa: E402

TINY = dict(width=32, height=32, steps=3, cfg_scale=5.0, seed=7, sampler_name="Euler")


def write_embedding(path, n: int, width: int, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.randn(n, width, generator=torch.Generator().manual_seed(seed))}, path)


@pytest.fixture(scope="module")
def setup(models_dir, tmp_path_factory, serve_in_thread):
    width = read_family(models_dir / "tiny-a.safetensors").text_encoders[0].config.width
    folder = tmp_path_factory.mktemp("embeddings")
    write_embedding(folder / "shinystyle.safetensors", 2, width, 1)
    write_embedding(folder / "bigmodel.safetensors", 3, 768, 2)        # an SD1-sized embedding: skipped here
    app = create_app(model="tiny-a", models_dir=models_dir, embeddings_dir=folder, queue_size=2, max_steps=20)
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, timeout=90) as client:
            yield client, folder, width


def test_embeddings_in_prompts_listing_and_refresh(setup):
    client, folder, width = setup
    plain = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "a red circle"}).json()
    used = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "a red circle, shinystyle"})
    assert used.status_code == 200, used.text
    info = json.loads(used.json()["info"])
    assert "TI hashes" in info["infotexts"][0] and "shinystyle: " in info["extra_generation_params"]["TI hashes"]
    assert "TI hashes" not in json.loads(plain["info"])["infotexts"][0]
    assert used.json()["images"][0] != plain["images"][0]              # the vectors changed the conditioning

    listing = client.get("/sdapi/v1/embeddings").json()
    assert listing["loaded"] == {"shinystyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                "shape": width, "vectors": 2}}
    assert set(listing["skipped"]) == {"bigmodel"} and listing["skipped"]["bigmodel"]["shape"] == 768

    write_embedding(folder / "later.safetensors", 1, width, 3)
    assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
    assert set(client.get("/sdapi/v1/embeddings").json()["loaded"]) == {"shinystyle", "later"}
    assert client.get("/sdapi/v1/cmd-flags").json()["embeddings_dir"] == str(folder.resolve())


def test_a_missing_embeddings_folder_is_refused(models_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="embeddings_dir"):
        create_app(model="tiny-a", models_dir=models_dir, embeddings_dir=tmp_path / "nope")
