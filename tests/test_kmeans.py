"""k-means, silhouette, auto-K and cluster-vs-label scores on synthetic data."""
import pytest
import torch

from specrt.align.kmeans import (adjusted_rand_index, choose_k, kmeans, prepare, purity,
                                 silhouette_score)


def blobs(k=4, n=40, d=16, spread=0.15, seed=0):
    """k well separated gaussian blobs (random unit directions x 3, noise ``spread``)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1) * 3
    X = torch.cat([c + spread * torch.randn(n, d, generator=g) for c in centers])
    y = torch.arange(k).repeat_interleave(n)
    perm = torch.randperm(len(y), generator=g)
    return X[perm], y[perm]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_kmeans_recovers_blobs(metric):
    X, y = blobs()
    r = kmeans(X, 4, metric=metric, seed=1)
    assert r.labels.shape == y.shape and r.centroids.shape == (4, 16)
    assert adjusted_rand_index(r.labels, y) > 0.99
    assert purity(r.labels, y) == 1.0
    assert torch.equal(r.predict(X), r.labels)
    assert sorted(r.sizes.tolist()) == [40] * 4


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_choose_k_finds_true_k(metric):
    for k_true in (3, 5):
        X, y = blobs(k=k_true, n=30, seed=k_true)
        k, scores, r = choose_k(X, range(2, 8), metric=metric, n_init=3)
        assert k == k_true, scores
        assert adjusted_rand_index(r.labels, y) > 0.99
        assert scores[k_true] > 0.5


def test_silhouette_sanity():
    X, y = blobs(k=3, n=30)
    Z = prepare(X, None, None, "euclidean")
    good = silhouette_score(Z, y, "euclidean")
    rnd = silhouette_score(Z, torch.randint(0, 3, y.shape, generator=torch.Generator().manual_seed(0)),
                           "euclidean")
    assert good > 0.6 and abs(rnd) < 0.15 and good > rnd
    assert silhouette_score(Z, torch.zeros_like(y), "euclidean") == 0.0
    # brute-force reference on a few points
    Xs, ys = Z[:12], torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    D = torch.cdist(Xs, Xs)
    s = []
    for i in range(12):
        same = (ys == ys[i])
        a = D[i][same].sum() / (same.sum() - 1)
        b = min(D[i][ys == c].mean() for c in ys.unique() if c != ys[i])
        s.append((b - a) / max(a, b))
    assert abs(silhouette_score(Xs, ys, "euclidean") - float(torch.stack(s).mean())) < 1e-5


def test_scores_against_labels():
    t = ["a", "a", "b", "b", "c", "c"]
    assert adjusted_rand_index([1, 1, 0, 0, 2, 2], t) == pytest.approx(1.0)
    assert purity([0, 0, 0, 0, 0, 0], t) == pytest.approx(1 / 3)
    # known value: sklearn's adjusted_rand_score([0,0,1,1],[0,0,1,2]) = 0.5714285714
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    X, y = blobs(k=4, n=25)
    g = torch.Generator().manual_seed(0)  # random labels: ARI near 0, same draw every run
    assert abs(adjusted_rand_index(torch.randint(0, 4, y.shape, generator=g), y)) < 0.1


def test_kmeans_errors_and_determinism():
    X, _ = blobs(k=2, n=10)
    with pytest.raises(ValueError):
        kmeans(X, 0)
    with pytest.raises(ValueError):
        kmeans(X, 21)
    a, b = kmeans(X, 3, seed=7), kmeans(X, 3, seed=7)
    assert torch.equal(a.labels, b.labels)
