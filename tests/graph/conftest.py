"""Workflows on real models: the shipped `shapes` model and tiny random-weight SD 1.x checkpoints (written
the way users hand them over), a LoRA file for them, and folders for the graph's input/output/temp."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# tiny SD1 checkpoints (interfaces/conftest.py) and kohya LoRA files for them (models/test_lora.py)
_models = _load("_graph_tiny_models", ROOT / "tests" / "interfaces" / "conftest.py")
_loras = _load("_graph_tiny_loras", ROOT / "tests" / "models" / "test_lora.py")


@pytest.fixture(scope="session")
def graph_models(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("graph-models")
    _models.save_tiny_sd1(d / "tiny.safetensors", seed=0)
    return d


@pytest.fixture(scope="session")
def graph_loras(tmp_path_factory) -> Path:
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("graph-loras")
    save_file(_loras.random_lora(_loras.SD1_LAYERS, seed=3, scale=0.5), d / "style.safetensors")
    return d


@pytest.fixture()
def env(graph_models, graph_loras, tmp_path):
    from diffusekit.graph import Environment
    return Environment(models_dir=graph_models, lora_dir=graph_loras, output_dir=tmp_path / "output",
                       input_dir=tmp_path / "input", temp_dir=tmp_path / "temp")
