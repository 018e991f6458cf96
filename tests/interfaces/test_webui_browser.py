"""The web UI driven in a real headless Chromium (Debian's `chromium` through Playwright for Python).

Skipped, with the reason, where Playwright or the browser is missing. The screenshot is kept in
test-artifacts/webui.png (git-ignored; CI uploads it)."""
import contextlib
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def open_page(url: str):
    """A headless Chromium page at `url`, its uncaught script errors collected in `page.errors` (skips the
    test where Playwright or the browser is missing)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                                                 "(pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 1000})
            pg.errors = []
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            pg.goto(url)
            yield pg
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(server):
    with open_page(server.url + "/") as pg:
        pg.wait_for_function("document.querySelectorAll('#sampler option').length > 0", timeout=30_000)
        yield pg


def test_type_a_prompt_generate_and_see_the_image_with_its_seed(page):
    options = page.eval_on_selector_all("#sampler option", "els => els.map(e => e.value)")
    assert {"Euler", "Euler a", "DPM++ 2M"} <= set(options)                 # filled from /sdapi/v1/samplers
    assert "Karras" in page.eval_on_selector_all("#scheduler option", "els => els.map(e => e.value)")
    assert page.input_value("#width") == "512"                              # the tiny SD1 model's native size
    # the model's defaults (/diffusekit/v1/info): tiny-a has no card, so A1111's, as the CLI and the API use
    assert (page.input_value("#sampler"), page.input_value("#steps"), page.input_value("#cfg_scale")) == \
        ("DPM++ 2M", "20", "7")
    page.fill("#prompt", "a red circle in the browser")
    page.select_option("#sampler", "Euler")
    page.fill("#steps", "4")
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.fill("#seed", "4242")
    page.click("#generate")
    fig = page.wait_for_selector("#gallery figure[data-seed='4242']", timeout=60_000)
    assert "Seed: 4242" in fig.inner_text()
    info = fig.query_selector("pre.infotext").inner_text()
    assert info.startswith("a red circle in the browser") and "Seed: 4242," in info and "Sampler: Euler," in info
    assert page.eval_on_selector("#gallery figure[data-seed='4242'] img",
                                 "img => img.complete && img.naturalWidth") == 32
    page.wait_for_selector("#video-box:not([hidden])", timeout=30_000)       # the denoising video of that image
    assert "/diffusekit/v1/video" in page.get_attribute("#video", "src")
    page.wait_for_function("document.getElementById('video').readyState >= 2", timeout=30_000)  # it decodes
    assert page.is_hidden("#error")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)
    assert (ARTIFACTS / "webui.png").stat().st_size > 10_000

    page.click("#seed-dice")                                                 # dice: a random seed
    assert page.input_value("#seed") == "-1"
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure').length >= 2", timeout=60_000)
    newest = page.query_selector("#gallery figure")                          # newest first
    seed = newest.get_attribute("data-seed")
    assert seed.isdigit() and seed != "4242" and f"Seed: {seed}," in newest.inner_text()
    assert page.errors == []


def test_live_preview_draws_with_shapes_turbo_as_you_type(page):
    """The live mode: typing sends a debounced 1-step txt2img to the shipped few-step model (LCM, CFG 1) while
    the selected model stays selected; the newest prompt wins."""
    selected = page.input_value("#model")
    page.check("#live")
    page.fill("#seed", "5")
    page.type("#prompt", "a red circle, blue background", delay=5)
    page.wait_for_function("document.getElementById('live-info').textContent.includes('blue background')",
                           timeout=60_000)
    info = page.inner_text("#live-info")
    assert "Steps: 1," in info and "Sampler: LCM," in info and "Model: shapes-turbo" in info and "Seed: 5," in info
    assert page.eval_on_selector("#live-image", "img => img.complete && img.naturalWidth") == 64
    page.select_option("#live-steps", "2")
    page.wait_for_function("document.getElementById('live-info').textContent.includes('Steps: 2,')", timeout=60_000)
    assert page.input_value("#model") == selected
    page.uncheck("#live")
    page.fill("#prompt", "")
    assert page.errors == []


def test_compare_samplers_tab_renders_the_grid(page):
    for field, value in {"width": "32", "height": "32", "steps": "2", "seed": "7"}.items():   # the shared fields
        page.eval_on_selector(f"#{field}", f"e => e.value = '{value}'")
    page.click("#tab-compare")
    page.eval_on_selector_all("#compare-samplers input", "els => els.forEach((e, i) => e.checked = i < 2)")
    page.select_option("#compare-y", "steps")
    page.fill("#compare-values", "2, 3")
    page.click("#compare-run")
    page.wait_for_selector("#compare-image:not([hidden])", timeout=60_000)
    assert page.eval_on_selector("#compare-image", "img => img.complete && img.naturalWidth") > 2 * 192
    assert page.inner_text("#compare-info").startswith("seed 7 · 4/4 cells")
    page.screenshot(path=str(ARTIFACTS / "webui-compare.png"), full_page=True)


def test_img2img_tab_with_an_uploaded_image(page, tmp_path):
    from PIL import Image
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(init)
    page.click("#tab-img2img")
    assert page.is_visible("#init_image")
    page.set_input_files("#init_image", str(init))
    page.fill("#prompt", "repaint it")
    for field, value in {"width": "32", "height": "32", "steps": "4", "batch_size": "1", "n_iter": "1"}.items():
        page.fill(f"#{field}", value)
    page.fill("#denoising_strength", "0.6")
    page.fill("#seed", "99")
    before = page.eval_on_selector_all("#gallery figure", "els => els.length")
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#gallery figure').length > {before}", timeout=60_000)
    fig = page.query_selector("#gallery figure")
    assert fig.get_attribute("data-seed") == "99"
    assert "Denoising strength: 0.6" in fig.query_selector("pre.infotext").inner_text()
    assert page.errors == []


def test_api_docs_render_offline(page, server):
    """Swagger UI at /docs draws the API from files this server serves: every request that would leave
    the server (a CDN) is refused and recorded, and none is made."""
    outside = []

    def only_this_server(route):
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    docs = page.context.browser.new_page()
    try:
        docs.route("**/*", only_this_server)
        docs.goto(server.url + "/docs")
        docs.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=30_000)
        paths = docs.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
        assert "/sdapi/v1/txt2img" in paths and "/diffusekit/v1/compare" in paths
        assert outside == []
        docs.screenshot(path=str(ARTIFACTS / "api-docs.png"))
    finally:
        docs.close()
