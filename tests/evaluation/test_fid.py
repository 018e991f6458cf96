"""FID against closed forms and against scipy's matrix square root (scipy only here, in the test)."""
import numpy as np
import pytest
import scipy.linalg

from diffusekit.evaluation.fid import feature_stats, fid, frechet_distance


def _reference(mu1, s1, mu2, s2):
    """Heusel et al. eq. 6 with scipy's general matrix square root of the product S1 S2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_diagonal_closed_form():
    # commuting diagonal covariances: d^2 = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 1.0 + 0.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2   # = 13.25
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(13.25, abs=1e-12)
    assert got == pytest.approx(want, abs=1e-12)


def test_rotated_case_matches_scipy_sqrtm():
    d = 6
    rng = np.random.default_rng(0)
    r = _rotation(d, 1)
    s1 = np.diag(rng.uniform(0.5, 3.0, d))
    s2 = r @ np.diag(rng.uniform(0.1, 2.0, d)) @ r.T          # does not commute with s1
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference(mu1, s1, mu2, s2), rel=1e-10, abs=1e-10)


def test_same_spectrum_rotated_one_dimension_pair():
    # 2-D: S1 = diag(4, 0) (a line along x), S2 = the same line rotated by 90 degrees -> W2^2 = 4 + 4
    s1, s2 = np.diag([4.0, 0.0]), np.diag([0.0, 4.0])
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(8.0, abs=1e-12)


def test_singular_covariances_match_scipy():
    # fewer samples than dimensions -> rank-deficient covariances; still finite and equal to the reference
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 8)), rng.standard_normal((6, 8)) + 0.5
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    assert np.linalg.matrix_rank(s1) == 4
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_reference(mu1, s1, mu2, s2), rel=1e-6, abs=1e-6)


def test_feature_stats_are_mean_and_unbiased_cov():
    f = np.random.default_rng(4).standard_normal((50, 3))
    mu, cov = feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0), atol=1e-14)
    np.testing.assert_allclose(cov, np.cov(f, rowvar=False), atol=1e-14)


def test_self_distance_is_zero_and_symmetric():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((300, 16)) * 2 + 1
    assert abs(fid(a, a)) < 1e-8
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-10)
    assert fid(a, b) > 1.0


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_grows_with_mean_shift_as_squared_norm(shift):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((200, 10))
    direction = rng.standard_normal(10)
    direction /= np.linalg.norm(direction)
    b = a + shift * direction                   # same covariance exactly, mean moved by `shift`
    assert fid(a, b) == pytest.approx(shift ** 2, rel=1e-8)


def test_errors_name_the_bad_shapes():
    with pytest.raises(ValueError, match="feature spaces differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fid(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        fid(np.zeros((1, 4)), np.zeros((10, 4)))
