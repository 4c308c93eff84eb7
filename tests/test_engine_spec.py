"""Speculative generation is lossless: greedy output equals target-only output token for
token, for every drafter kind, chains and trees, batch 1 and mixed batches; the KV cache
equals the one plain AR builds; sampled output follows the target's distribution."""
import pytest
import torch

import specrt
from specrt import SamplingParams
from specrt.draft import FusedDrafter, NgramDrafter, RecyclingDrafter, lookup_drafter
from specrt.draft.suffix import SuffixDrafter, SuffixIndex
from tests.drafters import ScriptedTreeDrafter, greedy_reference, run_to_end

PROMPTS = ["hello world hello world", "abcabcabc", "The quick brown fox", "zz", "tiny tim"]
N = 24


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """prompt ids -> prompt + greedy AR output, and the AR outputs themselves."""
    eng = specrt.Engine.from_pretrained(str(tiny_dir), device="cpu", block_size=4,
                                        cache_tokens=2048)
    return greedy_reference(eng, PROMPTS, N)


def datastore(reference):
    """A suffix index over the greedy outputs and mutated copies of them (a fifth of
    their tokens replaced), so that its drafts are both accepted and rejected."""
    import random

    rng = random.Random(0)
    outs = reference[1]
    noisy = [[t if rng.random() > 0.2 else rng.randrange(96) for t in o]
             for o in outs for _ in range(2)]
    return SuffixIndex(outs + noisy, window=8, vocab_size=96)


def make_engine(tiny_dir, reference, **kw):
    ref, _ = reference
    store = datastore(reference)
    drafters = [
        NgramDrafter(),
        RecyclingDrafter(96, k=4),
        ScriptedTreeDrafter("tree", ref, 96, seed=1),
        ScriptedTreeDrafter("chain", ref, 96, seed=2, chain=True),
        ScriptedTreeDrafter("tree_q", ref, 96, seed=3, sampled=True),
        FusedDrafter([NgramDrafter(), ScriptedTreeDrafter("f_tree", ref, 96, seed=4)],
                     name="fused", split="share"),
        FusedDrafter([lookup_drafter("ngram2", 96),  # the tiered fill of the shipped pool
                      ScriptedTreeDrafter("t_chain", ref, 96, seed=5, chain=True),
                      NgramDrafter()], name="tiered"),
        SuffixDrafter(store, min_match=1, min_prob=0.0),
        FusedDrafter([lookup_drafter("ngram2", 96), SuffixDrafter(store, "s", min_prob=0.2),
                      NgramDrafter()], name="ngram2+suffix+ngram"),
    ]
    return specrt.Engine.from_pretrained(str(tiny_dir), device="cpu", block_size=4,
                                         cache_tokens=4096, drafters=drafters,
                                         adaptive=False, **kw)


@pytest.mark.parametrize("drafter", ["ngram", "recycling", "tree", "chain", "tree_q", "fused",
                                     "tiered", "suffix", "ngram2+suffix+ngram"])
@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_lossless(tiny_dir, reference, drafter, batch):
    eng = make_engine(tiny_dir, reference, max_draft=5)
    want = reference[1]
    prompts = PROMPTS[:batch]
    outs = eng.generate(prompts, SamplingParams(max_tokens=N, ignore_eos=True), drafter=drafter)
    for o, w in zip(outs, want):
        assert o.token_ids == w
        assert o.stats["drafter"] == drafter
        assert o.stats["steps"] < N or drafter in ("ngram", "recycling")
        assert o.stats["accepted_tokens"] <= o.stats["drafted_tokens"]
    if drafter not in ("ngram", "recycling"):
        assert sum(o.stats["accepted_tokens"] for o in outs) > 0
        assert sum(o.stats["drafted_tokens"] - o.stats["accepted_tokens"] for o in outs) > 0
    assert eng.cache.allocator.num_free == eng.cache.allocator.num_blocks


def test_mixed_drafters_in_one_batch(tiny_dir, reference):
    eng = make_engine(tiny_dir, reference, max_draft=4, max_batch=5)
    names = ["tree", "chain", "fused", "tree_q", "recycling"]
    p = SamplingParams(max_tokens=N, ignore_eos=True)
    rids = [eng.add_request(q, p, drafter=n) for q, n in zip(PROMPTS, names)]  # each its own
    outs = run_to_end(eng)
    for rid, w, n in zip(rids, reference[1], names):
        assert outs[rid].token_ids == w
        assert outs[rid].stats["drafter"] == n


class CacheSpy:
    """A drafter (``inner``, or none: root-only trees, i.e. plain decoding) that keeps
    each sequence's KV cache as it stands when the engine releases the request."""

    def __init__(self, inner=None):
        self.inner, self.name = inner, inner.name if inner else "plain"
        self.engine, self.got = None, {}

    def begin(self, seq, h):
        if self.inner:
            self.inner.begin(seq, h)

    def propose(self, seqs, budgets):
        if self.inner:
            return self.inner.propose(seqs, budgets)
        from specrt.draft.base import DraftTree
        return [DraftTree([s.tokens[-1]], [-1]) for s in seqs]

    def update(self, seq, result):
        if self.inner:
            self.inner.update(seq, result)

    def release(self, seq):  # the engine frees the request's blocks right after
        c = self.engine.cache
        self.got[tuple(seq.tokens[:seq.prompt_len])] = (
            c.length(seq.seq_id), [torch.stack(c.gather(seq.seq_id, l))
                                   for l in range(c.num_layers)])
        if self.inner:
            self.inner.release(seq)


def test_kv_cache_equals_ar_cache(tiny_dir, reference):
    """After many steps with rejections, each sequence's cache equals plain AR's."""
    def snapshots(inner, **kw):
        spy = CacheSpy(inner)
        eng = specrt.Engine.from_pretrained(str(tiny_dir), device="cpu", block_size=4,
                                            cache_tokens=4096, drafters=[spy],
                                            adaptive=False, **kw)
        spy.engine = eng
        eng.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True))
        assert len(spy.got) == len(PROMPTS)
        return [spy.got[tuple(eng.tokenizer.encode_prompt(q))] for q in PROMPTS]

    ar = snapshots(None)
    sp = snapshots(ScriptedTreeDrafter("tree", reference[0], 96, seed=1), max_draft=6)
    for i in range(len(PROMPTS)):
        # spec may end one step later than AR: compare the common committed prefix
        n = min(ar[i][0], sp[i][0])
        assert n >= len(reference[1][i]) - 1
        for la, lb in zip(ar[i][1], sp[i][1]):
            assert torch.allclose(la[:, :n], lb[:, :n], atol=1e-5), f"prompt {i}"


@pytest.mark.parametrize("drafter", ["tree_q", "fused", "chain", "suffix"])
def test_sampled_first_tokens_follow_target(tiny_dir, reference, drafter):
    """Chi-square: the 2nd emitted token (the first decided by verification) of
    speculative sampling follows the target's distribution at that position (sampled
    draft trees: recursive rejection; fused trees and chains of deterministic
    proposals: the coupled verification)."""
    pval, n = _second_token_pvalue(make_engine(tiny_dir, reference, max_draft=3,
                                               max_batch=64), drafter)
    assert n > 200
    assert pval > 1e-3, f"p={pval:.2e} n={n}"


def test_chi_square_catches_a_wrong_coupled_sampler(tiny_dir, reference, monkeypatch):
    """Negative control: the coupled verification drawing from u**1.6 instead of u (a
    sampler biased towards low token ids) fails the same test."""
    import specrt.acceptance as acc

    real = acc.sample_at
    monkeypatch.setattr(acc, "sample_at", lambda probs, u: real(probs, u ** 1.6))
    pval, n = _second_token_pvalue(make_engine(tiny_dir, reference, max_draft=3,
                                               max_batch=64), "chain")
    assert n > 200 and pval < 1e-3, f"p={pval:.2e}: the test cannot see a biased sampler"


def _second_token_pvalue(eng, drafter):
    """(chi-square p-value, draws) of the second emitted token of 1500 seeded sampled
    generations, against the target's distribution after the modal first token."""
    from specrt.sampling import logits_to_probs

    prompt = "abcabcabc"
    # condition on the most frequent first token so one target row is the reference
    n_draws = 1500
    outs = []
    for s in range(0, n_draws, 250):
        outs += eng.generate([prompt] * 250, [SamplingParams(
            max_tokens=2, temperature=1.0, top_k=6, ignore_eos=True, seed=s + i)
            for i in range(250)], drafter=drafter)
    firsts = torch.tensor([o.token_ids[0] for o in outs])
    t0 = int(firsts.mode().values)
    seconds = torch.tensor([o.token_ids[1] for o in outs if o.token_ids[0] == t0])
    ids = eng.tokenizer.encode_prompt(prompt) + [t0]
    # target distribution after prompt + t0, through the engine's own model
    from specrt.cache import PagedKVCache
    c = PagedKVCache(eng.model.args.num_hidden_layers, 32, 16, eng.model.args.num_key_value_heads,
                     eng.model.args.head_dim)
    c.add(0)
    c.reserve(0, len(ids))
    with torch.inference_mode():
        h = eng.model(torch.tensor([ids]), torch.arange(len(ids))[None], c.kv, c.block_table([0]),
                      torch.tensor([0]))
        p = logits_to_probs(eng.model.logits(h[0, -1]), 1.0, 6)
    support = p.nonzero().flatten()
    obs = torch.stack([(seconds == t).sum() for t in support]).double()
    exp = p[support].double() * len(seconds)
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(support) - 1
    pval = float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(chi2 / 2.0)))
    assert set(seconds.tolist()) <= set(support.tolist())
    return pval, len(seconds)


def test_recycling_matrix_learns_from_verification(tiny_dir, reference):
    """After one generation the recycled matrix predicts the greedy continuation, so a
    repeat of the same prompt accepts drafts."""
    eng = make_engine(tiny_dir, reference, max_draft=6)
    p = SamplingParams(max_tokens=N, ignore_eos=True)
    first = eng.generate(PROMPTS[2], p, drafter="recycling")[0]
    again = eng.generate(PROMPTS[2], p, drafter="recycling")[0]
    assert first.token_ids == again.token_ids == reference[1][2]
    assert again.stats["accepted_tokens"] > first.stats["accepted_tokens"]
    assert again.stats["mean_accepted_length"] > 1.5


def test_static_template_is_a_valid_tree_prefix():
    from specrt.draft.recycling import static_template

    t = static_template(40, 6)
    assert len(t) == 40 and t[0] == (-1, 0)
    for i, (parent, rank) in enumerate(t):
        assert parent < i and 0 <= rank < 6
    assert len(set(t)) == len(t)


@pytest.mark.parametrize("drafter", ["tree", "chain"])
def test_acceptance_by_depth_counts_what_verification_kept(tiny_dir, reference, drafter):
    """Per request, ``accepted_by_depth`` sums to the accepted drafts, never exceeds
    ``drafted_by_depth`` and falls with depth; a drafter that always drafts the truth
    accepts every depth, one that never does accepts none."""
    from specrt.measure import Record, summarize

    eng = make_engine(tiny_dir, reference, max_draft=4)
    p = SamplingParams(max_tokens=N, ignore_eos=True)
    outs = eng.generate(PROMPTS, p, drafter=drafter)
    for o in outs:
        d, a = o.stats["drafted_by_depth"], o.stats["accepted_by_depth"]
        assert sum(a) == o.stats["accepted_tokens"]
        assert len(a) <= len(d) and all(x <= y for x, y in zip(a, d))
        assert all(x >= y for x, y in zip(a, a[1:])) and all(x >= y for x, y in zip(d, d[1:]))
    ref, _ = reference
    for p_true in (1.0, 0.0):  # random tokens hit the target's argmax 1 in 96 times
        sure = ScriptedTreeDrafter("sure", ref, 96, seed=0, p_true=p_true, chain=True)
        with eng.using(drafters=[sure]):
            o = eng.generate(PROMPTS[0], p, drafter="sure")[0]
        acc = summarize([Record("t", 1.0, o.stats)])["acceptance_by_depth"]
        assert acc and (all(x == 1.0 for x in acc) if p_true else acc[0] < 0.2), acc


def test_a_requests_first_draft_is_not_priced_by_the_length_rule(tiny_dir, reference):
    """A request's first draft also runs its prompt through the drafter (and a process's
    first packs the drafter's weights): the length rule learns the drafter's cost per
    token from the drafts after it, or that one slow call keeps it from drafting."""
    import time as _time
    ref, _ = reference

    class SlowFirst(ScriptedTreeDrafter):
        def propose(self, seqs, budgets):
            if any(not s.state.get("drafted_once") for s in seqs):
                _time.sleep(2.0)   # one slow call: any EMA of it stays above the bound
                for s in seqs:
                    s.state["drafted_once"] = True
            return super().propose(seqs, budgets)

    eng = specrt.Engine.from_pretrained(str(tiny_dir), device="cpu", block_size=4,
                                        cache_tokens=4096, adaptive=False,
                                        drafters=[SlowFirst("slow_first", ref, 96, seed=1)])
    outs = eng.generate(PROMPTS[:2], SamplingParams(max_tokens=12, ignore_eos=True),
                        drafter="slow_first")
    assert all(o.stats["drafted_tokens"] > 0 for o in outs)
    assert 0 < eng.lengths.draft_cost["slow_first"] < 0.01, eng.lengths.draft_cost


def test_a_prefill_does_not_price_the_length_rules_forwards(tiny_dir, reference):
    """The rule prices verification forwards of a few dozen tokens. A prefill's hundreds
    of tokens, fed to its cost line, set the line's slope by their leverage (on the AMX
    Xeon a 24-token step at batch 8 was priced at 46 ms against ~30 measured, and the rule
    stopped drafting at batch 8): only verification steps are observed."""
    ref, _ = reference
    eng = specrt.Engine.from_pretrained(str(tiny_dir), device="cpu", block_size=4,
                                        cache_tokens=4096,
                                        drafters=[ScriptedTreeDrafter("t", ref, 96, seed=1)])
    prompt = "a long prompt, " * 8
    n_prompt = len(eng.tokenizer.encode(prompt))
    eng.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True), drafter="t",
                 chat=False)
    seen = set(eng.lengths._table)      # token counts of the forwards it observed
    assert n_prompt > 1 + eng.lengths.max_draft
    assert seen and max(seen) <= 1 + eng.lengths.max_draft, (seen, n_prompt)


def test_under_load_a_drafter_that_does_not_pay_yields_to_the_model_free_default(
        tiny_dir, reference):
    """A routed request joining a batch at which its drafter costs more than it returns
    (the length rule's ``pays``) decodes with the default drafter when that one runs no
    model; alone, or with ``load_fallback=False``, it keeps its drafter. Greedy output
    equals plain decoding either way."""
    ref, want = reference

    class ToHead:  # a router that sends every prompt to the model-like drafter
        def route(self, feats):
            return [("head", 0, 1.0)] * len(feats)

    def engine(**kw):
        eng = specrt.Engine.from_pretrained(
            str(tiny_dir), device="cpu", block_size=4, cache_tokens=4096, max_batch=3,
            drafters=[NgramDrafter(), ScriptedTreeDrafter("head", ref, 96, seed=1)],
            default_drafter="ngram", router=ToHead(), **kw)
        for n in range(1, 40):
            eng.lengths.observe_forward(n, 0.02)
        for b in (2, 3):  # the head: a forward's worth of time per drafted token at 2-3
            eng.lengths.observe_draft("head", 4, 4 * 0.05, batch=b)
        return eng

    p = SamplingParams(max_tokens=N, ignore_eos=True)
    for fallback in (True, False):
        eng = engine(load_fallback=fallback)
        outs = eng.generate(PROMPTS[:3], p)
        assert [o.token_ids for o in outs] == want[:3]
        assert {o.stats["drafter"] for o in outs} == ({"ngram"} if fallback else {"head"})
        assert all(o.stats["cluster"] == 0 for o in outs)
        alone = eng.generate(PROMPTS[0], p)[0]
        assert alone.stats["drafter"] == "head" and alone.token_ids == want[0]


def test_a_routed_request_moves_to_the_fallback_when_its_drafter_stops_paying(
        tiny_dir, reference):
    """Mid-request: once the rule has measured that the drafter does not pay at the
    batch size, its routed requests move to the model-free default for the rest (the
    drafter's state released), losslessly; a request forced to the drafter stays."""
    ref, want = reference

    class ToHead:
        def route(self, feats):
            return [("head", 0, 1.0)] * len(feats)

    head = ScriptedTreeDrafter("head", ref, 96, seed=1)
    eng = specrt.Engine.from_pretrained(
        str(tiny_dir), device="cpu", block_size=4, cache_tokens=4096, max_batch=3,
        drafters=[NgramDrafter(), head], default_drafter="ngram", router=ToHead())
    p = SamplingParams(max_tokens=N, ignore_eos=True)
    ids = [eng.add_request(q, p) for q in PROMPTS[:2]] + [
        eng.add_request(PROMPTS[2], p, drafter="head")]
    eng.step()
    assert [eng._requests[i].drafter for i in ids] == ["head"] * 3
    for n in range(1, 40):
        eng.lengths.observe_forward(n, 0.02)
    for _ in range(20):
        eng.lengths.observe_draft("head", 4, 4 * 0.05, batch=3)
    done = {}
    while eng.has_unfinished():
        for ev in eng.step():
            if ev.finished:
                done[ev.request_id] = ev.output
    assert [done[i].token_ids for i in ids] == want[:3]
    assert [done[i].stats["drafter"] for i in ids] == ["ngram", "ngram", "head"]
