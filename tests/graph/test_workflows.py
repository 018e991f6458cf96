"""ComfyUI's published example workflows (default txt2img, 2-pass "hires fix", img2img; the JSONs in
examples/workflows/) and the seeds' two-samplers workflow, run through the executor on the shipped `shapes`
model and a tiny SD 1.x checkpoint; every core node is exercised. The shapes model's images are read back
with the exact shapes detector, so "it ran" also means "it drew what the prompt says"."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.evaluation.shapes_detector import detect
from diffusekit.graph import GraphExecutor, validate_prompt
from diffusekit.pipelines.infotext import parse_infotext

from workflow_files import EXAMPLES, example

pytestmark = pytest.mark.usefixtures("one_thread")


def run(env, prompt, executor=None, **kw):
    check = validate_prompt(prompt, env)
    assert check.ok, check.node_errors or check.error
    events = []
    ex = executor or GraphExecutor(env)
    record = ex.run(prompt, "test", check.outputs, send=lambda e, d: events.append((e, d)), **kw)
    assert record.success or kw.get("should_stop"), record.error
    record.events = events
    return record


def saved(env, record, node):
    return [env.folder(f["type"]) / f["subfolder"] / f["filename"] for f in record.outputs[node]["images"]]


def fast(prompt, steps=8):
    for node in prompt.values():
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            node["inputs"]["steps"] = steps
    return prompt


def test_default_graph_draws_the_prompt_and_embeds_the_workflow(env):
    prompt = example("txt2img")
    record = run(env, prompt)
    (path,) = saved(env, record, "9")
    img = Image.open(path)
    found = detect(img.convert("RGB"))
    assert (found.background, found.objects[0].color, found.objects[0].shape, found.objects[0].position) == \
        ("blue", "red", "circle", "left")
    assert json.loads(img.info["prompt"]) == prompt                       # ComfyUI's `prompt` chunk
    ui = json.loads(img.info["workflow"])                                 # an editor graph built from it
    assert ui["version"] == 0.4 and len(ui["nodes"]) == 7 and len(ui["links"]) == 9
    ks = next(n for n in ui["nodes"] if n["type"] == "KSampler")
    assert ks["widgets_values"] == [8566257, "fixed", 20, 8.0, "euler", "normal", 1.0]
    assert [i["name"] for i in ks["inputs"]] == ["model", "positive", "negative", "latent_image"]
    info = parse_infotext(img.info["parameters"])                         # A1111's infotext too
    assert info["Prompt"] == "a large red circle on the left, blue background"
    assert (info["Steps"], info["Sampler"], info["Schedule type"], info["Seed"], info["Model"]) == \
        ("20", "Euler", "Normal", "8566257", "shapes")
    events = [e for e, _ in record.events if e != "progress"]
    assert events[:2] == ["execution_start", "execution_cached"] and events[-2:] == ["executed", "execution_success"]
    progress = [d for e, d in record.events if e == "progress"]
    assert [p["value"] for p in progress] == list(range(1, 21)) and {p["node"] for p in progress} == {"3"}


def test_a_client_workflow_chunk_is_written_as_given(env):
    ui = {"nodes": [], "links": [], "version": 0.4, "extra": {"mine": True}}
    record = run(env, fast(example("txt2img")), extra_data={"extra_pnginfo": {"workflow": ui}})
    img = Image.open(saved(env, record, "9")[0])
    assert json.loads(img.info["workflow"]) == ui


def test_two_pass_hires_example(env):
    record = run(env, example("hires_two_pass"))
    (low,), (high,) = saved(env, record, "9"), saved(env, record, "12")
    assert Image.open(low).size == (64, 64) and Image.open(high).size == (96, 96)
    for path in (low, high):
        found = detect(Image.open(path).convert("RGB"))
        assert (found.background, found.objects[0].color, found.objects[0].position) == ("purple", "yellow", "top")


def test_img2img_example_keeps_the_layout_and_takes_the_new_prompt(env):
    env.input_dir.mkdir(parents=True)
    shutil.copy(EXAMPLES / "example.png", env.input_dir / "example.png")
    source = detect(Image.open(EXAMPLES / "example.png").convert("RGB"))
    record = run(env, example("img2img"))
    found = detect(Image.open(saved(env, record, "8")[0]).convert("RGB"))
    assert source.background == "blue" and found.background == "black"     # the prompt's background
    assert found.objects[0].position == source.objects[0].position == "left"


def test_the_seeds_two_samplers_workflow_and_its_video(env):
    """Euler + Normal for steps 0-15, DPM++ 2M + Karras for 15-30, same seed; the process at 1 fps."""
    from diffusekit.media.video import read_video_info
    prompt = example("two_samplers_video")
    record = run(env, prompt)
    img = Image.open(saved(env, record, "8")[0])
    found = detect(img.convert("RGB"))
    assert (found.background, found.objects[0].color, found.objects[0].shape) == ("blue", "red", "circle")
    assert "euler normal steps 0-15; dpmpp_2m karras steps 15-30" in img.info["parameters"]
    (video,) = saved(env, record, "9")
    assert video.suffix == ".mp4" and record.outputs["9"]["animated"] == [True]
    info = read_video_info(video)
    assert info["frames"] == 30 and info["fps"] == 1.0
    for fmt in ("gif", "webp"):
        p = copy.deepcopy(prompt)
        p["9"]["inputs"].update(format=fmt, fps=4.0, frames="preview" if fmt == "gif" else "decode")
        out = saved(env, run(env, p), "9")[0]
        anim = Image.open(out)
        assert out.suffix == f".{fmt}" and anim.n_frames == 30
        assert fmt == "webp" or anim.info["duration"] == 250                 # 4 fps


def test_run_only_what_changed(env):
    """ComfyUI's cache: the same graph again runs nothing; a new seed reruns the sampler and what follows."""
    ex = GraphExecutor(env)
    prompt = fast(example("txt2img"))
    first = run(env, prompt, ex)
    again = run(env, copy.deepcopy(prompt), ex)
    assert again.executed == [] and sorted(again.cached) == sorted(first.executed)
    assert again.outputs == first.outputs
    prompt["3"]["inputs"]["seed"] = 5
    third = run(env, prompt, ex)
    assert third.executed == ["3", "8", "9"]
    assert dict(third.events)["execution_cached"]["nodes"] == ["4", "6", "7", "5"]


def test_load_image_reruns_when_the_file_changes(env):
    env.input_dir.mkdir(parents=True)
    shutil.copy(EXAMPLES / "example.png", env.input_dir / "example.png")
    ex = GraphExecutor(env)
    prompt = fast(example("img2img"), 4)
    run(env, prompt, ex)
    Image.new("RGB", (64, 64), (0, 0, 0)).save(env.input_dir / "example.png")
    second = run(env, copy.deepcopy(prompt), ex)
    assert "2" in second.executed and "4" not in second.executed


def _inpaint_graph(encoder: str) -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "shapes"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "holes.png"}},
        "3": {"class_type": "LoadImageMask", "inputs": {"image": "holes.png", "channel": "alpha"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a yellow star", "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "7": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": 6, "cfg": 5.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["5", 0], "negative": ["6", 0],
                                                   "latent_image": ["4", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "inpaint", "images": ["8", 0]}},
    }
    if encoder == "VAEEncodeForInpaint":
        g["4"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["2", 0], "vae": ["1", 2],
                                                                   "mask": ["2", 1], "grow_mask_by": 6}}
    else:
        g["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}}
        g["4"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["10", 0], "mask": ["3", 0]}}
    return g


@pytest.mark.parametrize("encoder", ["VAEEncodeForInpaint", "SetLatentNoiseMask"])
def test_inpainting_repaints_the_masked_area_only(env, encoder):
    """The alpha hole (LoadImage's MASK output / LoadImageMask) is repainted; far from it the image stays."""
    env.input_dir.mkdir(parents=True)
    rgba = Image.open(EXAMPLES / "example.png").convert("RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, 40:] = 0                                         # repaint the right part
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(env.input_dir / "holes.png")
    record = run(env, _inpaint_graph(encoder))
    out = np.asarray(Image.open(saved(env, record, "9")[0]).convert("RGB"), np.float32)
    src = np.asarray(rgba.convert("RGB"), np.float32)
    keep = np.abs(out[:, :24] - src[:, :24]).mean()
    changed = np.abs(out[:, 44:] - src[:, 44:]).mean()
    assert keep < 12 and changed > 3 * keep, (keep, changed)


def _tiny_graph(**nodes) -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"seed": 9, "steps": 3, "cfg": 6.0, "sampler_name": "dpmpp_2m",
                                                   "scheduler": "karras", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    for k, v in nodes.items():
        g[k] = copy.deepcopy(v)
    return g


def _pixels(env, record, node="7") -> np.ndarray:
    return np.asarray(Image.open(saved(env, record, node)[0]), np.float32)


def _rewire(g: dict, node: str, name: str, source: list) -> dict:
    g[node]["inputs"][name] = source
    return g


def test_lora_clip_layer_and_conditioning_nodes_on_a_tiny_sd1(env):
    from diffusekit import Pipeline
    base = run(env, _tiny_graph())
    assert record_type(base) == "temp"
    ref = _pixels(env, base)
    # LoraLoader at strength 0 is the model itself; at 1 it changes the image and leaves the weights as they were
    lora = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "style.safetensors",
                                                   "strength_model": 1.0, "strength_clip": 1.0}}
    g = _tiny_graph(**{"20": lora})
    for n in ("2", "3"):
        _rewire(g, n, "clip", ["20", 1])
    _rewire(g, "5", "model", ["20", 0])
    pipe = env.load_checkpoint("tiny.safetensors")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert np.abs(_pixels(env, run(env, g)) - ref).max() > 0
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    g["20"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    assert np.array_equal(_pixels(env, run(env, g)), ref)
    # CLIPSetLastLayer -2 reads the penultimate layer: a different image, "Clip skip: 2" in the infotext
    g = _tiny_graph(**{"21": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -2}},
                       "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "skip", "images": ["6", 0]}}})
    _rewire(g, "2", "clip", ["21", 0])
    rec = run(env, g)
    assert np.abs(_pixels(env, rec) - ref).max() > 0
    assert parse_infotext(Image.open(saved(env, rec, "7")[0]).info["parameters"])["Clip skip"] == "2"
    # ConditioningCombine of a prompt with itself averages two equal predictions: the same image
    g = _tiny_graph(**{"22": {"class_type": "ConditioningCombine",
                              "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["2", 0]}}})
    _rewire(g, "5", "positive", ["22", 0])
    assert np.abs(_pixels(env, run(env, g)) - ref).max() <= 1
    # ConditioningSetArea over the whole image is no area; over a part it changes the image there
    big = {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}
    ref128 = _pixels(env, run(env, _tiny_graph(**{"4": big})))
    area = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["2", 0], "width": 128, "height": 128,
                                                            "x": 0, "y": 0, "strength": 1.0}}
    g = _tiny_graph(**{"4": big, "23": area})
    _rewire(g, "5", "positive", ["23", 0])
    assert np.abs(_pixels(env, run(env, g)) - ref128).max() <= 1
    g["23"]["inputs"].update(width=64, height=64)
    g["24"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["3", 0], "conditioning_2": ["23", 0]}}
    _rewire(g, "5", "positive", ["24", 0])
    assert np.abs(_pixels(env, run(env, g)) - ref128).max() > 0
    # ConditioningZeroOut as the negative: the all-zero embedding, not the encoded text
    g = _tiny_graph(**{"25": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}}})
    _rewire(g, "5", "negative", ["25", 0])
    assert np.abs(_pixels(env, run(env, g)) - ref).max() > 0
    assert isinstance(pipe, Pipeline)


def record_type(record) -> str:
    return record.outputs["7"]["images"][0]["type"]


def test_resizing_nodes(env):
    g = _tiny_graph(**{"30": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["4", 0],
                                                                          "upscale_method": "bislerp", "scale_by": 1.5}},
                       "31": {"class_type": "ImageScale", "inputs": {"image": ["6", 0], "upscale_method": "lanczos",
                                                                     "width": 40, "height": 0, "crop": "disabled"}},
                       "7": {"class_type": "PreviewImage", "inputs": {"images": ["31", 0]}}})
    _rewire(g, "5", "latent_image", ["30", 0])
    out = Image.open(saved(env, run(env, g), "7")[0])
    assert out.size == (40, 40)                                # 32 * 1.5 = 48 from the latent, then 40 wide
    for method in ("nearest-exact", "bilinear", "area", "bicubic", "bislerp"):
        g["30"]["inputs"]["upscale_method"] = method
        g["31"]["inputs"].update(width=24, height=36, crop="center", upscale_method="bicubic")
        assert Image.open(saved(env, run(env, g), "7")[0]).size == (24, 36)


def test_a_failing_node_is_an_execution_error_naming_it(env):
    from diffusekit.interfaces.server.schemas import Limits
    env.limits = Limits(max_pixels=40 * 40)
    g = _tiny_graph(**{"30": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["4", 0],
                                                                          "upscale_method": "bilinear", "scale_by": 8.0}}})
    _rewire(g, "5", "latent_image", ["30", 0])
    check = validate_prompt(g, env)
    record = GraphExecutor(env).run(g, "bad", check.outputs)
    assert not record.success and record.error["node_id"] == "30" and record.error["node_type"] == "LatentUpscaleBy"
    assert "max_pixels" in record.error["exception_message"]
    assert record.status()["status_str"] == "error" and record.status()["messages"][-1][0] == "execution_error"


def test_interrupt_stops_inside_the_sampler(env):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 6
    g = fast(example("txt2img"), 20)
    check = validate_prompt(g, env)
    record = GraphExecutor(env).run(g, "int", check.outputs, should_stop=stop)
    assert record.interrupted and not record.success
    assert record.messages[-1][0] == "execution_interrupted" and record.messages[-1][1]["node_id"] == "3"


def test_the_deepest_accepted_graph_runs(env):
    """MAX_NODES nodes in one chain: validation, ordering, signatures and the editor graph stay iterative
    enough for Python's recursion limit."""
    from diffusekit.graph.validate import MAX_NODES
    g = {"a": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "shapes"}},
         "0": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    n = MAX_NODES - 4
    for i in range(1, n):
        g[str(i)] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": [str(i - 1), 0],
                                                                 "upscale_method": "nearest-exact", "scale_by": 1.0}}
    g["d"] = {"class_type": "VAEDecode", "inputs": {"samples": [str(n - 1), 0], "vae": ["a", 2]}}
    g["p"] = {"class_type": "PreviewImage", "inputs": {"images": ["d", 0]}}
    record = run(env, g)
    assert len(record.executed) == len(g)
    assert len(json.loads(Image.open(saved(env, record, "p")[0]).info["workflow"])["nodes"]) == len(g)


def test_tiled_vae_nodes_match_the_whole_image_nodes(env, graph_models):
    """VAEDecodeTiled / VAEEncodeTiled (ComfyUI's inputs and defaults): one tile covering the image is the plain
    node bit for bit; small blended tiles stay close to it (per-tile GroupNorm statistics only)."""
    from types import SimpleNamespace

    from diffusekit import Pipeline
    from diffusekit.graph.nodes.latent import vae_encode, vae_encode_tiled
    big = {"tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}
    small = {**big, "tile_size": 64, "overlap": 32}                  # overlap > tile / 4: cut to 16, as ComfyUI
    g = _tiny_graph(**{
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 96, "batch_size": 2}},
        "8": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["5", 0], "vae": ["1", 2], **big}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        "10": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["5", 0], "vae": ["1", 2], **small}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    })
    record = run(env, g)
    plain, whole, tiled = (_pixels(env, record, n) for n in ("7", "9", "11"))
    assert plain.shape == (96, 128, 3)
    np.testing.assert_array_equal(whole, plain)
    diff = np.abs(tiled - plain)
    assert 0 < diff.mean() < 8, diff.mean()                          # uint8 levels: close, not the same pass

    vae = SimpleNamespace(pipe=Pipeline.from_pretrained(graph_models / "tiny.safetensors"))
    pixels = torch.from_numpy(plain / 255.0)[None].float()            # ComfyUI IMAGE: (B, H, W, 3) in [0, 1]
    want = vae_encode(None, pixels, vae)[0]["samples"]
    torch.testing.assert_close(vae_encode_tiled(None, pixels, vae, **big)[0]["samples"], want, rtol=0, atol=0)
    near = vae_encode_tiled(None, pixels, vae, **small)[0]["samples"]
    # a random-weight VAE's GroupNorm statistics differ per 64 px tile (seen 0.25 of the mean magnitude); a
    # misplaced or mis-scaled tile is off by more than the magnitude itself
    assert near.shape == want.shape and 0 < (near - want).abs().mean() < 0.5 * want.abs().mean()
