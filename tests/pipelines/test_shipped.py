"""Shipped models by name, and the sampling settings their cards recommend (the CLI's and the server's
defaults): the card's front matter, read without loading weights; A1111's defaults for any other file."""
import pytest

from diffusekit import Pipeline
from diffusekit.pipelines.shipped import (A1111_DEFAULTS, ASSETS, card_settings, recommended, shipped_name,
                                          shipped_path)

CARD_SETTINGS = {"sampler_name": "DPM++ 2M", "scheduler": "Karras", "steps": 20, "cfg_scale": 5.0}


@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_the_shipped_cards_recommend_what_the_models_are_evaluated_at(name):
    """The cards' measured-quality sections use DPM++ 2M Karras, 20 steps, CFG 5: so do the defaults."""
    assert card_settings(ASSETS / name / "MODEL_CARD.md") == CARD_SETTINGS
    assert recommended(name) == recommended(shipped_path(name)) == CARD_SETTINGS
    assert shipped_name(shipped_path(name)) == name
    assert "DPM++ 2M Karras, CFG 5" in (ASSETS / name / "MODEL_CARD.md").read_text()


def test_the_turbo_card_recommends_one_call_per_step_consistency_sampling():
    """shapes-turbo (a consistency model): LCM on SGM Uniform, at most 4 steps, CFG 1 (off), as SDXL Turbo's."""
    s = card_settings(ASSETS / "shapes-turbo" / "MODEL_CARD.md")
    assert (s["sampler_name"], s["scheduler"], s["cfg_scale"]) == ("LCM", "SGM Uniform", 1.0) and 1 <= s["steps"] <= 4
    assert recommended("shapes-turbo") == recommended(shipped_path("shapes-turbo")) == s


def test_a_checkpoint_without_a_card_gets_a1111s_defaults(tmp_path):
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"")
    assert shipped_name(other) is None and recommended(other) == A1111_DEFAULTS
    assert A1111_DEFAULTS == {"sampler_name": "DPM++ 2M", "scheduler": "Automatic", "steps": 20, "cfg_scale": 7.0}


def test_card_front_matter_rules(tmp_path):
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("---\n# comment\nsampler: Euler a   # trailing comment\nsteps: 4\nlicense: mit\n---\n"
                    "cfg_scale: 9\n")
    assert card_settings(card) == {"sampler_name": "Euler a", "steps": 4}     # keys after the block: body text
    card.write_text("# no front matter\nsteps: 4\n")
    assert card_settings(card) == {}
    card.write_text("---\nsteps: twenty\n---\n")
    with pytest.raises(ValueError, match=r"MODEL_CARD.md:2: steps: 'twenty' is not an integer"):
        card_settings(card)


def test_a_shipped_file_given_by_path_is_named_and_defaulted_as_by_name():
    """The server loads models by path: the infotext still says `Model: shapes`, not the file stem."""
    pipe = Pipeline.from_pretrained(shipped_path("shapes"))
    assert pipe.name == "shapes" and pipe.defaults == CARD_SETTINGS
