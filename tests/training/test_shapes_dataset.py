import numpy as np
import pytest

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


def test_tensor_range_and_errors():
    arr = to_tensor_array(ShapesDataset(seed=0)[0]["image"])
    assert arr.shape == (3, 64, 64) and arr.min() >= -1 and arr.max() <= 1
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="test")
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(size=30)
