"""Fused drafters: merged trees respect the budget and dedupe shared prefixes; the fill
split runs later members only on what earlier ones left; the target accepts along any
member's proposal (a fused pair accepts what its right member alone would); bad members
are refused."""
import pytest
import torch

import specrt
from specrt import SamplingParams
from specrt.draft import (DraftTree, FusedDrafter, NgramDrafter, SeqState, Verified,
                          lookup_drafter)
from specrt.draft.adaptive import LengthController
from specrt.draft.model import DraftNet, ModelDrafter
from tests.drafters import ScriptedTreeDrafter, greedy_reference


class Fixed:
    """Proposes a fixed tree (cut to the budget, parents first); counts its calls."""

    kind = "test"

    def __init__(self, name, tokens, parents):
        self.name, self.tokens, self.parents = name, tokens, parents
        self.budgets = []

    def begin(self, seq, prompt_hidden):
        seq.state["mine"] = self.name

    def propose(self, seqs, budgets):
        self.budgets.append(list(budgets))
        return [DraftTree([s.tokens[-1], *self.tokens[:b]], [-1, *self.parents[:b]])
                for s, b in zip(seqs, budgets)]

    def update(self, seq, result):
        seq.state.setdefault("seen", []).append(list(result.path))

    def release(self, seq):
        seq.state["released"] = True


def _seq():
    return SeqState(seq_id=0, tokens=[7, 8, 9], prompt_len=3)


def test_fill_split_gives_later_members_what_is_left_and_dedupes():
    a = Fixed("a", [1, 2, 3], [0, 1, 2])          # a chain 1-2-3
    b = Fixed("b", [1, 5, 6, 4], [0, 1, 0, 3])    # 1 (dup of a's), 5 under it; 6-4
    f = FusedDrafter([a, b], split="fill")
    s = _seq()
    f.begin(s, None)
    t = f.propose([s], [5])[0]
    assert b.budgets == [[2]]                     # a drafted 3 of 5
    # b's "1" merges into a's node 1, its "5" becomes a sibling of a's "2"
    assert t.tokens == [9, 1, 2, 3, 5] and t.parents == [-1, 0, 1, 2, 1]
    t = f.propose([s], [3])[0]                    # a fills the budget: b does not run
    assert b.budgets == [[2]] and t.tokens == [9, 1, 2, 3]
    t = f.propose([s], [0])[0]
    assert t.tokens == [9] and len(a.budgets) == 2  # nothing to draft: nobody runs


def test_tiered_lookup_fill_sure_copies_then_model_then_any_copy():
    """``ngram2+model+ngram``: a 2+-token suffix match fills the budget alone; without
    one the model drafts, and 1-token matches fill what it left."""
    model = Fixed("m", [3], [0])                        # the model drafts one token
    f = FusedDrafter([lookup_drafter("ngram2", 100), model, lookup_drafter("ngram", 100)])
    assert f.name == "ngram2+m+ngram"
    s = SeqState(seq_id=0, tokens=[5, 6, 1, 7, 8, 1], prompt_len=6)  # [8, 1] never seen
    f.begin(s, None)
    t = f.propose([s], [3])[0]
    assert model.budgets == [[3]]
    assert t.tokens == [1, 3, 7, 8] and t.parents == [-1, 0, 0, 2]  # model's 3; then 7-8
    s = SeqState(seq_id=1, tokens=[5, 1, 7, 8, 5, 1], prompt_len=6)  # [5, 1] seen: copy
    f.begin(s, None)
    t = f.propose([s], [3])[0]
    assert model.budgets == [[3]] and t.tokens == [1, 7, 8, 5]      # the model not run


def test_reset_reaches_members_that_learn_across_requests():
    rec = lookup_drafter("recycling", 50)
    rec.matrix[3, 0] = 7
    f = FusedDrafter([lookup_drafter("ngram", 50), rec])
    f.reset()                                    # n-gram has no reset; recycling forgets
    assert (rec.matrix == -1).all()


def test_lookup_drafter_names():
    d = lookup_drafter("ngram2", 100)
    assert isinstance(d, NgramDrafter) and d.name == "ngram2" and d.min_ngram == 2
    assert lookup_drafter("ngram", 100).min_ngram == 1
    assert lookup_drafter("recycling", 100).name == "recycling"
    assert lookup_drafter("baseline", 100) is None
    with pytest.raises(ValueError, match="1..8"):
        lookup_drafter("ngram0", 100)


def test_share_split_round_robin_within_budget():
    a = Fixed("a", [1, 2, 3, 4], [0, 1, 2, 3])
    b = Fixed("b", [1, 5, 6, 7], [0, 1, 2, 3])
    f = FusedDrafter([a, b], split="share")
    s = _seq()
    f.begin(s, None)
    t = f.propose([s], [4])[0]
    assert a.budgets == [[4]] and b.budgets == [[4]]
    # a1 (= b1), a2, b2 under node 1, a3; b3 does not fit
    assert t.tokens == [9, 1, 2, 5, 3] and t.parents == [-1, 0, 1, 1, 2]
    for n in range(1, 9):
        t = f.propose([s], [n])[0]
        assert len(t) <= n + 1
        d = t.depths()
        assert all(d[p] + 1 == d[i] for i, p in enumerate(t.parents) if i)


def test_members_keep_their_own_state_and_see_every_step():
    a, b = Fixed("a", [1], [0]), Fixed("b", [2], [0])
    f = FusedDrafter([a, b])
    s = _seq()
    f.begin(s, None)
    assert [v.state["mine"] for v in f._views(s)] == ["a", "b"]
    t = f.propose([s], [2])[0]
    v = Verified(t, [0, 2], [2, 11], torch.zeros(3, 96), torch.zeros(3, 8))
    f.update(s, v)
    assert [x.state["seen"] for x in f._views(s)] == [[[0, 2]], [[0, 2]]]
    views = f._views(s)
    f.release(s)
    assert all(x.state["released"] for x in views) and "fused" not in s.state


def test_refuses_bad_members():
    a = Fixed("a", [1], [0])
    with pytest.raises(ValueError, match="at least two"):
        FusedDrafter([a])
    with pytest.raises(ValueError, match="split"):
        FusedDrafter([a, a], split="zip")
    with pytest.raises(ValueError, match="nest"):
        FusedDrafter([a, FusedDrafter([a, a])])
    s = _seq()
    q = FusedDrafter([a, ScriptedTreeDrafter("q", {}, 96, sampled=True)])
    q.begin(s, None)
    with pytest.raises(ValueError, match="deterministic"):
        q.propose([s], [3])


PROMPTS = ["hello world hello world", "abcabcabc", "The quick brown fox", "zz", "tiny tim"]
N = 24


@pytest.fixture(scope="module")
def setup(tiny_llama):
    eng = specrt.Engine.from_pretrained(str(tiny_llama), device="cpu", block_size=4,
                                        cache_tokens=2048, drafters=[])
    return (eng, *greedy_reference(eng, PROMPTS, N))


def _run(setup, drafter, max_draft, batch=5):
    eng, _, want = setup
    e = specrt.Engine(eng.model, eng.tokenizer, drafters=[drafter], block_size=4,
                      cache_tokens=2048, adaptive=False, max_draft=max_draft)
    outs = e.generate(PROMPTS[:batch], SamplingParams(max_tokens=N, ignore_eos=True))
    for o, w in zip(outs, want):
        assert o.token_ids == w
        assert o.stats["drafter"] == drafter.name
    return outs


@pytest.mark.parametrize("split", ["fill", "share"])
def test_greedy_lossless_with_model_member(setup, split):
    eng = setup[0]
    net = DraftNet.from_target(eng.model, arch="eagle", num_layers=1)
    m = ModelDrafter(net, name="m", mode="tree", topk=2, threshold=0.0, cache_tokens=1024,
                     block_size=4)
    outs = _run(setup, FusedDrafter([NgramDrafter(), m], split=split), max_draft=5)
    assert sum(o.stats["drafted_tokens"] - o.stats["accepted_tokens"] for o in outs) > 0
    assert m.cache.allocator.num_free == m.cache.allocator.num_blocks  # all released


def test_accepts_along_any_member(setup):
    """A member that is always right fused behind one that is always wrong: the share
    split gives each half of a budget of 4, so the pair needs about as many steps as
    the right member alone with a budget of 2 (a few more: near the end of a request
    the budget shrinks to what is left to generate, and the right member gets half of
    that) -- and many fewer than the wrong one alone."""
    _, ref, _ = setup

    def right():
        return ScriptedTreeDrafter("right", ref, 96, p_true=1.0, chain=True)

    def wrong(seed=1):
        return ScriptedTreeDrafter("wrong", ref, 96, p_true=0.0, chain=True, seed=seed)

    w, r = wrong(), right()
    fused = _run(setup, FusedDrafter([w, r], split="share"), max_draft=4)
    alone = _run(setup, right(), max_draft=2)
    bad = _run(setup, wrong(), max_draft=4)
    steps = [sum(o.stats["steps"] for o in x) for x in (fused, alone, bad)]
    assert steps[1] <= steps[0] <= 1.15 * steps[1] < 0.6 * steps[2], steps
    # fill: the wrong member takes the whole budget, so the right one never drafts
    fill = _run(setup, FusedDrafter([wrong(), right()], split="fill"), max_draft=4)
    assert sum(o.stats["steps"] for o in fill) > 0.9 * steps[2]


def test_lm_model_drafter_cannot_be_fused(setup):
    net = DraftNet.from_target(setup[0].model, arch="lm", num_layers=1)
    m = ModelDrafter(net, name="m", cache_tokens=256, block_size=4)
    with pytest.raises(ValueError, match="eagle"):
        FusedDrafter([NgramDrafter(), m])


def test_merged_nodes_name_their_member_and_skipped_members_do_not_run():
    a = Fixed("a", [1, 2], [0, 1])
    b = Fixed("b", [1, 5, 6], [0, 1, 0])
    f = FusedDrafter([a, b], split="fill")
    s = _seq()
    f.begin(s, None)
    t = f.propose([s], [5])[0]
    # b's "1" is a's node: the first proposer names it
    assert t.tokens == [9, 1, 2, 5, 6] and t.source == ["", "a", "a", "b", "b"]
    # a request's first call to a member (a model member runs the whole prompt then)
    # is not what a drafted token costs: left out of the costs
    assert f.last_costs == {}
    f.propose([s], [5])
    assert set(f.last_costs) == {"a", "b"} and f.last_costs["a"][1] == 2
    t = f.propose([s], [3], skip={"a"})[0]   # a sits out: b gets the whole budget
    assert t.tokens == [9, 1, 5, 6] and t.source == ["", "b", "b", "b"]
    assert len(a.budgets) == 2 and set(f.last_costs) == {"b"}
    sh = FusedDrafter([a, b], split="share")
    t = sh.propose([s], [3], skip={"b"})[0]
    assert t.tokens == [9, 1, 2] and t.source == ["", "a", "a"]


def test_subtree_renumbers_and_keeps_node_data():
    t = DraftTree([9, 1, 2, 5, 6], [-1, 0, 1, 1, 0], conf=[1, .9, .5, .4, .3],
                  source=["", "a", "a", "b", "b"])
    s = t.subtree([0, 1, 3, 4])
    assert s.tokens == [9, 1, 5, 6] and s.parents == [-1, 0, 1, 0]
    assert s.conf == [1, .9, .4, .3] and s.source == ["", "a", "b", "b"]
    with pytest.raises(ValueError, match="parent"):
        t.subtree([0, 2])
    with pytest.raises(ValueError, match="ascending"):
        t.subtree([1, 0])


class _Expensive(LengthController):
    """The length rule with a compute-bound forward: a step's fixed cost 40 ms, each
    token 4 ms more (what a 2-core CPU looks like at batch 8 in fp32, steeper)."""

    def forward_cost(self, n_tokens):
        return 0.040 + 0.004 * n_tokens

    def forward_model(self):
        return 0.040, 0.004


def test_under_load_the_failing_member_stops_being_verified_and_output_stays_exact(setup):
    """A right and a wrong member share every budget of 4 at batch 5 under a
    compute-bound cost model: the rule learns that the wrong member's nodes fail, leaves
    the member out (but for its probes) and cuts what it still proposes; the output is
    the target's, token for token. Control: with the rule off (fixed budgets) half of
    the verified nodes are the wrong member's."""
    eng, ref, want = setup

    def run(adaptive):
        fused = FusedDrafter([ScriptedTreeDrafter("wrong", ref, 96, p_true=0.0, chain=True),
                              ScriptedTreeDrafter("right", ref, 96, p_true=1.0, chain=True)],
                             split="share")
        e = specrt.Engine(eng.model, eng.tokenizer, drafters=[fused], block_size=4,
                          cache_tokens=2048, max_draft=4)
        lc = _Expensive(max_draft=4, adaptive=adaptive)
        seen = {"right": 0, "wrong": 0}
        real = e._verify

        def verify(reqs, trees):
            for t in trees:
                for src in (t.source or [])[1:]:
                    seen[src] += 1
            return real(reqs, trees)

        e._verify = verify
        with e.using(lengths=lc):
            outs = e.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True))
        assert [o.token_ids for o in outs] == want
        return seen, lc, fused.name

    seen, lc, name = run(adaptive=True)
    assert seen["wrong"] * 8 < seen["right"], seen
    assert lc.node_rate(name, "right", 1) > 0.8 > 0.3 > lc.node_rate(name, "wrong", 1)
    fixed, _, _ = run(adaptive=False)
    assert fixed["wrong"] >= 0.8 * fixed["right"] > 0, fixed
