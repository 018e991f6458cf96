"""A real server on loopback, in its own process, serving tiny random-weight checkpoints from a models folder."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diffusekit.models.clip import CLIPTextModel
from diffusekit.models.families import tiny_family
from diffusekit.models.loading import save_checkpoint
from diffusekit.models.unet import UNetModel
from diffusekit.models.vae import AutoencoderKL

SERVER_LIMITS = dict(max_steps=100, max_batch_size=4, max_images=12, max_body_bytes=2 * 2**20, max_pixel_steps=2**25)


def save_tiny_sd1(path: Path, seed: int) -> Path:
    """A tiny SD 1.x checkpoint with small random weights everywhere (LDM zero-inits the output convolutions,
    which would make the prompt irrelevant), written the way users hand checkpoints to the server."""
    fam = tiny_family("sd1")
    torch.manual_seed(seed)
    parts = {"unet": UNetModel(fam.unet), "vae": AutoencoderKL(fam.vae),
             "text_encoders": [CLIPTextModel(fam.text_encoders[0].config)]}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (parts["unet"], parts["vae"], *parts["text_encoders"]):
            for name, p in m.named_parameters():
                if p.ndim > 1 and "norm" not in name:
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return save_checkpoint(parts, path, family=fam)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    save_tiny_sd1(d / "tiny-a.safetensors", seed=0)
    (d / "more").mkdir()
    save_tiny_sd1(d / "more" / "tiny-b.safetensors", seed=1)
    (d / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}  ")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`diffusekit.interfaces.server.serve(**kwargs)` in a subprocess on 127.0.0.1:<free port>."""

    def __init__(self, log_path: Path, **kwargs):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        kwargs = {"host": "127.0.0.1", "port": self.port, "log_level": "warning", **kwargs}
        code = "import json, sys; from diffusekit.interfaces.server import serve; serve(**json.loads(sys.argv[1]))"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}   # the tiny model gains nothing from threads
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(kwargs)], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait_ready(self, auth=None, model_loaded: bool = True, timeout: float = 120.0) -> None:
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.url + "/diffusekit/v1/info", auth=auth, timeout=5)
                if r.status_code == 200 and (not model_loaded or r.json()["native_size"]):
                    return
            time.sleep(0.3)
        raise RuntimeError(f"the server did not come up in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@pytest.fixture(scope="session")
def server(models_dir, tmp_path_factory):
    """The main server: tiny-a selected, a queue of 3, small limits."""
    for dep in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(dep, reason="the server tests need the 'serve' and 'test' extras")
    srv = ServerProcess(tmp_path_factory.mktemp("logs") / "server.log", model="tiny-a", models_dir=str(models_dir),
                        queue_size=3, **SERVER_LIMITS)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server_limits():
    return dict(SERVER_LIMITS)


@contextlib.contextmanager
def _in_thread(app):
    """Serve `app` with uvicorn in a thread of this process on 127.0.0.1 (an OS-chosen free port)."""
    import uvicorn
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            if time.monotonic() > deadline or not t.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        srv.should_exit = True
        t.join(15)


@pytest.fixture(scope="session")
def serve_in_thread():
    """`with serve_in_thread(app) as url:` real HTTP on loopback without the start-up cost of a process."""
    pytest.importorskip("uvicorn")
    return _in_thread


@pytest.fixture()
def client(server):
    import httpx
    with httpx.Client(base_url=server.url, timeout=90) as c:
        yield c
