"""Tiny random-weight checkpoints of each family, saved to disk the way users hand them to us."""
import pytest
import torch

from diffusekit.models.clip import CLIPTextModel, OpenCLIPTextModel
from diffusekit.models.families import tiny_family
from diffusekit.models.flux import Flux
from diffusekit.models.loading import save_checkpoint
from diffusekit.models.mmdit import MMDiT
from diffusekit.models.t5 import T5EncoderModel
from diffusekit.models.unet import UNetModel
from diffusekit.models.vae import AutoencoderKL


def build_tiny_parts(family_name: str, seed: int = 0):
    """Modules of a tiny model of `family_name` with small random weights everywhere (LDM zero-inits
    output convolutions, which would make every prediction 0 and every test vacuous)."""
    fam = tiny_family(family_name)
    torch.manual_seed(seed)
    unet = Flux(fam.unet) if fam.is_flux else MMDiT(fam.unet) if fam.is_mmdit else UNetModel(fam.unet)
    vae = AutoencoderKL(fam.vae)
    classes = {"clip": CLIPTextModel, "openclip": OpenCLIPTextModel, "t5": T5EncoderModel}
    encoders = [classes[s.kind](s.config) for s in fam.text_encoders]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (unet, vae, *encoders):
            for name, p in m.named_parameters():
                if p.ndim > 1 and "norm" not in name:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return fam, {"unet": unet, "vae": vae, "text_encoders": encoders}


def save_tiny(path, family_name: str, seed: int = 0, dtype=None):
    fam, parts = build_tiny_parts(family_name, seed)
    return save_checkpoint(parts, path, family=fam, dtype=dtype)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-sd1.safetensors", "sd1")


@pytest.fixture(scope="session")
def sd1_pipe(tiny_sd1):
    from diffusekit import Pipeline
    return Pipeline.from_pretrained(tiny_sd1)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory, t5_tokenizer_dir):
    """A tiny SD3 single file (MMDiT, 16-channel VAE, CLIP-L, CLIP-G, T5) with the T5 tokenizer in a
    tokenizer_3/ folder beside it, where the loader looks for it."""
    import shutil
    folder = tmp_path_factory.mktemp("sd3")
    shutil.copytree(t5_tokenizer_dir, folder / "tokenizer_3")
    return save_tiny(folder / "tiny-sd3.safetensors", "sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory, t5_tokenizer_dir):
    """A tiny Flux.1 dev single file in ComfyUI's layout (transformer, 16-channel VAE, CLIP-L, T5) with the
    T5 tokenizer in a tokenizer_2/ folder beside it."""
    import shutil
    folder = tmp_path_factory.mktemp("flux")
    shutil.copytree(t5_tokenizer_dir, folder / "tokenizer_2")
    return save_tiny(folder / "tiny-flux-dev.safetensors", "flux-dev")


@pytest.fixture
def flux_file(tmp_path, t5_tokenizer_dir):
    """build(dtype=None, name="flux-dev") -> (family, path): a tiny Flux file stored in `dtype`, tokenizer_2/ beside it."""
    import shutil

    def build(dtype=None, name="flux-dev", seed=0):
        fam, parts = build_tiny_parts(name, seed)
        shutil.copytree(t5_tokenizer_dir, tmp_path / "tokenizer_2", dirs_exist_ok=True)
        return fam, save_checkpoint(parts, tmp_path / f"{name}.safetensors", family=fam, dtype=dtype)
    return build


@pytest.fixture(scope="session")
def sd3_pipe(tiny_sd3):
    from diffusekit import Pipeline
    return Pipeline.from_pretrained(tiny_sd3)
