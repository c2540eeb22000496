"""k-means with k-means++ seeding, in numpy: the start of the HMM baselines and the AR-HMM."""

from __future__ import annotations

import numpy as np

__all__ = ["kmeans", "sqdist"]


def sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared distances ``[M, K]`` of rows ``x [M, Dx]`` to ``c [K, Dx]``, without an
    ``[M, K, Dx]`` temporary (long data sets)."""
    return np.sum(x**2, 1)[:, None] - 2.0 * x @ c.T + np.sum(c**2, 1)[None, :]


def kmeans(x: np.ndarray, K: int, rng: np.random.Generator,
           iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids ``[K, Dx]`` and labels ``[M]`` of ``x [M, Dx]``: k-means++ seeding (Arthur &
    Vassilvitskii, 2007), then at most `iters` Lloyd steps (stopping when no label changes;
    an empty cluster keeps its centroid)."""
    centroids = [x[rng.integers(x.shape[0])]]
    for _ in range(1, K):
        d2 = np.maximum(sqdist(x, np.asarray(centroids)).min(axis=1), 0.0)
        total = d2.sum()
        p = d2 / total if total > 0 else np.full(x.shape[0], 1.0 / x.shape[0])
        centroids.append(x[rng.choice(x.shape[0], p=p)])
    c = np.asarray(centroids)
    labels = np.argmin(sqdist(x, c), axis=1)
    for _ in range(iters):
        for k in range(K):
            if np.any(labels == k):
                c[k] = x[labels == k].mean(axis=0)
        new = np.argmin(sqdist(x, c), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
    return c, labels
