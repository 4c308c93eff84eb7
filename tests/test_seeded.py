"""Seeded sampling as a contract: the random numbers of a request are keyed by (seed,
output position, purpose), so with deterministic drafts (n-gram, recycling, top-k model
drafts, fused trees) seeded speculative output equals seeded plain output token for
token, with the adaptive length on; a seed reproduces across runs, alone and inside a
batch of mixed requests; bad seeds are refused."""
import pytest
import torch

import specrt
from specrt import SamplingParams
from specrt.draft import FusedDrafter, NgramDrafter, RecyclingDrafter
from specrt.draft.model import DraftNet, ModelDrafter
from tests.drafters import ScriptedTreeDrafter

PROMPTS = ["hello world hello world", "abcabcabc", "The quick brown fox", "zz", "tiny tim",
           "one two one two", "xyzxyz", "aaaa bbbb", "Q: 1+1? A:", "repeat repeat"]
SEEDS = [7, 11, 0, 2 ** 63 - 1, 12345, 99, 3, 8, 2024, 31337]
N = 24


def _params(i, **kw):
    return SamplingParams(max_tokens=N, temperature=0.9, top_p=0.95, seed=SEEDS[i],
                          ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def plain(tiny_llama):
    eng = specrt.Engine.from_pretrained(str(tiny_llama), device="cpu", block_size=4,
                                        cache_tokens=4096, drafters=[])
    outs = eng.generate(PROMPTS, [_params(i) for i in range(len(PROMPTS))],
                        speculative=False)
    ref = {tuple(eng.tokenizer.encode_prompt(p)): eng.tokenizer.encode_prompt(p) + o.token_ids
           for p, o in zip(PROMPTS, outs)}
    return eng, [o.token_ids for o in outs], ref


def _engine(plain, **kw):
    eng, _, ref = plain
    net = DraftNet.from_target(eng.model, arch="eagle", num_layers=1,
                               vocab_ids=torch.arange(3, 96))
    drafters = [
        NgramDrafter(),
        RecyclingDrafter(96, k=4),
        ModelDrafter(net, name="eagle_tree", mode="tree", topk=2, threshold=0.0,
                     cache_tokens=2048, block_size=4),
        # drafts that often are the seeded plain output: accepted only if coupled right
        ScriptedTreeDrafter("oracle_tree", ref, 96, seed=1, p_true=0.8),
        ScriptedTreeDrafter("oracle_chain", ref, 96, seed=2, p_true=0.8, chain=True),
        FusedDrafter([NgramDrafter(), ScriptedTreeDrafter("f", ref, 96, seed=4)],
                     name="fused"),
    ]
    kw.setdefault("adaptive", True)
    return specrt.Engine(eng.model, eng.tokenizer, drafters=drafters, block_size=4,
                         cache_tokens=8192, max_draft=5, **kw)


@pytest.mark.parametrize("drafter", ["ngram", "recycling", "eagle_tree", "oracle_tree",
                                     "oracle_chain", "fused"])
def test_seeded_speculative_equals_seeded_plain(plain, drafter):
    eng = _engine(plain, max_batch=4)
    outs = eng.generate(PROMPTS, [_params(i) for i in range(len(PROMPTS))], drafter=drafter)
    for i, (o, want) in enumerate(zip(outs, plain[1])):
        assert o.token_ids == want, f"prompt {i}, seed {SEEDS[i]}"
    if drafter.startswith("oracle") or drafter == "fused":
        acc = sum(o.stats["accepted_tokens"] for o in outs)
        assert acc > 0.3 * len(PROMPTS) * N, "the coupled verifier keeps too few drafts"


def test_same_seed_reproduces_alone_and_in_a_mixed_batch(plain):
    eng = _engine(plain, max_batch=5)
    alone = [eng.generate(PROMPTS[1], _params(1), drafter="fused")[0].token_ids
             for _ in range(3)]
    assert alone[0] == alone[1] == alone[2] == plain[1][1]
    rids = [eng.add_request(PROMPTS[1], _params(1), drafter="fused"),
            eng.add_request(PROMPTS[0], SamplingParams(max_tokens=30, ignore_eos=True)),
            eng.add_request(PROMPTS[2], SamplingParams(max_tokens=7, temperature=1.3,
                                                       ignore_eos=True), drafter="ngram"),
            eng.add_request(PROMPTS[5], _params(5), speculative=False),
            eng.add_request(PROMPTS[6], SamplingParams(max_tokens=N, temperature=0.5,
                                                       ignore_eos=True, seed=1),
                            drafter="oracle_tree")]
    done = {}
    while eng.has_unfinished():
        for ev in eng.step():
            if ev.finished:
                done[ev.request_id] = ev.output.token_ids
    assert done[rids[0]] == plain[1][1]
    assert done[rids[3]] == plain[1][5]


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 1.5, True, "7"])
def test_bad_seed_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        SamplingParams(seed=seed)


def _coupled(impl, P, tokens, parents, lens, depth, u, monkeypatch):
    """The engine's coupled verification (specrt.acceptance) on one backend: greedy
    verify over one-hot rows of each node's inverse-CDF choice with its depth's uniform."""
    from specrt.ops import verify_tree
    from specrt.sampling import sample_at

    B, T, V = P.shape
    choice = torch.zeros(B, T, V)
    pick = sample_at(P, u.gather(1, depth))                       # [B, T]
    choice.scatter_(2, pick[..., None], 1.0)
    monkeypatch.setenv("SPECRT_OPS_BACKEND", impl)
    try:
        return verify_tree(choice, tokens, parents, lens, greedy=True)
    finally:
        monkeypatch.delenv("SPECRT_OPS_BACKEND")


@pytest.mark.parametrize("impl,B", [("cpu", 4000), ("triton", 300)] +
                         ([("cuda", 4000)] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("bug", [False, True])
def test_coupled_verification_is_exact_on_every_backend(impl, B, bug, monkeypatch):
    """A fixed tree (root; children a, b; a's child c) over a fixed target: the first
    emitted token follows P[root] and, after a, the second follows P[a] (chi-square);
    each row's first token is the one plain sampling with that uniform draws. Negative
    control (bug): uniforms u**1.6 are caught."""
    from tests.test_verify import chi2_pvalue
    from specrt.sampling import sample_at

    g = torch.Generator().manual_seed(5)
    V, T = 6, 4
    P1 = torch.softmax(torch.randn(T, V, generator=g) * 1.5, -1)
    P = P1.expand(B, T, V).contiguous()
    tokens = torch.tensor([[0, 1, 2, 3]]).expand(B, T).contiguous()
    parents = torch.tensor([[-1, 0, 0, 1]]).expand(B, T).contiguous()
    depth = torch.tensor([[0, 1, 1, 2]]).expand(B, T).contiguous()
    lens = torch.full((B,), T)
    u = torch.rand(B, 3, generator=g, dtype=torch.float64)
    if bug:
        u = u ** 1.6
    path, plen, nxt = _coupled(impl, P, tokens, parents, lens, depth, u.float(), monkeypatch)
    first = torch.where(plen > 1, tokens.gather(1, path[:, 1:2].clamp(min=0))[:, 0], nxt)
    assert torch.equal(first, sample_at(P[:, 0], u[:, 0].float()))  # = plain sampling
    p_first = chi2_pvalue(torch.bincount(first, minlength=V), P1[0])
    after_a = (plen > 1) & (path[:, 1] == 1)          # token 1 accepted: next from P[a]
    second = torch.where(plen[after_a] > 2, torch.full_like(nxt[after_a], 3), nxt[after_a])
    p_second = chi2_pvalue(torch.bincount(second, minlength=V), P1[1])
    if bug:
        assert min(p_first, p_second) < 1e-3
    else:
        assert p_first > 1e-3 and p_second > 1e-3, (p_first, p_second)
