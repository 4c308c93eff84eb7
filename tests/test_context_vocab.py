"""The context vocabulary (specrt.draft.net, ``context_vocab``): a drafter's output
vocabulary at a position is its reduced vocabulary plus every token the sequence holds
up to that position. Training, evaluation and drafting see the same per-position
vocabulary: drafting's draft at each depth is the argmax of the training-time-test
logits over it, with equal probabilities; the batch helper matches its definition
token by token; what the engine emits stays the target's."""
import json

import pytest
import torch

import specrt
from specrt import SamplingParams
from specrt.align.features import target_hidden
from specrt.draft.base import SeqState
from specrt.draft.model import DraftNet, ModelDrafter
from specrt.draft.net import MASKED
from specrt.draft.train import (_context_extra, _coverage, _token_ids, stage_train,
                                teacher_forced_accuracy)
from tests.tiny import make_tiny_model

STATIC = torch.arange(3, 9)          # a tiny reduced vocabulary: most tokens are outside


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp("cv"), "llama", seed=5, num_hidden_layers=4)
    return specrt.Engine.from_pretrained(str(d), device="cpu", block_size=4,
                                         cache_tokens=2048, drafters=[])


def _net(target, seed=0):
    net = DraftNet.from_target(target.model, arch="eagle3", num_layers=1, vocab_ids=STATIC)
    net.context_vocab = True
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (net.fc.weight, net.fuse.weight):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def test_batch_helper_matches_the_definition():
    g = torch.Generator().manual_seed(0)

    class N:  # the attributes _context_extra reads
        context_vocab = True
        vocab_ids = STATIC
        head_weight = torch.randn(100, 8, generator=g)

    wins = []
    for n, a in ((30, 0), (25, 7), (12, 3)):
        toks = torch.randint(3, 40, (n,), generator=g)
        wins.append(({"tokens": toks}, a, min(n - 1, a + 10)))
    L = max(e - a for _, a, e in wins)
    ids, (w, allowed) = _context_extra(N, wins, L)
    static = set(STATIC.tolist())
    want_ids = sorted({int(t) for s, a, e in wins for t in s["tokens"][:e]} - static)
    assert ids.tolist() == want_ids
    assert torch.equal(w, N.head_weight[ids])
    for b, (s, a, e) in enumerate(wins):
        for j in range(L):
            seen = {int(t) for t in s["tokens"][:a + j + 1]}
            assert allowed[b, j].tolist() == [i in seen for i in want_ids], (b, j)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drafts_are_the_ttt_argmax_over_the_context_vocabulary(target, seed):
    net = _net(target, seed)
    m = target.model
    g = torch.Generator().manual_seed(200 + seed)
    P, D = 9, 4
    prompt = torch.randint(3, 60, (P,), generator=g).tolist()
    first = int(torch.randint(3, 60, (1,), generator=g))
    feats = target_hidden(m, [prompt], taps=net.feature_layers)[0]
    d = ModelDrafter(net, name="cv", mode="chain", threshold=0.0, max_depth=D,
                     cache_tokens=256, block_size=4, weights="fp32")
    seq = SeqState(0, prompt + [first], P)
    d.begin(seq, feats)
    tree = d.propose([seq], [D])[0]
    drafts = tree.tokens[1:]
    assert len(drafts) == D
    toks = torch.tensor(prompt + [first] + drafts)
    T = P + D
    prev = torch.zeros(1, T, len(net.feature_layers), m.args.hidden_size)
    prev[0, 1:P + 1] = feats
    with torch.no_grad():
        ys = net.ttt_forward(toks[None, :T], torch.arange(T)[None], prev, D)
    ext_ids, extra = _context_extra(net, [({"tokens": toks}, 0, T)], T)
    extra_drafted = 0
    for s in range(D):
        lg = net.logits(ys[s], extra)[0, P + s].detach().double()
        p = torch.softmax(lg, -1)
        tok = int(_token_ids(net, p.argmax()[None], ext_ids))
        assert tok == drafts[s], f"depth {s + 1}"
        got = tree.conf[s + 1] / tree.conf[s] if s else tree.conf[1]
        assert got == pytest.approx(float(p.max()), rel=1e-4), f"depth {s + 1}"
        # never a token outside the reduced vocabulary and the sequence so far
        assert tok in set(STATIC.tolist()) | set(toks[:P + s + 1].tolist())
        extra_drafted += tok not in set(STATIC.tolist())
    assert extra_drafted > 0          # the context tokens are drafted, not just allowed
    d.release(seq)
    assert "vocab_ctx" not in seq.state


def test_engine_output_is_the_targets_with_context_drafts(target):
    net = _net(target, 3)
    d = ModelDrafter(net, name="cv", mode="tree", topk=2, threshold=0.0,
                     cache_tokens=1024, block_size=4)
    eng = specrt.Engine(target.model, target.tokenizer, drafters=[d], block_size=4,
                        cache_tokens=2048, adaptive=False, max_draft=4)
    prompts = ["abcabcabc xyz", "hello there, hello", "q"]
    ref = target.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True),
                          speculative=False)
    outs = eng.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


def test_training_and_eval_run_over_the_context_vocabulary(target):
    m = target.model
    g = torch.Generator().manual_seed(7)
    toks = [torch.randint(3, 60, (40,), generator=g) for _ in range(4)]
    hs = target_hidden(m, [t[:-1].tolist() for t in toks], taps=(2, 3))
    seqs = [{"tokens": t, "feats": h, "hidden": h[:, -1], "taps": (2, 3),
             "prompt_len": 10, "task": "chat", "id": str(i)}
            for i, (t, h) in enumerate(zip(toks, hs))]
    net = _net(target, 0)
    before = teacher_forced_accuracy(net, m, seqs, max_len=16, batch_tokens=64, steps=2)
    s = stage_train(net, m, seqs, epochs=4, lr=3e-3, max_len=16, batch_tokens=64,
                    feat_weight=0.0, seed=0, time_budget_s=1e9, ttt_steps=2)
    assert torch.isfinite(torch.tensor(s["final_kl"]))
    after = teacher_forced_accuracy(net, m, seqs, max_len=16, batch_tokens=64, steps=2)
    assert after["top1"] > before["top1"]       # it learns to draft the context tokens
    # the static vocabulary alone caps top-1 far lower: most targets are outside it
    net.context_vocab = False
    capped = teacher_forced_accuracy(net, m, seqs, max_len=16, batch_tokens=64, steps=2)
    assert capped["top1"] < after["top1"]


def test_masked_floor_is_finite_and_weightless():
    x = torch.tensor([0.0, 1.0, MASKED])
    p = torch.softmax(x, -1)
    assert p[2] == 0 and torch.isfinite(torch.log_softmax(x, -1)).all()


def test_save_load_keeps_the_flag(tmp_path, target):
    net = _net(target)
    net.save(tmp_path / "cv.safetensors", tmp_path / "cv.json")
    assert DraftNet.load(tmp_path / "cv.json", target.model).context_vocab
    cfg = json.loads((tmp_path / "cv.json").read_text())
    del cfg["context_vocab"]
    (tmp_path / "old.json").write_text(json.dumps(cfg))
    assert not DraftNet.load(tmp_path / "old.json", target.model).context_vocab


def test_coverage_counts_the_sequence_s_earlier_tokens():
    seqs = [{"tokens": torch.tensor([5, 9, 7, 9, 11, 5, 11]), "prompt_len": 2}]
    # outputs 7 9 11 5 11: static {7}; 9 and 5 are in the prompt, the second 11 repeats
    assert _coverage(torch.tensor([7]), seqs) == 1 / 5
    assert _coverage(torch.tensor([7]), seqs, context=True) == 4 / 5
