"""fp32 weights at "high" precision (bf16x3 products; ``load_model(fp32_precision=)``,
``Llama.use_fp32_precision``, ``--fp32-precision``): "auto" resolves per CPU, values
that do not apply are refused before the target is read, and speculative decoding is
exactly as lossless against the "high" model as against the fp32 one (the kernel's
row-independence is tests/test_gemm_bf16x3.py's)."""
import pytest
import torch

import specrt
from specrt import SamplingParams
from specrt.cache.paged import PagedKVCache
from specrt.draft import NgramDrafter
from specrt.model import load_model
from specrt.ops import gemm
from tests.drafters import ScriptedTreeDrafter, greedy_reference

PROMPTS = ["hello world hello world", "abcabcabc", "The quick brown fox", "zz", "tiny tim"]
N = 20


def test_auto_resolves_per_cpu_and_bad_values_are_refused(tiny_llama):
    m, _ = load_model(str(tiny_llama), device="cpu")
    assert m.fp32_precision == gemm.default_fp32_precision()
    assert gemm.default_fp32_precision() == ("high" if gemm.gemm_bf16_isa() == "amx"
                                             else "highest")
    m, _ = load_model(str(tiny_llama), device="cpu", fp32_precision="highest")
    assert m.fp32_precision == "highest"
    assert m._head_mm.format() == "fp32"
    with pytest.raises(ValueError, match="fp32_precision must be"):
        load_model(str(tiny_llama), device="cpu", fp32_precision="medium")
    with pytest.raises(ValueError, match="for CPU fp32 models"):
        load_model(str(tiny_llama), device="cpu", dtype=torch.float64, fp32_precision="high")
    with pytest.raises(ValueError, match="fp32_precision must be"):
        m.use_fp32_precision("auto")          # the model takes a resolved precision


def test_high_logits_are_near_the_fp32_models(tiny_llama):
    hi, _ = load_model(str(tiny_llama), device="cpu", fp32_precision="high")
    lo, _ = load_model(str(tiny_llama), device="cpu", fp32_precision="highest")
    a = hi.args
    c = PagedKVCache(a.num_hidden_layers, 8, 16, a.num_key_value_heads, a.head_dim)
    ids = torch.randint(0, hi.args.vocab_size, (1, 30))
    out = []
    for m in (hi, lo):
        c.add(0)
        c.reserve(0, 30)
        with torch.inference_mode():
            h = m(ids, torch.arange(30)[None], c.kv, c.block_table([0]), torch.tensor([0]))
            out.append(m.logits(h))
        c.release(0)
    scale = out[1].abs().max().item()
    assert (out[0] - out[1]).abs().max().item() < 1e-3 * scale


def test_greedy_speculative_equals_plain_decoding_at_high_precision(tiny_llama):
    kw = dict(device="cpu", block_size=4, fp32_precision="high")
    plain = specrt.Engine.from_pretrained(str(tiny_llama), cache_tokens=2048, **kw)
    ref, want = greedy_reference(plain, PROMPTS, N)
    drafters = [NgramDrafter(), ScriptedTreeDrafter("tree", ref, 96, seed=1)]
    eng = specrt.Engine.from_pretrained(str(tiny_llama), cache_tokens=4096, drafters=drafters,
                                        adaptive=False, max_draft=5, **kw)
    assert eng.model.fp32_precision == "high"
    for drafter in ("ngram", "tree"):
        outs = eng.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True),
                            drafter=drafter)
        assert [o.token_ids for o in outs] == want, drafter
    assert sum(o.stats["accepted_tokens"] for o in outs) > 0
