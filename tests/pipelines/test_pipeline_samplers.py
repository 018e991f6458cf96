"""The pipeline and A1111's "DPM fast" / "DPM adaptive": names, A1111's eta, infotext round trip."""
import numpy as np
import pytest
import torch

from diffusekit import GenerationParams
from diffusekit.interfaces.cli import params_from_infotext
from diffusekit.pipelines.infotext import parse_infotext

SMALL = dict(prompt="a red circle", width=32, height=32, steps=6, cfg_scale=5.0, seed=12)


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive"])
def test_dpm_solver_samplers_take_a1111s_eta(sd1_pipe, name):
    """A1111 passes its "Eta for ancestral samplers" (1) to DPM fast / adaptive, whose k-diffusion default is
    0: unset, eta is 1 (noise drawn from the images' generators); eta=0 is the ODE solver."""
    unset = sd1_pipe.generate(GenerationParams(sampler_name=name, **SMALL))
    one = sd1_pipe.generate(GenerationParams(sampler_name=name, eta=1.0, **SMALL))
    zero = sd1_pipe.generate(GenerationParams(sampler_name=name, eta=0.0, **SMALL))
    assert torch.isfinite(unset.latents).all()
    assert torch.equal(unset.latents, one.latents) and not torch.equal(unset.latents, zero.latents)
    text = unset.infotexts[0]
    assert f"Sampler: {name}," in text and "Eta" not in text          # A1111 writes Eta only when it is not 1
    assert "Eta: 0.0" in zero.infotexts[0]
    fields, _ = params_from_infotext(parse_infotext(text))
    again = sd1_pipe.generate(GenerationParams(**fields))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(unset.images[0]))
