"""The EAGLE-3-style drafter (specrt.draft.eagle3): the target's forward taps layer
states exactly; training-time test unrolls the head exactly as drafting runs it (each
depth's draft at drafting time equals the argmax of that TTT step, with equal logits);
the engine hands an eagle3 drafter the layers it names; save/load keeps them."""
import pytest
import torch

import specrt
from specrt import SamplingParams
from specrt.align.features import target_hidden
from specrt.draft.base import SeqState
from specrt.draft.eagle3 import Eagle3Net, default_feature_layers, ttt_mask
from specrt.draft.model import DraftNet, ModelDrafter
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp("e3"), "llama", seed=11, num_hidden_layers=4)
    return specrt.Engine.from_pretrained(str(d), device="cpu", block_size=4,
                                         cache_tokens=2048, drafters=[])


def _net(target, seed=0):
    net = DraftNet.from_target(target.model, arch="eagle3", num_layers=2,
                               vocab_ids=torch.arange(3, 70))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the identity init, so that every input matters
        for p in (net.fc.weight, net.fuse.weight):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def test_default_feature_layers_low_mid_high():
    assert default_feature_layers(30) == (2, 15, 29)
    assert default_feature_layers(4) == (2, 3)
    assert default_feature_layers(1) == (0,)


def test_ttt_mask_is_the_tree_node_view():
    m = ttt_mask(5, 2)
    # step 2, position 4: step-0 keys 0..2, step-1 key at 3, step-2 key at 4
    assert m[4].tolist() == [1, 1, 1, 0, 0] + [0, 0, 0, 1, 0] + [0, 0, 0, 0, 1]
    assert m[1].tolist() == [0] * 5 + [1, 0, 0, 0, 0] + [0, 1, 0, 0, 0]
    assert ttt_mask(4, 0).equal(torch.ones(4, 4).tril().bool())


def test_forward_taps_are_the_layer_states(target):
    m = target.model
    ids = [[5, 9, 14, 3, 22, 7], [8, 8, 30]]
    last = target_hidden(m, ids)
    taps = target_hidden(m, ids, taps=(0, 2, 3))
    for a, b in zip(last, taps):
        assert b.shape == (a.shape[0], 3, m.args.hidden_size)
        assert torch.equal(b[:, 2], a)           # the last tap is the usual state
        assert not torch.allclose(b[:, 0], a)    # an early layer is not
    with pytest.raises(ValueError, match="ascending"):
        target_hidden(m, ids, taps=(2, 1))
    with pytest.raises(ValueError, match="ascending"):
        target_hidden(m, ids, taps=(0, 4))


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_heads_run_once_with_the_same_states(target, seed):
    """``target_hidden(..., shared=)``: lists that start with the same head (sampled
    outputs of one prompt) run the head once and their tails over it as a cached
    prefix; every state equals the one-prefill-per-list result (within fp32 rounding),
    taps included, for heads shorter than a block, lists alone with their head, and
    tails of one token. A wrong prefix (the tails' positions restarting at 0) fails."""
    m = target.model
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(3, 90, (n,), generator=g).tolist()  # noqa: E731
    h1, h2, h3 = r(9), r(14), r(3)                    # block_size 4: heads 8, 12, none
    ids = [h1 + r(5), h2 + r(7), h1 + r(1), h2 + r(11), r(6), h1 + r(8), h3 + r(4),
           h3 + r(2)]
    shared = [9, 14, 9, 14, 6, 9, 3, 3]
    want = target_hidden(m, ids, taps=(0, 2, 3))
    got = target_hidden(m, ids, taps=(0, 2, 3), shared=shared, block_size=4)
    for i, (a, b) in enumerate(zip(want, got)):
        assert b.shape == a.shape, i
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=f"list {i}")
    last = target_hidden(m, ids, shared=shared, block_size=4)
    for a, b in zip(want, last):
        torch.testing.assert_close(b, a[:, -1], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="head lengths"):
        target_hidden(m, ids, shared=shared[:-1])


def test_shared_heads_negative_control(target, monkeypatch):
    """The equality above is not vacuous: tails run at positions from 0 (their prefix's
    RoPE offset lost) give other states."""
    import specrt.align.features as feat

    m = target.model
    ids = [[5, 9, 14, 3, 22, 7, 40, 41, 9, 2], [5, 9, 14, 3, 22, 7, 40, 41, 11, 12]]
    want = target_hidden(m, ids)
    orig = m.forward

    def shifted(tokens, positions, *a, **k):
        return orig(tokens, positions - positions[:, :1], *a, **k)

    monkeypatch.setattr(m, "forward", shifted)
    got = feat.target_hidden(m, ids, shared=[8, 8], block_size=4)
    assert not torch.allclose(got[0][8:], want[0][8:], atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ttt_steps_equal_drafting_depths(target, seed):
    """A chain of D drafts from the ModelDrafter (catch-up chunk over target features,
    then tree nodes over its own states) equals, depth by depth, the argmax of TTT step
    s at the root's position + s over the same tokens, and the logits agree."""
    net = _net(target, seed)
    m = target.model
    taps_all = net.feature_layers
    g = torch.Generator().manual_seed(100 + seed)
    P, D = 7 + seed, 4
    prompt = torch.randint(3, 90, (P,), generator=g).tolist()
    first = int(torch.randint(3, 90, (1,), generator=g))
    feats = target_hidden(m, [prompt], taps=taps_all)[0]               # [P, k, H]
    d = ModelDrafter(net, name="e3", mode="chain", threshold=0.0, max_depth=D,
                     cache_tokens=256, block_size=4, weights="fp32")  # TTT's products
    seq = SeqState(0, prompt + [first], P)
    d.begin(seq, feats)
    tree = d.propose([seq], [D])[0]
    drafts = tree.tokens[1:]
    assert len(drafts) == D
    toks = torch.tensor(prompt + [first] + drafts[:-1])[None]          # positions 0..P+D-1
    T = toks.shape[1]
    prev = torch.zeros(1, T, len(taps_all), m.args.hidden_size)
    prev[0, 1:P + 1] = feats                                           # predecessors
    with torch.no_grad():
        ys = net.ttt_forward(toks, torch.arange(T)[None], prev, D)
    assert tree.conf is not None
    for s in range(D):
        p = torch.softmax(net.logits(ys[s][0, P + s]).double(), -1)
        assert int(net.vocab_ids[p.argmax()]) == drafts[s], f"depth {s + 1}"
        # the drafter's probability of its draft (its path confidence's factor)
        got = tree.conf[s + 1] / tree.conf[s] if s else tree.conf[1]
        assert got == pytest.approx(float(p.max().detach()), rel=1e-4), f"depth {s + 1}"
    d.release(seq)


def test_engine_passes_the_named_layers_and_output_is_lossless(target):
    net = _net(target)
    seen = []

    class Spy(ModelDrafter):
        def begin(self, seq, prompt_hidden):
            seen.append(tuple(prompt_hidden.shape))
            super().begin(seq, prompt_hidden)

        def update(self, seq, result):
            seen.append(tuple(result.target_hidden.shape))
            super().update(seq, result)

    d = Spy(net, name="e3", mode="tree", topk=2, threshold=0.0, cache_tokens=1024,
            block_size=4)
    eng = specrt.Engine(target.model, target.tokenizer, drafters=[d], block_size=4,
                        cache_tokens=2048, adaptive=False, max_draft=4)
    prompts = ["abcabcabc", "hello there"]
    ref = target.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True),
                          speculative=False)
    outs = eng.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    H = target.model.args.hidden_size
    assert seen and all(s[1:] == (len(net.feature_layers), H) for s in seen)


def test_save_load_keeps_feature_layers(tmp_path, target):
    net = _net(target)
    net.save(tmp_path / "e3.safetensors", tmp_path / "e3.json")
    back = DraftNet.load(tmp_path / "e3.json", target.model)
    assert isinstance(back, Eagle3Net) and back.feature_layers == net.feature_layers
    assert torch.allclose(back.fuse.weight, net.fuse.weight.half().float())
    import json

    cfg = json.loads((tmp_path / "e3.json").read_text())
    cfg["feature_layers"] = [1, 9]
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="target has 4"):
        DraftNet.load(tmp_path / "bad.json", target.model)
