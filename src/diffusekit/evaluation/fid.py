"""The Fréchet distance between two Gaussians fitted to feature sets (FID, Heusel et al. 2017,
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", eq. 6):

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1^1/2 S2 S1^1/2)^1/2 )

which is the 2-Wasserstein distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982).
tr((S1 S2)^1/2) of the paper equals the trace above, since S1 S2 is similar to S1^1/2 S2 S1^1/2; the
symmetric form is used here because it is positive semi-definite, so its square root comes from one
symmetric eigendecomposition in float64 with no complex parts to drop (pytorch-fid's scipy `sqrtm` of the
non-symmetric product can return small imaginary parts, and fails on singular covariances, which happen
whenever there are fewer samples than feature dimensions). No scipy at run time.

Which features: Inception-v3 pool3 in the paper; diffusekit computes FID in the small feature spaces it
trains itself (`diffusekit.evaluation.features`), so numbers are comparable only within one feature net
and one sample count (FID is biased upwards at small sample counts; compare to the dataset-vs-dataset
floor at the same count, as `evaluate.evaluate_model` reports).
"""
from __future__ import annotations

import numpy as np


def _psd_sqrt(mat: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (float64).
    Eigenvalues a rounding error below zero are clipped to zero."""
    w, v = np.linalg.eigh((mat + mat.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _as_vector(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} has shape {x.shape}; a mean must be a vector (D,)")
    return x


def _as_square(x, name: str, d: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (d, d):
        raise ValueError(f"{name} has shape {x.shape}; a covariance must be ({d}, {d}) to match the mean")
    return x


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

    mu: (D,), cov: (D, D) symmetric PSD (singular is fine). Returns a float >= 0 (up to rounding).
    """
    mu1, mu2 = _as_vector(mu1, "mu1"), _as_vector(mu2, "mu2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 {mu1.shape} and mu2 {mu2.shape}: the two feature spaces differ")
    d = mu1.shape[0]
    cov1, cov2 = _as_square(cov1, "cov1", d), _as_square(cov2, "cov2", d)
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all() and np.isfinite(cov1).all() and np.isfinite(cov2).all()):
        raise ValueError("non-finite value in the means or covariances (did the features overflow?)")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1                                # S1^1/2 S2 S1^1/2: symmetric PSD
    w = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())   # tr((S1^1/2 S2 S1^1/2)^1/2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), unbiased covariance (D, D)), in float64. Needs N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features have shape {f.shape}; expected (N, D), one row per image")
    if f.shape[0] < 2:
        raise ValueError(f"{f.shape[0]} feature vector(s): a covariance needs at least 2 (use hundreds for FID)")
    mu = f.mean(0)
    centred = f - mu
    cov = centred.T @ centred / (f.shape[0] - 1)                # (D, D), as numpy.cov(rowvar=False)
    return mu, cov


def fid(features_a, features_b) -> float:
    """FID between two sets of feature vectors (N_a, D) and (N_b, D)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))
