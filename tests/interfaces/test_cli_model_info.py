"""`diffusekit info MODEL`: a checkpoint described from its header alone, pixel-space ones included."""
import json
from dataclasses import replace

from diffusekit.interfaces.cli import main
from diffusekit.models.clip import CLIPTextModel
from diffusekit.models.families import tiny_family
from diffusekit.models.loading import save_checkpoint
from diffusekit.models.unet import UNetModel
from diffusekit.models.vae import AutoencoderKL


def info(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["info", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_describes_a_pixel_space_checkpoint(tmp_path, capsys):
    base = tiny_family("custom")
    fam = replace(base, vae=None, unet=replace(base.unet, in_channels=3, out_channels=3), latent_scale=1.0,
                  default_size=32)
    path = save_checkpoint({"unet": UNetModel(fam.unet), "text_encoders": [CLIPTextModel(fam.text_encoders[0].config)]},
                           tmp_path / "digits.safetensors", family=fam)
    rc, out, _ = info(capsys, path)
    rows = dict(line.split(": ", 1) for line in out.splitlines())
    assert rc == 0 and rows["Model"] == "digits.safetensors" and rows["Family"] == "custom"
    assert rows["Space"].startswith("pixels: the UNet denoises 3-channel images") and "no VAE" in rows["Space"]
    assert rows["UNet"].startswith("3 -> 3 channels") and rows["Native size"] == "32x32"
    assert rows["Prediction"] == "eps" and rows["Text encoder 1"].startswith("clip, width 32, 3 layers")
    rc, out, _ = info(capsys, path, "--json")
    data = json.loads(out)
    assert rc == 0 and data["pixel_space"] is True and data["family"]["vae"] is None


def test_info_describes_a_latent_checkpoint_and_teaches_on_a_bad_path(tmp_path, capsys):
    fam = tiny_family("sd1")
    path = save_checkpoint({"unet": UNetModel(fam.unet), "vae": AutoencoderKL(fam.vae),
                            "text_encoders": [CLIPTextModel(fam.text_encoders[0].config)]}, tmp_path / "m.safetensors",
                           family=fam)
    rc, out, _ = info(capsys, path)
    assert rc == 0 and "Space: latents: a VAE with 4 channels at 1/8 of the image side, latent scale 0.18215" in out
    rc, _, err = info(capsys, tmp_path / "missing.safetensors")
    assert rc == 2 and "no such model file or folder" in err


def test_info_describes_an_sd3_checkpoint(tmp_path, capsys):
    from diffusekit.models.mmdit import MMDiT
    from diffusekit.models.t5 import T5EncoderModel
    fam = tiny_family("sd35-medium")
    path = save_checkpoint({"unet": MMDiT(fam.unet), "vae": AutoencoderKL(fam.vae), "text_encoders": [
        CLIPTextModel(fam.text_encoders[0].config), CLIPTextModel(fam.text_encoders[1].config),
        T5EncoderModel(fam.text_encoders[2].config)]}, tmp_path / "sd35m.safetensors", family=fam)
    rc, out, _ = info(capsys, path)
    rows = dict(line.split(": ", 1) for line in out.splitlines())
    assert rc == 0 and rows["Family"] == "sd35-medium" and rows["Prediction"] == "flow"
    assert rows["Space"].endswith("latent scale 1.5305, shift 0.0609")
    assert rows["MMDiT"].startswith("16 -> 16 channels, 3 joint blocks of width 64") and "MMDiT-X" in rows["MMDiT"]
    assert rows["Text encoder 3"] == "t5, width 96, 2 layers, hidden layer -1, optional"
    assert rows["Training schedule"] == "rectified flow, time shift 3"


def test_info_describes_a_flux_checkpoint(tmp_path, capsys):
    from diffusekit.models.flux import Flux
    from diffusekit.models.t5 import T5EncoderModel
    fam = tiny_family("flux-dev")
    path = save_checkpoint({"unet": Flux(fam.unet), "vae": AutoencoderKL(fam.vae), "text_encoders": [
        CLIPTextModel(fam.text_encoders[0].config), T5EncoderModel(fam.text_encoders[1].config)]},
        tmp_path / "flux.safetensors", family=fam)
    rc, out, _ = info(capsys, path)
    rows = dict(line.split(": ", 1) for line in out.splitlines())
    assert rc == 0 and rows["Family"] == "flux-dev" and rows["Prediction"] == "flow"
    assert rows["Space"].endswith("latent scale 0.3611, shift 0.1159")
    assert rows["Flux"].startswith("2 double-stream + 2 single-stream blocks of width 64") and "guidance" in rows["Flux"]
    assert rows["Text encoder 2"] == "t5, width 40, 2 layers, hidden layer -1"
    assert rows["Training schedule"].startswith("rectified flow, resolution-dependent time shift exp(mu), mu 0.5")


def test_generate_flux_with_guidance(tmp_path, capsys, t5_tokenizer_dir):
    import shutil

    from PIL import Image

    from diffusekit.models.flux import Flux
    from diffusekit.models.t5 import T5EncoderModel
    fam = tiny_family("flux-dev")
    shutil.copytree(t5_tokenizer_dir, tmp_path / "tokenizer_2")
    path = save_checkpoint({"unet": Flux(fam.unet), "vae": AutoencoderKL(fam.vae), "text_encoders": [
        CLIPTextModel(fam.text_encoders[0].config), T5EncoderModel(fam.text_encoders[1].config)]},
        tmp_path / "flux.safetensors", family=fam)
    rc = main(["generate", "a red circle", "--model", str(path), "--width", "32", "--height", "32", "--steps", "2",
               "--guidance", "2.5", "--seed", "1", "--out", str(tmp_path / "out")])
    assert rc == 0
    image = next((tmp_path / "out").glob("*.png"))
    text = Image.open(image).info["parameters"]
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 1.0, Distilled CFG Scale: 2.5, Seed: 1" in text
