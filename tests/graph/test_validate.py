"""Whole-graph validation in ComfyUI's shapes: one error per problem naming node id, input and what is valid."""
import copy
import math

import pytest

from diffusekit.graph import validate_prompt
from diffusekit.graph.sampling import SCHEDULERS, sampler_names

from workflow_files import example


@pytest.fixture()
def prompt():
    return example("txt2img")


def only_error(v, node):
    assert not v.ok and v.outputs == []
    (err,) = v.node_errors[node]["errors"]
    return err


def test_the_default_graph_is_valid_and_its_output_is_the_save_node(prompt, env):
    v = validate_prompt(prompt, env)
    assert v.ok and v.outputs == ["9"] and v.node_errors == {} and v.error is None


def test_unknown_class_type_names_the_node_and_the_known_types(prompt, env):
    prompt["3"]["class_type"] = "KSamplerTurbo"
    v = validate_prompt(prompt, env)
    assert not v.ok and v.error["type"] == "invalid_prompt"
    assert "KSamplerTurbo does not exist" in v.error["message"] and "#3" in v.error["details"]
    assert "KSamplerAdvanced" in v.error["details"]


def test_missing_input_and_wrong_type_and_nan_are_input_errors(prompt, env):
    del prompt["3"]["inputs"]["steps"]
    err = only_error(validate_prompt(prompt, env), "3")
    assert err["type"] == "required_input_missing" and err["extra_info"]["input_name"] == "steps"
    p = example("txt2img")
    p["3"]["inputs"]["cfg"] = "strong"
    err = only_error(validate_prompt(p, env), "3")
    assert err["type"] == "invalid_input_type" and err["extra_info"]["received_value"] == "strong"
    p = example("txt2img")
    p["3"]["inputs"]["cfg"] = math.nan
    assert only_error(validate_prompt(p, env), "3")["type"] == "invalid_input_type"
    p = example("txt2img")
    p["5"]["inputs"]["width"] = 64.5
    assert only_error(validate_prompt(p, env), "5")["extra_info"]["input_name"] == "width"


def test_values_convert_as_comfyui_converts_them(prompt, env):
    prompt["3"]["inputs"]["steps"] = "12"
    prompt["3"]["inputs"]["cfg"] = 7
    assert validate_prompt(prompt, env).ok
    assert prompt["3"]["inputs"]["steps"] == 12 and isinstance(prompt["3"]["inputs"]["cfg"], float)


def test_out_of_range_values_name_the_bound(prompt, env):
    prompt["3"]["inputs"]["denoise"] = 1.5
    err = only_error(validate_prompt(prompt, env), "3")
    assert err["type"] == "value_bigger_than_max" and "1.0" in err["message"]
    p = example("txt2img")
    p["3"]["inputs"]["seed"] = -1
    assert only_error(validate_prompt(p, env), "3")["type"] == "value_smaller_than_min"


def test_a_choice_outside_the_list_lists_the_valid_ones(prompt, env):
    prompt["3"]["inputs"]["scheduler"] = "Karras"
    err = only_error(validate_prompt(prompt, env), "3")
    assert err["type"] == "value_not_in_list" and err["extra_info"]["input_name"] == "scheduler"
    assert all(s in err["details"] for s in SCHEDULERS)
    assert err["extra_info"]["input_config"][0] == list(SCHEDULERS)
    p = example("txt2img")
    p["4"]["inputs"]["ckpt_name"] = "../../etc/passwd"
    err = only_error(validate_prompt(p, env), "4")
    assert err["type"] == "value_not_in_list" and "tiny.safetensors" in err["details"] and "shapes" in err["details"]


def test_comfyui_sampler_names_are_accepted(prompt, env):
    for name in ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde_gpu", "uni_pc_bh2", "ddim", "lcm"):
        p = copy.deepcopy(prompt)
        p["3"]["inputs"]["sampler_name"] = name
        assert validate_prompt(p, env).ok, name
    assert len(sampler_names()) >= 21


def test_links_to_missing_nodes_outputs_and_wrong_types(prompt, env):
    prompt["3"]["inputs"]["latent_image"] = ["55", 0]
    err = only_error(validate_prompt(prompt, env), "3")
    assert err["type"] == "bad_linked_input" and "55" in err["message"] and err["extra_info"]["input_name"] == "latent_image"
    p = example("txt2img")
    p["8"]["inputs"]["vae"] = ["4", 7]
    err = only_error(validate_prompt(p, env), "8")
    assert err["type"] == "bad_linked_input" and "MODEL, CLIP, VAE" in err["details"]
    p = example("txt2img")
    p["8"]["inputs"]["vae"] = ["4", 0]
    err = only_error(validate_prompt(p, env), "8")
    assert err["type"] == "return_type_mismatch" and err["extra_info"]["received_type"] == "MODEL"
    p = example("txt2img")
    p["8"]["inputs"]["vae"] = ["4"]
    assert only_error(validate_prompt(p, env), "8")["type"] == "bad_linked_input"
    p = example("txt2img")
    p["3"]["inputs"]["seed"] = ["5", 0]                   # a link into a widget
    assert only_error(validate_prompt(p, env), "3")["type"] == "return_type_mismatch"
    p = example("txt2img")
    p["8"]["inputs"]["vae"] = "my vae"                    # a value where a link must be
    assert only_error(validate_prompt(p, env), "8")["type"] == "required_input_missing"


def test_a_cycle_is_reported_with_its_path(prompt, env):
    prompt["5"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "bilinear",
                                                                "scale_by": 1.0}}
    v = validate_prompt(prompt, env)
    assert not v.ok
    (node, entry), = v.node_errors.items()
    err = entry["errors"][0]
    assert err["type"] == "dependency_cycle" and set(err["extra_info"]["nodes"]) == {"3", "5"}


def test_errors_upstream_are_reported_once_on_the_node_that_has_them(env):
    p = example("hires_two_pass")
    p["16"]["inputs"]["ckpt_name"] = "missing.safetensors"
    v = validate_prompt(p, env)
    assert not v.ok and list(v.node_errors) == ["16"]
    assert sorted(v.node_errors["16"]["dependent_outputs"]) == ["12", "9"]
    assert v.error["type"] == "prompt_outputs_failed_validation"


def test_one_good_output_still_runs(env):
    p = example("hires_two_pass")
    p["11"]["inputs"]["steps"] = 0
    v = validate_prompt(p, env)
    assert v.ok and v.outputs == ["9"] and list(v.node_errors) == ["11"]


def test_shapes_of_whole_prompt_errors(env):
    assert validate_prompt([], env).error["type"] == "invalid_prompt"
    assert validate_prompt({"1": {"inputs": {}}}, env).error["type"] == "invalid_prompt"
    v = validate_prompt({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                                            "batch_size": 1}}}, env)
    assert v.error["type"] == "prompt_no_outputs" and "SaveImage" in v.error["details"]


def test_server_limits_apply_where_the_graph_fixes_them(prompt, env):
    from diffusekit.interfaces.server.schemas import Limits
    limits = Limits(max_steps=30, max_pixels=128 * 128, max_batch_size=2)
    prompt["3"]["inputs"]["steps"] = 31
    err = only_error(validate_prompt(prompt, env, limits=limits), "3")
    assert "max_steps=30" in err["message"]
    p = example("txt2img")
    p["5"]["inputs"].update(width=4096, height=4096, batch_size=3)
    errors = validate_prompt(p, env, limits=limits).node_errors["5"]["errors"]
    assert ["max_pixels" in errors[0]["message"], "max_batch_size" in errors[1]["message"]] == [True, True]


def test_comfyuis_embedding_syntax_names_the_embedding_file():
    from diffusekit.graph.nodes.loaders import _comfy_prompt
    assert _comfy_prompt("a cat, embedding:EasyNegative.pt, (embedding:style:1.2)") == "a cat, EasyNegative, (style:1.2)"
    assert _comfy_prompt("no embeddings here") == "no embeddings here"


def test_graph_size_and_prompt_length_are_bounded(env):
    from diffusekit.graph.validate import MAX_NODES
    from diffusekit.interfaces.server.schemas import Limits
    chain = {"0": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    for i in range(1, MAX_NODES + 1):
        chain[str(i)] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": [str(i - 1), 0],
                                                                     "upscale_method": "bilinear", "scale_by": 1.0}}
    v = validate_prompt(chain, env)
    assert not v.ok and f"at most {MAX_NODES}" in v.error["message"]
    p = example("txt2img")
    p["6"]["inputs"]["text"] = "word " * 5000
    err = only_error(validate_prompt(p, env, limits=Limits(max_prompt_chars=1000)), "6")
    assert "max_prompt_chars=1000" in err["message"]
