"""The engine's step API: add_request / step / abort / has_unfinished, streams that are
abandoned at any event, and the scoped override that tools use instead of attribute
swaps. Contract: no KV block outlives its request; aborting one request changes no
other request's output."""
import gc
import operator

import pytest

import specrt
from specrt import SamplingParams
from specrt.draft import NgramDrafter, RecyclingDrafter
from specrt.draft.adaptive import LengthController
from tests.drafters import ScriptedTreeDrafter, greedy_reference, run_to_end

PROMPTS = ["hello world hello world", "abcabcabc", "The quick brown fox", "zz", "tiny tim"]
N = 20


@pytest.fixture(scope="module")
def reference(tiny_llama):
    eng = specrt.Engine.from_pretrained(str(tiny_llama), device="cpu", block_size=4,
                                        cache_tokens=2048)
    return greedy_reference(eng, PROMPTS, N)


@pytest.fixture
def engine(tiny_llama, reference):
    drafters = [ScriptedTreeDrafter("tree", reference[0], 96, seed=1), NgramDrafter(),
                RecyclingDrafter(96, k=4)]
    return specrt.Engine.from_pretrained(str(tiny_llama), device="cpu", block_size=4,
                                         cache_tokens=1024, max_batch=4, drafters=drafters,
                                         max_draft=4)


def all_free(eng) -> bool:
    a = eng.cache.allocator
    return a.num_free == a.num_blocks and not eng.cache.seqs


def test_step_api_serves_requests_like_generate(engine, reference):
    p = SamplingParams(max_tokens=N, ignore_eos=True)
    rids = [engine.add_request(q, p) for q in PROMPTS]   # 5 requests, batch of 4
    assert engine.has_unfinished() and len(set(rids)) == 5
    outs = run_to_end(engine)
    assert [outs[r].token_ids for r in rids] == reference[1]
    assert not engine.has_unfinished() and all_free(engine)
    assert engine.step() == []                           # nothing left: a no-op


def test_step_events_carry_text_deltas_that_add_up(engine):
    p = SamplingParams(max_tokens=N, ignore_eos=True)
    rid = engine.add_request(PROMPTS[2], p)
    text, toks, fin = "", [], None
    while engine.has_unfinished():
        for ev in engine.step():
            assert ev.request_id == rid and ev.index is None
            text += ev.text
            toks += ev.token_ids
            fin = ev.output if ev.finished else fin
    assert fin is not None and text == fin.text and toks == fin.token_ids


@pytest.mark.parametrize("when", [0, 2, 5])
def test_abort_mid_generation_frees_blocks_and_leaves_others_unchanged(engine, reference,
                                                                      when):
    p = SamplingParams(max_tokens=N, ignore_eos=True)
    rids = [engine.add_request(q, p, drafter="tree") for q in PROMPTS]
    victim = rids[1]
    outs = run_to_end(engine, abort_at=(when, victim))
    assert victim not in outs                            # aborted: no output event
    for i, r in enumerate(rids):
        if r != victim:
            assert outs[r].token_ids == reference[1][i], i
    assert all_free(engine) and engine.lengths.tracked == 0
    engine.abort(victim)                                 # again: ignored
    engine.abort(12345)                                  # unknown: ignored


def test_abort_a_waiting_request_and_a_running_one(engine):
    p = SamplingParams(max_tokens=N, ignore_eos=True)
    rids = [engine.add_request(q, p) for q in PROMPTS]   # the 5th waits (batch of 4)
    engine.step()
    assert engine.cache.allocator.num_free < engine.cache.allocator.num_blocks
    engine.abort(rids[4])                                # still waiting
    for r in rids[:4]:
        engine.abort(r)                                  # running
    assert not engine.has_unfinished() and all_free(engine)
    assert engine.step() == []


@pytest.mark.parametrize("how", ["break", "raise", "close", "drop"])
def test_abandoned_streams_leak_no_blocks(engine, how):
    """A stream given up at its first event (break, an exception in the caller, close(),
    or just dropped), many times: every block comes back and a long request is served."""
    long = SamplingParams(max_tokens=4000, ignore_eos=True)   # reserves most of the cache
    for _ in range(6):
        s = engine.stream(PROMPTS[0], long)
        if how == "break":
            for _ev in s:
                break
        elif how == "raise":
            with pytest.raises(KeyError):
                for _ev in s:
                    raise KeyError("caller failed")
        elif how == "close":
            next(s)
            s.close()
        else:
            next(s)
        del s
        gc.collect()
        assert all_free(engine), how
    out = engine.generate(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True))[0]
    assert len(out.token_ids) == 200 and all_free(engine)


def test_stream_refuses_bad_input_when_called_not_when_iterated(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.stream("")
    with pytest.raises(ValueError, match="unknown drafter"):
        engine.stream("hi", drafter="nope")
    assert not engine.has_unfinished() and all_free(engine)


def test_add_request_takes_token_ids_and_checks_them(engine, reference):
    ids = engine.tokenizer.encode_prompt(PROMPTS[3])
    rid = engine.add_request(ids, SamplingParams(max_tokens=N, ignore_eos=True))
    assert run_to_end(engine)[rid].token_ids == reference[1][3]
    for bad in ([], [10**6], "   ", 3.5):
        with pytest.raises(ValueError):
            engine.add_request(bad)
    with pytest.raises(ValueError, match="unknown drafter"):
        engine.add_request("hi", drafter="nope")
    assert not engine.has_unfinished()


def test_using_is_scoped_and_restores_everything(engine, reference):
    before = (dict(engine.drafters), engine.default_drafter, engine.lengths, engine.max_batch)
    lc = LengthController(max_draft=2, adaptive=False)
    only = NgramDrafter(name="only")
    with engine.using(drafters=[only], lengths=lc, max_batch=1):
        assert list(engine.drafters) == ["only"] and engine.default_drafter == "only"
        assert engine.lengths is lc and engine.max_batch == 1
        outs = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=N, ignore_eos=True))
        assert [o.stats["drafter"] for o in outs] == ["only", "only"]
        assert [o.token_ids for o in outs] == reference[1][:2]
        assert all(o.stats["drafted_tokens"] <= 2 * o.stats["steps"] for o in outs)
    assert (dict(engine.drafters), engine.default_drafter, engine.lengths,
            engine.max_batch) == before
    with pytest.raises(ZeroDivisionError):          # restored on error too
        with engine.using(max_draft=1, adaptive=False):
            assert engine.lengths.max_draft == 1 and not engine.lengths.adaptive
            raise ZeroDivisionError
    assert engine.lengths.max_draft == 4 and engine.lengths.adaptive
    with pytest.raises(TypeError):
        operator.setitem(engine.drafters, "x", only)   # a read-only view
    engine.add_request("hi")
    with pytest.raises(RuntimeError, match="in flight"):
        with engine.using(max_batch=2):
            pass
    run_to_end(engine)


def test_engine_config_is_one_place_and_validated(tiny_llama):
    from specrt.engine import EngineConfig

    eng = specrt.Engine.from_pretrained(str(tiny_llama), device="cpu", block_size=4,
                                        cache_tokens=64, max_batch=2, max_draft=3)
    assert eng.config == EngineConfig(max_batch=2, cache_tokens=64, block_size=4, max_draft=3)
    assert eng.lengths.max_draft == 3 and eng.cache.allocator.num_blocks == 16
    for bad in (dict(max_batch=0), dict(block_size=-1), dict(max_draft=-1),
                dict(cache_tokens=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)


class Exploding:
    """A drafter that raises in ``where`` (begin, propose or update) from its
    ``after``-th call on; ``release`` raises too."""

    def __init__(self, where, after=0):
        self.name, self.where, self.after, self.calls = "boom", where, after, 0

    def _maybe(self, where):
        if where == self.where:
            self.calls += 1
            if self.calls > self.after:
                raise ZeroDivisionError(f"boom in {where}")

    def begin(self, seq, h):
        self._maybe("begin")

    def propose(self, seqs, budgets):
        self._maybe("propose")
        from specrt.draft.base import DraftTree
        return [DraftTree([s.tokens[-1]], [-1]) for s in seqs]

    def update(self, seq, result):
        self._maybe("update")

    def release(self, seq):
        raise RuntimeError("release fails too")


@pytest.mark.parametrize("where", ["begin", "propose", "update"])
def test_a_failing_drafter_fails_only_its_requests(tiny_llama, reference, where):
    bad = Exploding(where, after=0 if where == "begin" else 2)
    eng = specrt.Engine.from_pretrained(
        str(tiny_llama), device="cpu", block_size=4, cache_tokens=1024, max_batch=5,
        drafters=[NgramDrafter(), ScriptedTreeDrafter("tree", reference[0], 96, seed=1), bad])
    p = SamplingParams(max_tokens=N, ignore_eos=True)
    names = ["ngram", "boom", "tree", "boom", "ngram"]
    rids = [eng.add_request(q, p, drafter=n) for q, n in zip(PROMPTS, names)]
    with pytest.warns(UserWarning, match="failed to release"):
        outs = run_to_end(eng)
    for i, (rid, n) in enumerate(zip(rids, names)):
        if n == "boom":
            o = outs[rid]
            assert o.finish_reason == "error" and f"failed in {where}" in o.error
            assert "boom" in o.error and len(o.token_ids) < N
            assert o.token_ids == reference[1][i][:len(o.token_ids)]   # what it emitted is right
        else:
            assert outs[rid].finish_reason == "length" and outs[rid].error is None
            assert outs[rid].token_ids == reference[1][i]
    assert all_free(eng)
    again = eng.generate(PROMPTS[0], p, drafter="ngram")[0]           # the engine goes on
    assert again.token_ids == reference[1][0]
