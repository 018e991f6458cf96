import numpy as np
import pytest

import re

from diffusekit.training.datasets import shapes as S
from diffusekit.training.datasets.shapes import (COLORS, SHAPES, ShapesDataset, is_heldout, to_tensor_array)


def test_items_are_deterministic_and_captioned():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    for i in (0, 7, 12345):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and x["scene"] == y["scene"]
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    assert ShapesDataset(seed=4)[0]["caption"] != a[0]["caption"] or ShapesDataset(seed=4)[1]["caption"] != a[1]["caption"]


def test_captions_name_the_attributes():
    ds = ShapesDataset(seed=0)
    for i in range(50):
        item = ds[i]
        cap, scene = item["caption"], item["scene"]
        assert scene.background in cap
        for o in scene.objects:
            assert o.shape in cap and o.color in cap
            assert o.color != scene.background
        assert item["image"].size == (64, 64)


def test_heldout_split_is_disjoint_from_train():
    train, held = ShapesDataset(seed=0), ShapesDataset(seed=0, split="heldout")
    for i in range(200):
        assert not any(is_heldout(o.shape, o.color, train.scene(i).background) for o in train.scene(i).objects)
        s = held.scene(i)
        assert len(s.objects) == 1 and is_heldout(s.objects[0].shape, s.objects[0].color, s.background)
    n_combos = sum(is_heldout(s, c, b) for s in SHAPES for c in COLORS for b in ("white", "black", "blue"))
    assert 0 < n_combos < 0.25 * len(SHAPES) * len(COLORS) * 3
    pairs = ShapesDataset(seed=0, split="heldout_pairs")
    for i in range(50):
        s = pairs.scene(i)
        assert len(s.objects) == 2 and all(is_heldout(o.shape, o.color, s.background) for o in s.objects)


def test_template_split_no_heldout_phrasing_in_training():
    """The held-out templates are disjoint from the training ones, and no training caption is a
    held-out template's wording of its scene (checked string for string on 3000 items)."""
    for train, held in ((S.TRAIN_SINGLE_TEMPLATES, S.HELDOUT_SINGLE_TEMPLATES),
                        (S.TRAIN_PAIR_TEMPLATES, S.HELDOUT_PAIR_TEMPLATES)):
        assert held and train and not set(train) & set(held)
        assert 0.1 < len(held) / (len(held) + len(train)) < 0.45
    assert set(S.LEGACY_SINGLE_TEMPLATES) <= set(S.TRAIN_SINGLE_TEMPLATES)
    assert set(S.LEGACY_PAIR_TEMPLATES) <= set(S.TRAIN_PAIR_TEMPLATES)
    # the examples are held out, so the evaluation measures them
    assert "on {A} {bg} background, {A} {size} {color} {shape}" in S.HELDOUT_SINGLE_TEMPLATES
    assert "{bg} background, {color} {shape}" in S.HELDOUT_SINGLE_TEMPLATES
    ds = ShapesDataset(seed=5)
    used, words = set(), set()
    for i in range(3000):
        sc = ds.scene(i)
        templates = S.TRAIN_SINGLE_TEMPLATES if len(sc.objects) == 1 else S.TRAIN_PAIR_TEMPLATES
        heldout = S.HELDOUT_SINGLE_TEMPLATES if len(sc.objects) == 1 else S.HELDOUT_PAIR_TEMPLATES
        assert sc.template in templates
        assert sc.caption not in {S.fill_template(t, sc) for t in heldout}, (i, sc.caption)
        used.add(sc.template)
        words |= set(re.findall(r"[a-z]+", sc.caption))
    assert used == set(S.TRAIN_SINGLE_TEMPLATES) | set(S.TRAIN_PAIR_TEMPLATES)   # every one is trained on
    for split in ("heldout", "heldout_pairs"):   # held-out phrasings reorder known words, they add none
        held = ShapesDataset(seed=5, split=split)
        for i in range(200):
            sc = held.scene(i)
            assert sc.template in (S.HELDOUT_SINGLE_TEMPLATES if split == "heldout" else S.HELDOUT_PAIR_TEMPLATES)
            assert set(re.findall(r"[a-z]+", sc.caption)) <= words, sc.caption


def test_every_colour_is_a_background_with_articles_that_agree():
    ds = ShapesDataset(seed=2)
    scenes = [ds.scene(i) for i in range(1500)]
    assert {s.background for s in scenes} == set(COLORS) == set(S.BACKGROUNDS)
    for s in scenes:
        assert all(o.color != s.background for o in s.objects)
        assert not re.search(r"\ba [aeiou]", s.caption) and not re.search(r"\ban [^aeiou]", s.caption), s.caption
    assert any("an orange" in s.caption for s in scenes)
    assert S.fill_template("{A} {color} {shape} on {A} {bg} background",
                           S.Scene("orange", (S.ShapeObject("star", "orange", "small", "left"),))) == \
        "an orange star on an orange background"


def test_legacy_style_is_the_first_release_item_for_item():
    """style="legacy" draws what the first `shapes` model was trained and evaluated on (captions
    written by the first release's code), including its "a orange"."""
    assert [ShapesDataset(seed=0, style="legacy").scene(i).caption for i in (0, 2, 1234)] == [
        "a yellow circle on the left and a yellow triangle on the right, white background",
        "large purple triangle at the top on white",
        "a orange circle at the top and a blue star at the bottom, yellow background"]
    assert [ShapesDataset(seed=0, split="heldout", style="legacy").scene(i).caption for i in (0, 1)] == [
        "green background with a large white square at the bottom",
        "a small purple star at the bottom, white background"]
    assert ShapesDataset(seed=1, style="legacy").scene(1).caption == "small white diamond at the bottom on black"
    legacy = ShapesDataset(seed=3, style="legacy")
    assert {legacy.scene(i).background for i in range(300)} == set(S.LEGACY_BACKGROUNDS)


def test_pair_share_sets_the_two_object_share_and_unset_keeps_the_releases_draw():
    counts = {share: sum(len(ShapesDataset(seed=5, pair_share=share).scene(i).objects) == 2 for i in range(600))
              for share in (0.0, 0.5, 1.0)}
    assert counts[0.0] == 0 and counts[1.0] == 600 and 240 <= counts[0.5] <= 330
    default = [ShapesDataset(seed=5).scene(i) for i in range(50)]
    assert 5 <= sum(len(s.objects) == 2 for s in default) <= 30      # one in three (held-out combos rejected)
    assert [s.caption for s in default[:3]] == [ShapesDataset(seed=5, pair_share=None).scene(i).caption
                                                for i in range(3)]
    with pytest.raises(ValueError, match="pair_share"):
        ShapesDataset(pair_share=1.5)


def test_tensor_range_and_errors():
    arr = to_tensor_array(ShapesDataset(seed=0)[0]["image"])
    assert arr.shape == (3, 64, 64) and arr.min() >= -1 and arr.max() <= 1
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="test")
    with pytest.raises(ValueError, match="style"):
        ShapesDataset(style="fancy")
    with pytest.raises(ValueError, match="robust style only"):
        ShapesDataset(split="heldout_pairs", style="legacy")
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(size=30)
