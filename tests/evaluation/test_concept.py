"""The hexagon concept of the fine-tuning measurement: training folder, held-out prompts, scores."""
import random

import pytest

from diffusekit.evaluation.concept import (ALL_SHAPES, concept_scene, concept_scores, heldout_concept_scenes,
                                           write_concept_folder)
from diffusekit.training.datasets.folder import ImageFolderDataset
from diffusekit.training.datasets.shapes import SHAPES, render


def test_concept_folder_is_an_image_folder_of_hexagons(tmp_path):
    folder = write_concept_folder(tmp_path / "c", n=12)
    ds = ImageFolderDataset(folder, size=64)
    assert len(ds) == 12 and all("hexagon" in ds[i]["caption"] for i in range(12))
    scenes = [concept_scene(random.Random(f"concept:0:{i}"))[0] for i in range(12)]
    assert concept_scores([ds[i]["image"] for i in range(12)], scenes)["shape_color"] == 1.0
    ti = write_concept_folder(tmp_path / "t", n=3, word="hxgn")
    assert all("hxgn" in ImageFolderDataset(ti)[i]["caption"] and "hexagon" not in ImageFolderDataset(ti)[i]["caption"]
               for i in range(3))


def test_heldout_prompts_are_new_and_the_score_rejects_other_shapes():
    train = {concept_scene(random.Random(f"concept:0:{i}"))[1] for i in range(200)}
    held = heldout_concept_scenes(40)
    assert len(held) == 40 and not train & {t for _, t in held}
    scene = held[0][0]
    circle = type(scene)(scene.background, (scene.objects[0].__class__("circle", *[getattr(scene.objects[0], k)
                                                                                   for k in ("color", "size", "position")]),))
    assert concept_scores([render(circle)], [scene])["shape_color"] == 0.0
    assert concept_scores([render(scene)], [scene])["shape_color"] == 1.0
    assert "hexagon" in ALL_SHAPES and "hexagon" not in SHAPES


def test_old_vocabulary_is_scored_on_the_prompts_the_base_learnt(monkeypatch):
    """The concept eval asks `evaluate_adherence` for the first release's prompt set, not the robust default
    (which the base `shapes` never saw, so its scores there would read as damage the LoRA did)."""
    from diffusekit.evaluation import adherence, concept
    asked = []

    class Stop(Exception):
        pass

    def fake(generate, **kw):
        asked.append(kw.get("prompts"))
        raise Stop

    monkeypatch.setattr(adherence, "evaluate_adherence", fake)
    monkeypatch.setattr(concept, "concept_scores", lambda images, scenes: {})
    with pytest.raises(Stop):
        concept.evaluate_finetune(n_concept=1, n_single=1, n_pair=1, include_base=True)
    assert asked == ["legacy"] and concept.OLD_PROMPTS == "legacy"
