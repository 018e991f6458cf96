"""The web UI's Workflow tab in a real headless Chromium: load an API-format workflow file (or a PNG that
carries one), run it through the ComfyUI API with live progress and previews over the websocket, see the
images and the denoising video. Skipped where Playwright or Chromium is missing, like test_webui_browser."""
import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_servers = _load("_wf_browser_servers", "conftest.py")              # ServerProcess, SERVER_LIMITS
_browser = _load("_wf_browser_page", "test_webui_browser.py")       # open_page, ARTIFACTS
ARTIFACTS, open_page = _browser.ARTIFACTS, _browser.open_page

EXAMPLES = ARTIFACTS.parent / "examples" / "workflows"


@pytest.fixture(scope="module")
def comfy_server(models_dir, tmp_path_factory):
    for dep in ("fastapi", "uvicorn", "websockets"):
        pytest.importorskip(dep)
    root = tmp_path_factory.mktemp("wf-browser")
    srv = _servers.ServerProcess(root / "server.log", model="tiny-a", models_dir=str(models_dir), queue_size=3,
                                 output_dir=str(root / "output"), input_dir=str(root / "input"),
                                 **_servers.SERVER_LIMITS)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def page(comfy_server):
    with open_page(comfy_server.url + "/") as pg:
        pg.click("#tab-workflow")
        pg.wait_for_function("document.getElementById('wf-socket').textContent === 'connected'", timeout=30_000)
        yield pg


def two_samplers(steps: int = 6) -> dict:
    """The shipped seeds' workflow (Euler/Normal then DPM++ 2M/Karras, process video at 1 fps), shorter."""
    g = json.loads((EXAMPLES / "two_samplers_video.json").read_text())
    g["5"]["inputs"].update(steps=steps, end_at_step=steps // 2)
    g["6"]["inputs"].update(steps=steps, start_at_step=steps // 2)
    return g


def test_load_a_workflow_file_run_it_and_watch_it(page, tmp_path):
    path = tmp_path / "workflow_api.json"
    path.write_text(json.dumps(two_samplers()))
    page.set_input_files("#wf-file", str(path))
    page.wait_for_function("document.getElementById('wf-json').value.includes('KSamplerAdvanced')")
    page.click("#wf-run")
    page.wait_for_selector("#wf-outputs figure[data-node='8'] img", timeout=90_000)
    page.wait_for_selector("#wf-outputs figure[data-node='9'] video", timeout=90_000)
    page.wait_for_function("document.getElementById('wf-progress-text').textContent === 'done'", timeout=90_000)
    assert page.eval_on_selector("#wf-outputs figure[data-node='8'] img", "i => i.complete && i.naturalWidth") == 64
    page.wait_for_function("document.querySelector('#wf-outputs video').readyState >= 2", timeout=30_000)
    log = page.inner_text("#wf-log")
    assert "node 5 KSamplerAdvanced" in log and "node 6 KSamplerAdvanced" in log and "execution_success" in log
    assert page.get_attribute("#wf-preview", "src").startswith("blob:")     # binary preview frames arrived
    assert page.eval_on_selector("#wf-progress-fill", "e => e.style.width") == "100%"
    assert page.is_hidden("#wf-error") and page.errors == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui-workflow.png"), full_page=True)


def test_a_png_brings_its_workflow_and_a_bad_one_names_the_node(page, comfy_server, tmp_path):
    out = comfy_server.log_path.parent / "output"
    png = sorted(out.glob("two_samplers_*.png"))[-1]                     # written by the previous test
    shutil.copy(png, tmp_path / "from_png.png")
    page.set_input_files("#wf-file", str(tmp_path / "from_png.png"))
    page.wait_for_function("document.getElementById('wf-json').value.includes('SaveDenoisingVideo')")
    bad = copy.deepcopy(two_samplers())
    bad["6"]["inputs"]["scheduler"] = "Karras"
    page.fill("#wf-json", json.dumps(bad))
    page.click("#wf-run")
    page.wait_for_selector("#wf-error:not([hidden])", timeout=30_000)
    text = page.inner_text("#wf-error")
    assert "node 6 (KSamplerAdvanced)" in text and "'Karras' not in" in text and "karras" in text
    editor = tmp_path / "editor.json"
    editor.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    page.set_input_files("#wf-file", str(editor))
    page.wait_for_function("document.getElementById('wf-error').textContent.includes('Save (API Format)')")
    assert page.errors == []
