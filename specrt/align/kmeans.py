"""k-means in torch (k-means++ init, restarts; euclidean or spherical/cosine on
standardized features), silhouette score, automatic K by silhouette, and cluster
quality against reference labels (purity, adjusted Rand index: reporting only, never
used to cluster).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METRICS = ("cosine", "euclidean")


class one_thread:
    """Run small CPU tensor ops on one thread (a context manager): on a busy machine,
    waking torch's intra-op pool costs milliseconds per op, more than the op itself."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def standardize_stats(X: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std ``[D]`` (fp32) of ``X`` ``[N, D]``; std floored at ``eps``."""
    X = X.float()
    return X.mean(0), X.std(0, unbiased=False).clamp_min(eps)


def prepare(X: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None,
            metric: str) -> torch.Tensor:
    """The space k-means works in: ``(X - mean) / std`` (when stats are given), rows
    L2-normalized for ``metric="cosine"``. X ``[N, D]`` -> ``[N, D]`` fp32."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    Z = X.float()
    if mean is not None:
        Z = (Z - mean.to(Z.device)) / std.to(Z.device)
    if metric == "cosine":
        Z = torch.nn.functional.normalize(Z, dim=-1)
    return Z


def pairwise_dist(A: torch.Tensor, B: torch.Tensor, metric: str, squared: bool = False
                  ) -> torch.Tensor:
    """Distances ``[N, M]`` between rows of prepared A ``[N, D]`` and B ``[M, D]``:
    cosine distance ``1 - a.b`` (rows unit length) or (squared) euclidean."""
    if metric == "cosine":
        return (1.0 - A @ B.T).clamp_min(0.0)
    d2 = (A.pow(2).sum(1, keepdim=True) - 2.0 * A @ B.T + B.pow(2).sum(1)[None]).clamp_min(0.0)
    return d2 if squared else d2.sqrt()


@dataclass
class KMeansResult:
    """A k-means partition.

    ``labels`` ``[N]`` int64; ``centroids`` ``[k, D]`` in the prepared space (unit rows
    for cosine); ``inertia`` the sum of (cosine or squared euclidean) distances to the
    assigned centroid; ``mean``/``std`` ``[D]`` the standardization (None = none);
    ``metric``; ``sizes`` ``[k]``.
    """

    labels: torch.Tensor
    centroids: torch.Tensor
    inertia: float
    mean: torch.Tensor | None
    std: torch.Tensor | None
    metric: str

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def sizes(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.k)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Nearest centroid ``[N]`` of raw features X ``[N, D]``."""
        Z = prepare(X, self.mean, self.std, self.metric)
        return pairwise_dist(Z, self.centroids.to(Z.device), self.metric, squared=True).argmin(1)


def _plusplus(Z: torch.Tensor, k: int, metric: str, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: centroids ``[k, D]`` drawn with probability ~ distance."""
    N = Z.shape[0]
    idx = [int(torch.randint(N, (1,), generator=g))]
    d = pairwise_dist(Z, Z[idx], metric, squared=True)[:, 0]
    for _ in range(1, k):
        w = d.double()
        if float(w.sum()) <= 0:  # all points coincide with centroids: pick uniformly
            w = torch.ones_like(w)
        i = int(torch.multinomial(w, 1, generator=g))
        idx.append(i)
        d = torch.minimum(d, pairwise_dist(Z, Z[i:i + 1], metric, squared=True)[:, 0])
    return Z[idx].clone()


def _lloyd(Z: torch.Tensor, C: torch.Tensor, metric: str, max_iter: int, tol: float
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    k = C.shape[0]
    labels = torch.zeros(Z.shape[0], dtype=torch.long)
    for _ in range(max_iter):
        D = pairwise_dist(Z, C, metric, squared=True)
        dmin, labels = D.min(1)
        newC = torch.zeros_like(C).index_add_(0, labels, Z)
        cnt = torch.bincount(labels, minlength=k)
        empty = cnt == 0
        newC = newC / cnt.clamp_min(1)[:, None].to(Z.dtype)
        if empty.any():  # re-seed empty clusters at the points farthest from their centroid
            far = dmin.argsort(descending=True)[: int(empty.sum())]
            newC[empty] = Z[far]
        if metric == "cosine":
            newC = torch.nn.functional.normalize(newC, dim=-1)
        shift = float((newC - C).pow(2).sum())
        C = newC
        if shift <= tol:
            break
    D = pairwise_dist(Z, C, metric, squared=True)
    dmin, labels = D.min(1)
    return labels, C, float(dmin.sum())


def kmeans(X: torch.Tensor, k: int, *, metric: str = "cosine", standardize: bool = True,
           n_init: int = 8, max_iter: int = 100, tol: float = 1e-7, seed: int = 0
           ) -> KMeansResult:
    """Cluster rows of ``X`` ``[N, D]`` into ``k`` groups.

    Features are standardized per dimension (``standardize``), then L2-normalized for
    ``metric="cosine"`` (spherical k-means: unit centroids, cosine distance). k-means++
    seeding, ``n_init`` restarts (best inertia wins), Lloyd iterations until the
    centroids move less than ``tol``. Deterministic for a ``seed``.
    """
    if X.dim() != 2:
        raise ValueError(f"X must be [N, D], got {tuple(X.shape)}")
    N = X.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"need 1 <= k <= N ({N}), got k={k}")
    X = X.detach().float().cpu()
    mean, std = standardize_stats(X) if standardize else (None, None)
    Z = prepare(X, mean, std, metric)
    g = torch.Generator().manual_seed(seed)
    best = None
    with one_thread():
        for _ in range(max(1, n_init)):
            C0 = _plusplus(Z, k, metric, g)
            labels, C, inertia = _lloyd(Z, C0, metric, max_iter, tol)
            if best is None or inertia < best[2] - 1e-9:
                best = (labels, C, inertia)
    return KMeansResult(best[0], best[1], best[2], mean, std, metric)


def silhouette_score(X: torch.Tensor, labels: torch.Tensor, metric: str = "euclidean", *,
                     prepared: bool = True, max_points: int = 3000, seed: int = 0) -> float:
    """Mean silhouette ``(b - a) / max(a, b)`` over points (points in singleton clusters
    score 0), with cosine or euclidean distance between rows of X ``[N, D]`` (taken as
    already prepared, see :func:`prepare`, unless ``prepared=False`` in which case only
    the cosine normalization is applied). Above ``max_points`` a random subset is
    scored. Returns a float in [-1, 1]; 0.0 when there are fewer than 2 clusters."""
    X = X.detach().float().cpu()
    labels = labels.detach().long().cpu()
    if not prepared:
        X = prepare(X, None, None, metric)
    if X.shape[0] > max_points:
        g = torch.Generator().manual_seed(seed)
        sel = torch.randperm(X.shape[0], generator=g)[:max_points]
        X, labels = X[sel], labels[sel]
    ks = labels.unique()
    if len(ks) < 2:
        return 0.0
    X = X.double()
    with one_thread():
        return _silhouette(X, labels, ks, metric)


def _silhouette(X, labels, ks, metric) -> float:
    D = pairwise_dist(X, X, metric)                                   # [N, N]
    D.fill_diagonal_(0.0)
    onehot = (labels[:, None] == ks[None, :]).double()                 # [N, K]
    cnt = onehot.sum(0)                                               # [K]
    sums = D @ onehot                                                 # [N, K]
    own = (labels[:, None] == ks[None, :])
    own_cnt = (onehot * cnt).sum(1)                                   # size of own cluster
    a = (sums * onehot).sum(1) / (own_cnt - 1).clamp_min(1)
    other = (sums / cnt).masked_fill(own, float("inf"))
    b = other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s = torch.where(own_cnt > 1, s, torch.zeros_like(s))
    return float(s.mean())


def choose_k(X: torch.Tensor, k_range=range(2, 11), *, metric: str = "cosine",
             standardize: bool = True, n_init: int = 8, seed: int = 0
             ) -> tuple[int, dict[int, float], KMeansResult]:
    """Pick K by the best silhouette over ``k_range`` (K >= 2, K < N).

    Returns ``(k, {k: silhouette}, result of the chosen k)``; ties go to the smaller K.
    """
    N = X.shape[0]
    ks = [k for k in k_range if 2 <= k < N]
    if not ks:
        raise ValueError(f"no K in {list(k_range)} fits {N} points (need 2 <= K < N)")
    scores: dict[int, float] = {}
    results: dict[int, KMeansResult] = {}
    for k in ks:
        r = kmeans(X, k, metric=metric, standardize=standardize, n_init=n_init, seed=seed)
        Z = prepare(X.float().cpu(), r.mean, r.std, metric)
        scores[k] = silhouette_score(Z, r.labels, metric)
        results[k] = r
    best = max(ks, key=lambda k: (round(scores[k], 6), -k))
    return best, scores, results[best]


def _contingency(labels, truth) -> torch.Tensor:
    labels = torch.as_tensor(labels).long().cpu()
    _, t = torch.unique(torch.as_tensor(_codes(truth)), return_inverse=True)
    _, l_ = torch.unique(labels, return_inverse=True)
    M = torch.zeros(int(l_.max()) + 1, int(t.max()) + 1, dtype=torch.float64)
    M.index_put_((l_, t), torch.ones(len(l_), dtype=torch.float64), accumulate=True)
    return M


def _codes(truth) -> list[int]:
    """Reference labels (strings or ints) as integer codes."""
    if isinstance(truth, torch.Tensor):
        truth = truth.tolist()
    seen: dict = {}
    return [seen.setdefault(x, len(seen)) for x in list(truth)]


def purity(labels, truth) -> float:
    """Share of points whose cluster's majority reference label is their own.
    labels ``[N]`` cluster ids; truth: N reference labels (e.g. task names)."""
    M = _contingency(labels, truth)
    return float(M.max(1).values.sum() / M.sum())


def adjusted_rand_index(labels, truth) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two labelings of N points; 1 = same
    partition, ~0 = chance."""
    M = _contingency(labels, truth)
    n = M.sum()

    def c2(x):
        return x * (x - 1) / 2

    s_ij = c2(M).sum()
    s_a, s_b = c2(M.sum(1)).sum(), c2(M.sum(0)).sum()
    expected = s_a * s_b / c2(n) if n > 1 else 0.0
    maxi = (s_a + s_b) / 2
    if maxi == expected:
        return 1.0
    return float((s_ij - expected) / (maxi - expected))
