"""bf16 weight streaming on CPU (``Llama.use_weight_dtype``, ``load_model(weight_dtype=)``,
``--weights bf16``): the model then multiplies bf16-rounded activations by bf16 weights
with fp32 sums. Its contract: logits near the fp32 model's (not equal: it is another
model), the native decoder and the op-by-op path agree, and speculative decoding is
lossless against it (a row's states not depending on the rows beside it, for either
weight dtype, is tests/test_decoder_native.py's)."""
import pytest
import torch

import specrt
from specrt import SamplingParams, ops
from specrt.draft import NgramDrafter
from specrt.model import llama, load_model
from specrt.ops._backend import native
from tests.drafters import ScriptedTreeDrafter, greedy_reference
from tests.test_decoder_native import random_tree, run

PROMPTS = ["hello world hello world", "abcabcabc", "The quick brown fox", "zz", "tiny tim"]
N = 20


@pytest.fixture(scope="module")
def tiny_llama_d32(tmp_path_factory):
    """The tiny Llama with head dim 32: where the CPU has AMX, its bf16 mode runs
    attention's products on the tiles too (head dim 16 keeps fp32 attention)."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama_d32"), "llama", seed=5,
                           hidden_size=128, head_dim=32)


@pytest.fixture(scope="module", params=["d16", "d32"])
def tiny_model(request, tiny_llama, tiny_llama_d32):
    return tiny_llama if request.param == "d16" else tiny_llama_d32


@pytest.fixture(scope="module")
def models(tiny_model):
    fp32, _ = load_model(str(tiny_model), device="cpu")
    bf16, _ = load_model(str(tiny_model), device="cpu", weight_dtype=torch.bfloat16)
    return fp32, bf16


def test_bf16_attention_where_the_cpu_has_amx(models):
    """bf16 weights bring bf16 attention products exactly where the AMX kernel runs
    (head dim 32 on an AMX CPU), never in fp32 mode."""
    fp32, bf16 = models
    assert not fp32._attn_bf16()
    assert bf16._attn_bf16() == ops.amx_attention_available(bf16.args.head_dim)
    assert bf16._attn_bf16() == (bf16.args.head_dim == 32 and ops.amx_attention_available(32))


def forward(m, g, monkeypatch=None, fused=True):
    V = m.args.vocab_size
    prefixes = [torch.randint(3, V, (n,), generator=g) for n in (9, 1, 17)]
    tokens = torch.randint(3, V, (3, 6), generator=g)
    mask = random_tree(3, 6, g)
    if not fused:
        monkeypatch.setattr(m, "_fusable", lambda *a: False)
    h, *_ = run(m, torch.float32, tokens, prefixes, mask, None, ())
    return m.logits(h)


def test_bf16_logits_are_near_the_fp32_models_but_another_model(models):
    fp32, bf16 = models
    assert fp32.weight_dtype is torch.float32 and bf16.weight_dtype is torch.bfloat16
    a = forward(fp32, torch.Generator().manual_seed(1))
    b = forward(bf16, torch.Generator().manual_seed(1))
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    assert 0 < diff < 0.03 * scale, (diff, scale)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


def test_the_native_decoder_and_the_op_path_agree_in_bf16(models, monkeypatch):
    _, bf16 = models
    calls = []

    class Spy:
        def __getattr__(self, name):
            if name == "decoder_layers_cpu":
                calls.append(name)
            return getattr(native(), name)

    monkeypatch.setattr(llama, "native", lambda: Spy())
    fused = forward(bf16, torch.Generator().manual_seed(2))
    assert calls, "bf16 mode runs the native decoder"
    n = len(calls)
    ops = forward(bf16, torch.Generator().manual_seed(2), monkeypatch, fused=False)
    assert len(calls) == n, "the op path ran without the native decoder"
    scale = fused.abs().max().item()
    # both round the same fp32 activations to bf16; a 1-ulp difference upstream (norm,
    # attention) may flip one rounding, hence a bf16-sized tolerance
    assert (fused - ops).abs().max().item() < 0.01 * scale


def test_greedy_speculative_equals_plain_decoding_of_the_bf16_model(tiny_model):
    tiny_llama = tiny_model
    plain = specrt.Engine.from_pretrained(str(tiny_llama), device="cpu", block_size=4,
                                          cache_tokens=2048, weight_dtype=torch.bfloat16)
    ref, want = greedy_reference(plain, PROMPTS, N)
    drafters = [NgramDrafter(), ScriptedTreeDrafter("tree", ref, 96, seed=1)]
    eng = specrt.Engine.from_pretrained(str(tiny_llama), device="cpu", block_size=4,
                                        cache_tokens=4096, drafters=drafters, adaptive=False,
                                        max_draft=5, weight_dtype=torch.bfloat16)
    for drafter in ("ngram", "tree"):
        outs = eng.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True),
                            drafter=drafter)
        assert [o.token_ids for o in outs] == want, drafter
    assert sum(o.stats["accepted_tokens"] for o in outs) > 0


def test_weight_dtypes_that_do_not_apply_are_refused(tiny_llama, models):
    fp32, _ = models
    with pytest.raises(ValueError, match="weight dtype must be"):
        fp32.use_weight_dtype(torch.float16)
    with pytest.raises(ValueError, match="weight_dtype must be"):
        load_model(str(tiny_llama), device="cpu", weight_dtype=torch.float16)
    with pytest.raises(ValueError, match="for CPU fp32 models"):
        load_model(str(tiny_llama), device="cpu", dtype=torch.float64,
                   weight_dtype=torch.bfloat16)
    assert fp32.weight_dtype is torch.float32
