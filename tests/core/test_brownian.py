"""The Brownian-tree noise source: Brownian statistics, path consistency, batch = singles, pinned values."""
import math
import random

import pytest
import torch
from scipy import stats

from diffusekit.core.brownian import BrownianTree, BrownianTreeNoiseSampler, mix64

T0, T1 = 0.03, 14.6   # an SD-like sigma range


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: extra intra-op threads only add synchronisation on a busy machine. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _splitmix64_finalizer(z: int) -> int:
    """Reference: the splitmix64 finalizer on Python ints (Steele et al. 2014)."""
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_mix64_matches_python_reference_including_wraparound():
    values = [0, 1, 12345, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 5, 0x9E3779B97F4A7C15]
    signed = torch.tensor([v - 2 ** 64 if v >= 2 ** 63 else v for v in values], dtype=torch.int64)
    got = [int(v) % 2 ** 64 for v in mix64(signed)]
    assert got == [_splitmix64_finalizer(v) for v in values]


def test_pinned_values():
    """A seed's noise must not change between versions (users reproduce images from seeds)."""
    tree = BrownianTree(T0, T1, [42, 7], (3,))
    expected_t1 = torch.tensor([[0.759558868835473, 1.786587600015222, 0.015038502075747],
                                [1.506163071912054, 2.901061564000834, 8.506782251496888]], dtype=torch.float64)
    expected_1 = torch.tensor([[-0.705435389904913, -0.599786982489218, -0.186270046932673],
                               [0.062808621620027, 0.024357090603704, 0.829543864472890]], dtype=torch.float64)
    torch.testing.assert_close(tree(T1), expected_t1, rtol=0, atol=1e-12)
    torch.testing.assert_close(tree(1.0), expected_1, rtol=0, atol=1e-12)
    assert torch.equal(tree(T0), torch.zeros(2, 3, dtype=torch.float64))   # W(t0) = 0


@pytest.fixture(scope="module")
def many_paths():
    """400 independent paths of 50 coordinates: 20000 samples of every increment."""
    return BrownianTree(T0, T1, list(range(1000, 1400)), (50,))


# intervals of very different lengths: the whole range, a middle one, one only 1e-3 long near sigma_min
INTERVALS = [(T0, T1), (0.7, 2.3), (0.0412, 0.0422)]


@pytest.mark.parametrize("a,b", INTERVALS)
def test_increments_are_standard_normal(many_paths, a, b):
    z = ((many_paths(b) - many_paths(a)) / math.sqrt(b - a)).flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(n)                   # mean 0 within 4 standard errors
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / n)             # variance 1 (Var of s^2 = 2/n)
    assert abs(float((z ** 4).mean()) - 3) < 4 * math.sqrt(96 / n)   # kurtosis 3 (Var of z^4 = 96)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3             # the whole distribution


def test_increments_over_disjoint_intervals_are_independent(many_paths):
    ts = [T0, 0.05, 0.2, 1.0, 1.0001, 5.0, T1]   # adjacent intervals, including a very short one
    incs = [((many_paths(b) - many_paths(a)) / math.sqrt(b - a)).flatten() for a, b in zip(ts[:-1], ts[1:])]
    corr = torch.corrcoef(torch.stack(incs))
    n = incs[0].numel()
    off_diag = corr - torch.eye(len(incs), dtype=corr.dtype)
    assert off_diag.abs().max() < 4 / math.sqrt(n)


def test_nested_increments_have_brownian_correlation(many_paths):
    """corr(W(b) - W(a), W(c) - W(a)) = sqrt((b - a) / (c - a)): the path is Brownian, not just its steps."""
    a, b, c = 0.5, 1.5, 9.5
    u = (many_paths(b) - many_paths(a)).flatten()
    v = (many_paths(c) - many_paths(a)).flatten()
    corr = float(torch.corrcoef(torch.stack([u, v]))[0, 1])
    assert abs(corr - math.sqrt((b - a) / (c - a))) < 4 / math.sqrt(u.numel())


def test_increments_add_up_exactly():
    """W(t2) - W(t0) = (W(t1) - W(t0)) + (W(t2) - W(t1)): one path, queried through the noise sampler."""
    x = torch.zeros(3, 4, 5, dtype=torch.float64)
    ns = BrownianTreeNoiseSampler(x, T0, T1, [1, 2, 3])
    t0, t1, t2 = 9.0, 2.5, 0.04   # descending, as a sampler queries
    whole = ns(t0, t2) * math.sqrt(t0 - t2)
    parts = ns(t0, t1) * math.sqrt(t0 - t1) + ns(t1, t2) * math.sqrt(t1 - t2)
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)
    # ... and for a fine grid inside [t2, t0]: the coarse increment is the sum of the fine ones
    grid = torch.linspace(t0, t2, 101, dtype=torch.float64).tolist()
    fine = sum(ns(a, b) * math.sqrt(a - b) for a, b in zip(grid[:-1], grid[1:]))
    torch.testing.assert_close(whole, fine, rtol=0, atol=1e-11)


def test_batch_row_equals_single_tree_with_that_seed():
    seeds = [5, 17, 2 ** 63 - 1, 0]
    x = torch.zeros(4, 2, 3)
    batch = BrownianTreeNoiseSampler(x, T0, T1, seeds)
    singles = [BrownianTreeNoiseSampler(x[:1], T0, T1, [s]) for s in seeds]
    for a, b in [(T1, 7.0), (7.0, 0.5), (0.5, 0.031)]:
        out = batch(a, b)
        for i, single in enumerate(singles):
            assert torch.equal(out[i:i + 1], single(a, b))


def test_query_order_does_not_matter():
    """W(t) is a pure function of t: a fresh tree queried in another order, past its caches, agrees bit for bit."""
    times = [T0 + (T1 - T0) * k / 97 for k in range(98)] + [0.5, 0.50000001, 3.3]
    first = BrownianTree(T0, T1, [3, 4], (6,))
    reference = {t: first(t).clone() for t in times}
    shuffled = times[:]
    random.Random(0).shuffle(shuffled)
    second = BrownianTree(T0, T1, [3, 4], (6,))
    for t in shuffled + times[::-1]:
        assert torch.equal(second(t), reference[t])


def test_different_seeds_give_different_paths():
    tree = BrownianTree(T0, T1, [1, 2], (1000,))
    w = tree(5.0)
    assert abs(float(torch.corrcoef(w)[0, 1])) < 0.15


def test_noise_has_dtype_and_device_of_x():
    for dtype in (torch.float16, torch.float32, torch.float64):
        x = torch.zeros(2, 3, dtype=dtype)
        assert BrownianTreeNoiseSampler(x, T0, T1, [1, 2])(3.0, 2.0).dtype == dtype


def test_errors_teach():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one seed per image"):
        BrownianTreeNoiseSampler(x, T0, T1, [1])
    with pytest.raises(ValueError, match="one seed per image"):
        BrownianTreeNoiseSampler(x, T0, T1, 1)
    ns = BrownianTreeNoiseSampler(x, T0, T1, [1, 2])
    with pytest.raises(ValueError, match="outside its interval"):
        ns(20.0, 1.0)
    with pytest.raises(ValueError, match="two different times"):
        ns(1.0, 1.0)
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianTree(1.0, 1.0, [1], (2,))


def _reference_normals(seed: int, node: int, numel: int) -> torch.Tensor:
    """Z_node of one row straight from the definition (module docstring), one formula step per line:
    uniform e = top 53 bits of mix64(mix64(seed + G) ^ mix64((2 node + 1) G) + e G), e < 2 * pairs;
    Box-Muller on (uniform e, uniform pairs + e) gives normals e (cos) and pairs + e (sin)."""
    def signed(v: int) -> int:
        v %= 2 ** 64
        return v - 2 ** 64 if v >= 2 ** 63 else v
    golden = signed(0x9E3779B97F4A7C15)
    row_key = mix64(torch.tensor([signed(seed)]) + golden)
    node_key = mix64(torch.tensor([signed(2 * node + 1)]) * golden)
    pairs = (numel + 1) // 2
    bits = mix64((row_key ^ node_key) + torch.arange(2 * pairs) * golden)
    u = ((bits >> 11) & (2 ** 53 - 1)).to(torch.float64) * 2.0 ** -53
    radius = (-2.0 * torch.log1p(-u[:pairs])).sqrt()
    angle = (2.0 * math.pi) * u[pairs:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:numel]


# odd sizes (the last normal dropped) and 70200 elements (three column blocks per row)
@pytest.mark.parametrize("shape", [(3,), (5, 7), (2, 100, 351)])
def test_node_values_follow_the_generator_definition(shape):
    """W(t1) = sqrt(t1 - t0) Z_root and, at the first midpoint m, W(m) = W(t1) / 2 + sqrt((t1 - t0) / 4) Z_1,
    with Z from the reference above: the blocked, in-place drawing computes the definition."""
    seeds, numel = [42, 2 ** 63 - 1], math.prod(shape)
    tree = BrownianTree(T0, T1, seeds, shape)
    w1, wm = tree(T1), tree(0.5 * (T0 + T1))
    for row, seed in enumerate(seeds):
        z_root = _reference_normals(seed, 0, numel).reshape(shape)
        z_1 = _reference_normals(seed, 1, numel).reshape(shape)
        torch.testing.assert_close(w1[row], math.sqrt(T1 - T0) * z_root, rtol=0, atol=1e-12)
        torch.testing.assert_close(wm[row], 0.5 * w1[row] + math.sqrt((T1 - T0) / 4) * z_1, rtol=0, atol=1e-12)


def test_values_do_not_depend_on_blocking_or_threads():
    """Large blocks split by 3 torch threads at arbitrary points, and tiny blocks (two column slices
    per row), give the bits of the default single-threaded run; so does a single row."""
    times = [T1, 7.0, 2.0, 0.5, 0.05, T0 + 1e-7, 3.3]
    seeds, shape = list(range(150)), (3, 70)   # 105 pairs a row; a block of 150 rows is 31500 pairs
    reference = [w.clone() for w in map(BrownianTree(T0, T1, seeds, shape), times)]
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        threaded = [BrownianTree(T0, T1, seeds, shape)(t) for t in times]
    finally:
        torch.set_num_threads(before)
    tiny = BrownianTree(T0, T1, seeds[:4], shape)
    tiny._block = 128    # 64 pairs per column slice: two slices (64 + 41 pairs) per (node, row)
    single = BrownianTree(T0, T1, seeds[3:4], shape)
    for k, t in enumerate(times):
        assert torch.equal(threaded[k], reference[k]), t
        assert torch.equal(tiny(t), reference[k][:4]), t
        assert torch.equal(single(t), reference[k][3:4]), t
