"""The adaptive draft-length rule: drafts where it pays, stops where it does not."""
import pytest

from specrt.draft.adaptive import LengthController


def cpu_like(c, flat_until=5, base=0.06):
    """Forward costs flat up to ``flat_until`` tokens, then steep."""
    for n in range(1, 12):
        t = base if n <= flat_until else base * (1 + 0.25 * (n - flat_until))
        c.observe_forward(n, t)
        c.observe_forward(n, t)


def test_budget_follows_acceptance_and_measured_cost():
    c = LengthController(max_draft=8)
    cpu_like(c)
    good = c.track("good", hits=80, trials=100)
    bad = c.track("bad", hits=1, trials=100)
    kg = c.budget("d", good, batch=1, remaining=64)
    assert 3 <= kg <= 5, kg          # cheap up to 5 tokens, steep after: stop near there
    assert c.budget("d", bad, batch=1, remaining=64) <= 1
    # a drafter that costs as much as a forward per token never pays
    c.observe_draft("slow", 4, 4 * 0.06)
    assert c.budget("slow", c.track("s", hits=30, trials=100), batch=1, remaining=64) == 0


def test_plain_decode_probes_again_and_respects_limits():
    c = LengthController(max_draft=6, probe_every=4)
    for n in range(1, 10):
        c.observe_forward(n, 0.05 * n)
        c.observe_forward(n, 0.05 * n)   # linear cost: drafting never pays at a=0
    st = c.track("r", hits=0, trials=50)
    ks = [c.budget("d", st, 1, 64) for _ in range(8)]
    assert ks.count(0) == 6 and ks[3] > 0 and ks[7] > 0
    assert c.budget("d", c.track("g", hits=90, trials=100), 1, remaining=3) <= 2
    # under load the interval grows with the batch: the same probe rows per step
    st16 = c.track("r16", hits=0, trials=50)
    ks16 = [c.budget("d", st16, 16, 64) for _ in range(128)]
    assert [i for i, k in enumerate(ks16) if k] == [63, 127]
    pinned = LengthController(max_draft=5, adaptive=False)
    assert pinned.budget("d", st, 1, 64) == 5


def test_acceptance_estimate_updates():
    c = LengthController(prior=0.5, prior_weight=4)
    st = "request 1"
    assert c.rate("d", st) == 0.5
    for _ in range(20):
        c.observe_accept("d", st, accepted=3, depth=3)
    assert c.rate("d", st) > 0.9


def test_fixed_budget_pins_every_budget_and_restores_the_rule():
    lc = LengthController(max_draft=6)
    st = lc.track(0, hits=0.0, trials=40.0)       # a drafter that never hits: plain decode
    assert lc.budget("d", st, batch=1, remaining=50) == 0
    with lc.fixed_budget(3):
        assert lc.budget("d", st, batch=1, remaining=50) == 3
        assert lc.budget("d", st, batch=1, remaining=2) == 1   # never past the end
    assert lc.adaptive and lc.max_draft == 6
    with pytest.raises(ValueError, match="outside"):
        with lc.fixed_budget(7):
            pass


def test_draft_cost_is_priced_at_the_batch_it_was_measured_at():
    """A drafter cheap per token at batch 1 but dear at batch 8 drafts at 1, not at 8;
    a batch size never measured falls back to the drafter's figure across batches."""
    c = LengthController(max_draft=4)
    for n in range(1, 40):
        c.observe_forward(n, 0.02)
        c.observe_forward(n, 0.02)                  # flat forward: only drafting costs
    for _ in range(5):
        c.observe_draft("d", 8, 8 * 0.004, batch=8)
    for _ in range(20):                             # the latest figures: batch 1's
        c.observe_draft("d", 4, 4 * 0.0005, batch=1)
    st = c.track("r", hits=50, trials=100)
    assert c.drafter_cost("d", 1) == pytest.approx(0.0005)
    assert c.drafter_cost("d", 7) == c.drafter_cost("d", 8) == pytest.approx(0.004)
    assert c.draft_cost["d"] < 0.001    # priced across batches, batch 8 would draft
    assert c.budget("d", st, batch=1, remaining=64) > 0
    assert c.budget("d", st, batch=8, remaining=64) == 0
    assert c.drafter_cost("d", 3) == c.draft_cost["d"]            # 3-4: never measured
    assert c.drafter_cost("unseen", 8) == 0.0


def test_pays_tells_whether_a_drafter_would_draft_at_a_batch_size_without_side_effects():
    """``pays``: the rule's own test (acceptance across requests against the cost per
    drafted token at that batch size) for a request not yet started; it changes no
    history (the engine asks it when routing under load)."""
    c = LengthController(max_draft=4)
    for n in range(1, 40):
        c.observe_forward(n, 0.02)
        c.observe_forward(n, 0.02)
    for _ in range(5):
        c.observe_draft("head", 4, 4 * 0.0005, batch=1)
        c.observe_draft("head", 8, 8 * 0.02, batch=8)   # a forward's worth per token
    c.observe_accept("head", "r0", 2, 4)
    before = (c.tracked, dict(c.drafter_rate["head"].__dict__))
    assert c.pays("head", 1) and not c.pays("head", 8)
    assert (c.tracked, dict(c.drafter_rate["head"].__dict__)) == before
    assert c.pays("never_seen", 8)                      # no cost measured: the prior
    c.adaptive = False
    assert c.pays("head", 8)


def _tree(source):
    """A chain per source under the root: a -> a -> a, and b under the root."""
    from specrt.draft import DraftTree
    return DraftTree([0, 1, 2, 3, 4], [-1, 0, 1, 2, 0], source=source)


def _loaded(c, fixed=0.02, per_token=0.004):
    """Forward cost fixed + per_token * n for n = 1..48 (a compute-bound batch)."""
    for n in range(1, 49):
        for _ in range(2):
            c.observe_forward(n, fixed + per_token * n)


def test_node_rates_count_only_nodes_whose_parent_was_accepted():
    c = LengthController(prior=0.5, prior_weight=4)
    t = _tree(["", "a", "a", "a", "b"])
    for _ in range(40):
        c.observe_nodes("d", t, [0, 1])   # a@1 accepted; a@2 and b@1 rejected; a@3 untested
    assert c.node_rate("d", "a", 1) > 0.9
    assert c.node_rate("d", "a", 2) < 0.1 and c.node_rate("d", "b", 1) < 0.1
    assert c.node_rate("d", "a", 3) == 0.5          # never tested: the prior
    # scoped like the drafter rates
    with c.scoped_rates():
        assert c.node_rate("d", "a", 1) == 0.5


def test_prune_keeps_sure_nodes_under_load_and_everything_when_tokens_are_cheap():
    c = LengthController(prior=0.5, prior_weight=4)
    for _ in range(60):   # source "a" is always accepted, "b" never
        c.observe_nodes("d", _tree(["", "a", "a", "a", "b"]), [0, 1, 2, 3])
    cheap = LengthController(prior=0.5, prior_weight=4)
    cheap.drafter_rate = c.drafter_rate
    _loaded(cheap, fixed=0.03, per_token=0.0001)    # a memory-bound forward: tokens nearly free
    t = _tree(["", "a", "a", "a", "b"])
    assert cheap.prune("d", t, batch=2) is t
    _loaded(c, fixed=0.03, per_token=0.002)        # batch 8, compute bound
    assert c.prune("d", t, batch=1) is t      # alone: the budget rule sizes the tree
    p = c.prune("d", t, batch=8)
    assert p.tokens == [0, 1, 2, 3] and p.source == ["", "a", "a", "a"]
    # negative control: when "a" is the source that fails, its chain goes instead
    bad = _tree(["", "b", "b", "b", "a"])
    assert c.prune("d", bad, batch=8).tokens == [0, 4]
    off = LengthController(adaptive=False)
    assert off.prune("d", t, batch=8) is t
    c.per_node = False                             # the per-node part alone off
    assert c.prune("d", t, batch=8) is t


def test_members_that_do_not_pay_under_load_sit_out_with_probes():
    from specrt.draft import DraftTree
    c = LengthController(prior=0.5, prior_weight=4, probe_every=2)
    t = DraftTree([0, 1, 2, 3], [-1, 0, 0, 0], source=["", "copy", "maybe", "guess"])
    for i in range(90):   # copy always right; maybe right a third of the time; guess never
        c.observe_nodes("f", t, [0, 1] if i % 3 else [0, 2])
    _loaded(c, fixed=0.03, per_token=0.002)       # batch 8, compute bound
    c.observe_draft("f/guess", 4, 4 * 0.001, batch=8)
    members = ["copy", "maybe", "guess"]
    skips = [c.skip_members("f", members, 8) for _ in range(32)]
    assert skips.count({"maybe", "guess"}) == 30 and skips[15] == skips[31] == set()  # probes
    one = LengthController(prior=0.5, prior_weight=4)   # tokens nearly free
    one.drafter_rate = c.drafter_rate
    _loaded(one, fixed=0.03, per_token=0.0001)
    one.observe_draft("f/guess", 4, 4 * 0.001, batch=2)
    assert one.skip_members("f", members, 2) == {"guess"}   # never right, and not free
    assert one.skip_members("f", members, 1) == set()       # alone every member runs
    # the budget follows the best member that runs: copies (right 2/3) get a budget
    # under load, a member right 1/3 of the time alone does not
    assert c.budget("f", "r", 8, 64, sources=["copy", "maybe"]) >= 1
    assert c.budget("f", "r1", 8, 64, sources=["maybe"]) == 0
    assert c.budget("f", "r2", 8, 64, sources=[]) == 0
    off = LengthController(adaptive=False)
    assert off.skip_members("f", members, 8) == set()
    c.per_node = False
    assert c.skip_members("f", members, 8) == set()
