"""Pools: write/load round trip, routing decisions, lossless mixed-drafter routing,
router features identical offline and online, target fingerprint checks."""
import json

import pytest
import torch

import specrt
from specrt import SamplingParams
from specrt.align.features import engine_prompt_features
from specrt.draft import FusedDrafter, NgramDrafter, RecyclingDrafter
from specrt.pool import PoolError, drafter_entry, load_pool, write_pool
from specrt.route import MLPRouter, router_latency
from tests.tiny import make_tiny_model

PROMPTS = ["hello world hello world", "abcabcabc", "The quick brown fox", "zz", "tiny tim",
           "0101010101 0101"]
N = 16


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return specrt.Engine.from_pretrained(str(tiny_dir), device="cpu", block_size=4,
                                         cache_tokens=4096)


def _make_pool(engine, d, labels, threshold=0.0, fused=False):
    """A pool of ngram + recycling whose router sends PROMPTS[i] to cluster labels[i]
    (cluster 0 -> ngram, 1 -> recycling, or with ``fused`` to ngram+recycling fused)."""
    X = engine_prompt_features(engine, PROMPTS)
    names = ["ngram", "ngram+recycling" if fused else "recycling"]
    r = MLPRouter(X.shape[1], 2, names, "ngram", hidden=64, threshold=threshold)
    r.fit(X, torch.tensor(labels), epochs=400)
    assert r.predict_clusters(X).tolist() == labels
    V = engine.model.args.vocab_size
    ng, rc = NgramDrafter(), RecyclingDrafter(V, k=4)
    entries = [drafter_entry(ng), drafter_entry(rc)]
    if fused:
        entries.append(drafter_entry(FusedDrafter([ng, rc], name=names[1], split="share")))
    write_pool(d, model=engine.model, drafters=entries,
               default_drafter="ngram", router=r, centroids=torch.randn(2, X.shape[1]),
               mean=X.mean(0), std=X.std(0), metric="cosine",
               clusters=[{"id": c, "size": labels.count(c), "tasks": {}, "drafter": n,
                          "candidates": {}} for c, n in enumerate(names)])
    return X, r


def test_pool_round_trip_same_routing(engine, tmp_path):
    labels = [0, 1, 0, 1, 0, 1]
    X, r = _make_pool(engine, tmp_path, labels, threshold=0.6)
    meta = json.loads((tmp_path / "pool.json").read_text())
    assert meta["format"] == "specrt-pool" and meta["target"]["vocab_size"] == 96
    assert {d["kind"] for d in meta["drafters"]} == {"ngram", "recycling"}
    drafters, router, default, meta2 = load_pool(tmp_path, engine.model)
    assert default == "ngram" and [d.name for d in drafters] == ["ngram", "recycling"]
    assert drafters[1].k == 4
    feats = torch.cat([X, torch.randn(64, X.shape[1]) * X.std(0) + X.mean(0)])
    assert router.route(feats) == r.route(feats)
    got = router.route(feats)
    assert {n for n, _, _ in got} <= {"ngram", "recycling"}
    for n, c, f in got:  # below-threshold routes fall back to the default
        assert (n == ["ngram", "recycling"][c]) or (f < 0.6 and n == "ngram")
    # centroid mode and router-only save/load
    r.save(tmp_path / "r2.safetensors")
    r2 = MLPRouter.load(tmp_path / "r2.safetensors", {"mode": "centroid"})
    assert r2.mode == "centroid" and len(r2.route(feats)) == len(feats)


def test_routed_mixed_batch_is_lossless(engine, tiny_dir, tmp_path):
    labels = [0, 1, 1, 0, 1, 0]
    X, r = _make_pool(engine, tmp_path, labels)
    ref = engine.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True),
                          speculative=False)
    eng = specrt.Engine.from_pretrained(str(tiny_dir), pool=str(tmp_path), device="cpu",
                                        block_size=4, cache_tokens=4096, max_batch=6)
    assert eng.router is not None and eng.default_drafter == "ngram"
    for _ in range(2):  # the second pass: recycling's matrix is warm, more acceptance
        # a fixed budget: with the adaptive rule, whether a tiny model's sub-millisecond
        # steps look worth drafting is up to timing noise
        with eng.lengths.fixed_budget(3):
            outs = eng.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True))
        for o, w, c in zip(outs, ref, labels):
            assert o.token_ids == w.token_ids
            assert o.stats["cluster"] == c
            assert o.stats["drafter"] == ["ngram", "recycling"][c]
            assert 0.0 <= o.stats["route_confidence"] <= 1.0
    assert sum(o.stats["accepted_tokens"] for o in outs) > 0
    # a forced drafter overrides routing
    o = eng.generate(PROMPTS[0], SamplingParams(max_tokens=4), drafter="recycling")[0]
    assert o.stats["drafter"] == "recycling" and o.stats["cluster"] is None


def test_fused_drafter_in_a_pool(engine, tiny_dir, tmp_path):
    """A fused entry round-trips, its members are the pool's own drafter objects, and
    requests routed to it stay lossless; a fused entry naming a missing member is a
    clear error at write and at load."""
    labels = [0, 1, 1, 0, 1, 0]
    _make_pool(engine, tmp_path, labels, fused=True)
    drafters, _, _, meta = load_pool(tmp_path, engine.model)
    by = {d.name: d for d in drafters}
    f = by["ngram+recycling"]
    assert isinstance(f, FusedDrafter) and f.split == "share"
    assert f.members[0] is by["ngram"] and f.members[1] is by["recycling"]
    assert meta["drafters"][2]["config"] == {"members": ["ngram", "recycling"], "split": "share"}
    ref = engine.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True),
                          speculative=False)
    eng = specrt.Engine.from_pretrained(str(tiny_dir), pool=str(tmp_path), device="cpu",
                                        block_size=4, cache_tokens=4096, max_batch=6)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True))
    for o, w, c in zip(outs, ref, labels):
        assert o.token_ids == w.token_ids
        assert o.stats["drafter"] == ["ngram", "ngram+recycling"][c]
    meta["drafters"][2]["config"]["members"] = ["ngram", "nope"]
    (tmp_path / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PoolError, match="members"):
        load_pool(tmp_path, engine.model)
    r = MLPRouter(4, 1, ["ngram"], "ngram")
    bad = {"name": "f", "kind": "fused", "files": [], "config": {"members": ["ngram"]}}
    with pytest.raises(ValueError, match="members"):
        write_pool(tmp_path / "w", model=engine.model,
                   drafters=[drafter_entry(NgramDrafter()), bad], default_drafter="ngram",
                   router=r, centroids=torch.randn(1, 4), mean=None, std=None,
                   metric="cosine", clusters=[])


def test_features_identical_to_engine_prefill(engine):
    """What the router sees online equals engine_prompt_features offline (same batch)."""
    seen = []

    class Rec:
        def route(self, feats):
            seen.append(feats.clone())
            return [("ngram", 0, 1.0)] * len(feats)

    eng = specrt.Engine(engine.model, engine.tokenizer, drafters=[NgramDrafter()],
                        router=Rec(), block_size=4, cache_tokens=4096, max_batch=8)
    eng.generate(PROMPTS, SamplingParams(max_tokens=2))
    online = torch.cat(seen)
    offline = engine_prompt_features(engine, PROMPTS, batch_tokens=10**6, max_batch=8)
    # target_hidden sorts by length: same rows, maybe another padding width
    assert torch.allclose(online, offline, atol=1e-5, rtol=0)
    # one at a time: identical computation, identical bits
    for p in PROMPTS[:3]:
        seen.clear()
        eng.generate(p, SamplingParams(max_tokens=2))
        assert torch.equal(seen[0], engine_prompt_features(engine, [p]))


def test_fingerprint_mismatch_and_missing_files(engine, tmp_path, tmp_path_factory):
    _make_pool(engine, tmp_path, [0, 1, 0, 1, 0, 1])
    other = make_tiny_model(tmp_path_factory.mktemp("other"), "llama", seed=9)
    with pytest.raises(PoolError, match="aligned to"):
        specrt.Engine.from_pretrained(str(other), pool=str(tmp_path), device="cpu")
    meta = json.loads((tmp_path / "pool.json").read_text())
    meta["target"]["config_sha"] = "0" * 16  # same weights, other hyper-parameters
    (tmp_path / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PoolError, match="config_sha"):
        load_pool(tmp_path, engine.model)
    load_pool(tmp_path, engine.model, check=False)
    (tmp_path / "router.safetensors").unlink()
    with pytest.raises(PoolError, match="router"):
        load_pool(tmp_path, engine.model, check=False)
    with pytest.raises(PoolError, match="pool.json"):
        load_pool(tmp_path / "nowhere", engine.model)


def test_router_latency_is_small(engine, monkeypatch):
    """Routing costs one pass of the small MLP head per request, counted in FLOPs (not
    timed: a wall-clock bound fails on a loaded machine and passes a slow router on a
    fast one); router_latency times ``reps`` route calls after one warm-up."""
    from torch.utils.flop_counter import FlopCounterMode

    X = engine_prompt_features(engine, PROMPTS)
    D, H, K = X.shape[1], 128, 3
    r = MLPRouter(D, K, ["a", "b", "a"], "a", hidden=H)
    one_pass = 2 * (D * H + H * K + K * len(r.drafter_names))  # fc1, fc2, cluster->drafter
    for B in (1, len(PROMPTS)):
        with FlopCounterMode(display=False) as fc:
            assert len(r.route(X[:B])) == B
        assert fc.get_total_flops() == B * one_pass
    calls = []
    route = r.route
    monkeypatch.setattr(r, "route", lambda x: calls.append(tuple(x.shape)) or route(x))
    assert router_latency(r, D, reps=10) > 0
    assert calls == [(1, D)] * 11
