"""Target-distillation data (specrt.draft.corpus) and drafter training
(specrt.draft.train): a collection interrupted and resumed writes the very shards an
uninterrupted one writes; a shard on disk is always whole; a truncated or corrupt shard
is refused with its file and line named and nothing collected is lost; training resumed
from its checkpoint ends where an uninterrupted run ends."""
import json

import pytest
import torch

import specrt
from specrt.draft import corpus
from specrt.draft.model import DraftNet
from specrt.draft.train import parse_samples, sequences, stage_train
from tests.tiny import make_tiny_model

ROWS = [{"id": f"r{i}", "task": ("chat", "math", "code")[i % 3],
         "prompt": ("abc", "hello there", "x = 1 + 2", "the cat sat", "print(1)",
                    "qq ww ee", "one two", "zzz")[i]} for i in range(8)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp("corpus"), "llama", seed=3)
    return specrt.Engine.from_pretrained(str(d), device="cpu", block_size=4,
                                         cache_tokens=4096, drafters=[], max_batch=3)


def _items(engine):
    return corpus.plan(ROWS, engine.tokenizer.encode_prompt, samples={"chat": 2, "code": 1})


def test_plan_greedy_pass_first_then_samples(engine):
    items = _items(engine)
    assert [(i.id, i.sample) for i in items[:8]] == [(f"r{i}", 0) for i in range(8)]
    assert [i.sample for i in items[8:]] == [1] * 5 + [2] * 3   # chat 2 extra, code 1
    assert all(i.temperature > 0 for i in items[8:])
    assert len({i.seed for i in items}) == len(items)
    with pytest.raises(ValueError, match="no field 'task'"):
        corpus.plan([{"id": 1, "prompt": "x"}], engine.tokenizer.encode_prompt)
    assert parse_samples("chat=3, code=1") == {"chat": 3, "code": 1}
    with pytest.raises(ValueError, match="'chat' is not TASK=N"):
        parse_samples("chat")


def _shards(d):
    return {p.name: p.read_bytes() for p in corpus.shard_paths(d)}


def test_interrupted_collection_resumes_to_the_same_shards(engine, tmp_path):
    items = _items(engine)
    kw = dict(max_tokens=12, batch=3, shard_size=4, progress=False)
    full = corpus.collect(engine, items, tmp_path / "a", **kw)
    assert full["complete"] and full["new"] == len(items)
    r1 = corpus.collect(engine, items, tmp_path / "b", stop_after_shards=2, **kw)
    assert not r1["complete"] and r1["new"] == 8
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    r2 = corpus.collect(engine, items, tmp_path / "b", **kw)
    assert r2["complete"] and r2["new"] == len(items) - 8
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b")
    recs = corpus.read_shards(tmp_path / "a")
    assert [(r["id"], r["sample"]) for r in recs] == [i.key for i in items]
    # sampled outputs differ from the greedy one of the same prompt, somewhere
    by = {(r["id"], r["sample"]): r["output_ids"] for r in recs}
    assert any(by[(i, 0)] != by[(i, 1)] for i in ("r0", "r3", "r6"))
    # a rerun has nothing to do
    assert corpus.collect(engine, items, tmp_path / "a", **kw)["new"] == 0


def test_ctrl_c_leaves_whole_shards_only_and_frees_the_engine(engine, tmp_path, monkeypatch):
    items = _items(engine)
    calls = {"n": 0}
    real = engine.step

    def step():
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(engine, "step", step)
    with pytest.raises(KeyboardInterrupt):
        corpus.collect(engine, items, tmp_path, max_tokens=12, batch=3, shard_size=4,
                       progress=False)
    monkeypatch.undo()
    assert not engine.has_unfinished()
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    got = corpus.read_shards(tmp_path)          # whatever is there is whole
    assert len(got) % 4 == 0 and len(got) < len(items)
    assert not list(tmp_path.glob(".*tmp"))
    r = corpus.collect(engine, items, tmp_path, max_tokens=12, batch=3, shard_size=4,
                       progress=False)
    assert r["complete"] and len(corpus.read_shards(tmp_path)) == len(items)


@pytest.mark.parametrize("damage", ["truncate", "garble", "count"])
def test_damaged_shard_is_refused_naming_it_and_nothing_is_lost(engine, tmp_path, damage):
    items = _items(engine)
    corpus.collect(engine, items, tmp_path, max_tokens=8, batch=3, shard_size=4,
                   progress=False)
    paths = corpus.shard_paths(tmp_path)
    before = {p: p.read_bytes() for p in paths}
    bad = paths[1]
    text = bad.read_text()
    if damage == "truncate":
        bad.write_text(text[: len(text) // 2])
    elif damage == "garble":
        bad.write_text(text.replace('"output_ids"', '"outp', 1))
    else:
        lines = text.splitlines()
        bad.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=bad.name):
        corpus.read_shards(tmp_path)
    with pytest.raises(ValueError, match=bad.name):
        corpus.collect(engine, items, tmp_path, max_tokens=8, batch=3, progress=False)
    for p in paths:  # nothing deleted, the other shards untouched
        assert p.is_file()
        if p != bad:
            assert p.read_bytes() == before[p]


def test_training_resumed_from_its_checkpoint_ends_where_an_uninterrupted_run_ends(
        engine, tmp_path):
    items = corpus.plan(ROWS, engine.tokenizer.encode_prompt)
    corpus.collect(engine, items, tmp_path / "c", max_tokens=16, batch=3, progress=False)
    seqs = sequences(engine.model, corpus.read_shards(tmp_path / "c"), progress=False,
                     taps=(0, 1))
    vocab = torch.arange(3, 60)

    def run(ckpt, max_batches=None, net=None):
        net = net or DraftNet.from_target(engine.model, arch="eagle3", num_layers=1,
                                          vocab_ids=vocab)
        s = stage_train(net, engine.model, seqs, epochs=3, lr=3e-3, max_len=16,
                        batch_tokens=48, feat_weight=0.0, seed=1, time_budget_s=1e9,
                        ttt_steps=3, checkpoint=ckpt, max_batches=max_batches)
        return net, s

    torch.manual_seed(0)
    a, sa = run(tmp_path / "a.ckpt")
    assert sa["steps"] == sa["planned_steps"] > 6
    _, s1 = run(tmp_path / "b.ckpt", max_batches=4)
    assert s1["steps"] == 4
    b, sb = run(tmp_path / "b.ckpt")
    assert sb["steps"] == sa["steps"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.allclose(va, vb, atol=1e-6), ka
    (tmp_path / "b.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="b.ckpt: unreadable training checkpoint"):
        run(tmp_path / "b.ckpt")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_file", "config"])
def test_damaged_drafter_file_is_refused_naming_it(engine, tmp_path, damage):
    net = DraftNet.from_target(engine.model, arch="eagle3", num_layers=1,
                               vocab_ids=torch.arange(3, 60))
    net.save(tmp_path / "d.safetensors", tmp_path / "d.json")
    w, c = tmp_path / "d.safetensors", tmp_path / "d.json"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "garbage":
        w.write_bytes(b"\x00" * 64)
    elif damage == "no_file":
        w.unlink()
    else:
        c.write_text("{ not json")
    err = FileNotFoundError if damage == "no_file" else ValueError
    with pytest.raises(err, match="d.json" if damage == "config" else "d.safetensors"):
        DraftNet.load(c, engine.model)


def test_samples_naming_an_unknown_task_is_refused(tmp_path):
    from specrt.draft.train import main

    pf = tmp_path / "p.jsonl"
    pf.write_text(json.dumps({"id": "a", "task": "chat", "prompt": "hi"}) + "\n")
    with pytest.raises(ValueError, match="--samples: unknown task 'chta'.*chat"):
        main(["--out", str(tmp_path / "o"), "--prompts", str(pf), "--samples", "chta=2",
              "--target", "/nonexistent"])


def test_training_with_no_time_left_stops_cleanly(engine, tmp_path):
    """A zero time budget (what a spent ``--budget`` leaves) trains nothing, raises nothing."""
    items = corpus.plan(ROWS[:3], engine.tokenizer.encode_prompt)
    corpus.collect(engine, items, tmp_path, max_tokens=8, batch=3, progress=False)
    seqs = sequences(engine.model, corpus.read_shards(tmp_path), progress=False)
    net = DraftNet.from_target(engine.model, arch="eagle", num_layers=1,
                               vocab_ids=torch.arange(3, 60))
    s = stage_train(net, engine.model, seqs, epochs=1, lr=1e-3, max_len=16, batch_tokens=48,
                    feat_weight=0.0, seed=0, time_budget_s=0.0)
    assert s["steps"] == 0


def test_warm_start_continues_from_a_saved_drafter_and_keeps_its_vocabulary(tmp_path):
    """``--init`` trains on from a saved drafter: the result keeps its reduced vocabulary,
    records where it started, and differs from the start; a start of another
    architecture is refused before anything is collected."""
    from specrt.draft.train import main

    tiny = make_tiny_model(tmp_path / "m", "llama", seed=3)
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps({"id": f"w{i}", "task": ("chat", "code")[i % 2],
                                      "prompt": f"say {i} then {i * 7} and {i % 5}"}) + "\n"
                          for i in range(40)))
    def run(run_id: str, *extra: str, kind: str = "eagle3") -> int:
        return main(["--target", str(tiny), "--prompts", str(pf), "--per-task", "8",
                     "--max-tokens", "6", "--kind", kind, "--ttt-steps", "2", "--epochs",
                     "1", "--batch-tokens", "64", "--max-len", "32", "--vocab", "40",
                     "--eval-prompts", "0", "--reserve-frac", "0", "--held-frac", "0",
                     "--gen-batch", "4", "--out", str(tmp_path / run_id), "--work",
                     str(tmp_path / f"w{run_id}"), *extra])

    assert run("a") == 0
    start = tmp_path / "a" / "baseline.json"
    assert run("b", "--init", str(start), "--vocab", "30") == 0
    engine = specrt.Engine.from_pretrained(str(tiny), device="cpu", drafters=[])
    a = DraftNet.load(start, engine.model)
    b = DraftNet.load(tmp_path / "b" / "baseline.json", engine.model)
    assert torch.equal(a.vocab_ids, b.vocab_ids) and a.vocab_ids.numel() == 40
    cfg = json.loads((tmp_path / "b" / "baseline.json").read_text())
    assert cfg["init"]["from"] == str(start) and cfg["init"]["train"]["steps"] > 0
    sa, sb = a.state_tensors(), b.state_tensors()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)          # training moved it
    with pytest.raises(ValueError, match="--init .*eagle3 drafter; this run trains a 1-layer eagle"):
        run("c", "--init", str(start), kind="eagle")
    assert not corpus.shard_paths(tmp_path / "wc" / "corpus")      # nothing collected


def test_cached_states_are_read_back_and_only_new_or_damaged_records_are_computed(
        engine, tmp_path, monkeypatch):
    import specrt.align.features as features

    items = corpus.plan(ROWS, engine.tokenizer.encode_prompt)
    corpus.collect(engine, items, tmp_path / "c", max_tokens=12, batch=3, progress=False)
    recs = corpus.read_shards(tmp_path / "c")
    fresh = sequences(engine.model, recs, progress=False, taps=(0, 1))
    cache = tmp_path / "states"
    first = sequences(engine.model, recs[:5], progress=False, taps=(0, 1), cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 5

    computed = []
    real = features.target_hidden

    def counting(model, token_lists, **kw):
        computed.extend(token_lists)
        return real(model, token_lists, **kw)

    monkeypatch.setattr(features, "target_hidden", counting)
    damaged = sorted(cache.glob("*.safetensors"))[0]
    damaged.write_bytes(damaged.read_bytes()[:40])      # truncated: recomputed, replaced
    got = sequences(engine.model, recs, progress=False, taps=(0, 1), cache_dir=cache)
    assert len(computed) == 1 + 3                       # the damaged one and the 3 new
    assert len(list(cache.glob("*.safetensors"))) == 8
    assert not list(cache.glob(".*tmp"))
    for a, b in zip(got, fresh):
        assert a["id"] == b["id"] and torch.equal(a["tokens"], b["tokens"])
        assert torch.allclose(a["feats"].float(), b["feats"].float(), atol=2e-2)
        assert torch.equal(a["hidden"], a["feats"][:, -1])
    for a, b in zip(first, got):                        # read back bit for bit
        assert torch.equal(a["feats"], b["feats"])
    computed.clear()
    sequences(engine.model, recs, progress=False, taps=(0, 1), cache_dir=cache)
    assert computed == []
    # other taps, or other weights, are other states: nothing stale is read
    sequences(engine.model, recs[:2], progress=False, taps=(1,), cache_dir=cache)
    assert len(computed) == 2
    computed.clear()
    with torch.no_grad():
        engine.model.norm.mul_(1.5)
    try:
        sequences(engine.model, recs[:2], progress=False, taps=(0, 1), cache_dir=cache)
    finally:
        with torch.no_grad():
            engine.model.norm.div_(1.5)
    assert len(computed) == 2


def test_states_computed_before_an_interruption_are_kept(engine, tmp_path, monkeypatch):
    import specrt.align.features as features

    items = corpus.plan(ROWS, engine.tokenizer.encode_prompt)
    corpus.collect(engine, items, tmp_path / "c", max_tokens=12, batch=3, progress=False)
    recs = corpus.read_shards(tmp_path / "c")
    real = features.target_hidden

    def interrupted(model, token_lists, reduce, **kw):
        done = []

        def r(h, i):
            if len(done) == 3:
                raise KeyboardInterrupt
            done.append(i)
            return reduce(h, i)
        return real(model, token_lists, reduce=r, **kw)

    monkeypatch.setattr(features, "target_hidden", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sequences(engine.model, recs, progress=False, taps=(0, 1), cache_dir=tmp_path / "s")
    assert len(list((tmp_path / "s").glob("*.safetensors"))) == 3
    monkeypatch.setattr(features, "target_hidden", real)
    got = sequences(engine.model, recs, progress=False, taps=(0, 1), cache_dir=tmp_path / "s")
    assert len(got) == len(recs) and len(list((tmp_path / "s").glob("*.safetensors"))) == 8
