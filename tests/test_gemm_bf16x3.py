"""fp32 weights at "high" precision (csrc/gemm_bf16_cpu.cpp's bf16x3, specrt.ops.gemm):
x = xh + xl and W = Wh + Wl in bf16 parts, y = xl Wh + xh Wl + xh Wh with fp32 sums.

The contract: against a float64 reference on the exact inputs the error stays within a
bound ~2^-16 of the sum of |products| (far inside bf16's 2^-8, a few times fp32's), on
every path this CPU has (AMX, AVX512-BF16, scalar), odd shapes and row counts, outputs
poisoned with NaN beforehand; each row's bits independent of M, its neighbours and the
thread count (so speculation stays exact relative to this arithmetic); the packed layout
is the bf16 layout of the high then the low part per k block; the torch.library op and
its fake; PackedLinear and the model switch precision and repack."""
import pytest
import torch

from specrt.ops import gemm

ISAS = {"amx": ["amx", "avx512bf16", "scalar"], "avx512bf16": ["avx512bf16", "scalar"],
        "avx512": ["scalar"], "scalar": ["scalar"]}[gemm.gemm_bf16_isa()]
SHAPES = [(576, 960), (1536, 576), (1, 1), (37, 33), (100, 97), (33, 65), (576, 17)]
ROWS = [1, 2, 5, 8, 15, 16, 17, 31, 32, 33, 47, 64]


def run_native(x, wq, n, isa, threads=2):
    """The kernel into an output poisoned with NaN: every element must be written."""
    from specrt import _C

    y = torch.full((x.shape[0], n), float("nan"))
    _C.skinny_mm_bf16x3(x.numpy(), wq.view(torch.uint16).numpy(), y.numpy(), n, threads, isa)
    return y


def bound(x, w):
    """Split error (2^-17 of each operand, twice, plus the dropped xl Wl ~2^-18) and fp32
    sums (a few ulps of sqrt(K) terms), of the sum of |products|."""
    return (2 ** -15 + 4e-7 * x.shape[1] ** 0.5) * (x.double().abs() @ w.double().abs().T) + 1e-30


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K,N", SHAPES)
def test_every_row_count_is_within_the_high_precision_bound_of_float64(isa, K, N):
    g = torch.Generator().manual_seed(K * 7919 + N)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 3
    wq = gemm.pack_weight_bf16x3(w)
    for M in ROWS:
        x = torch.randn(M, K, generator=g)
        y = run_native(x, wq, N, isa, threads=1 + M % 2)
        assert not y.isnan().any(), (isa, M, "unwritten outputs")
        err = (y.double() - x.double() @ w.double().T).abs()
        assert (err <= bound(x, w)).all(), (isa, M, K, N, err.max().item())


def test_it_is_far_more_accurate_than_bf16_and_near_fp32():
    """The point of the scheme, measured: on a model-sized product the error relative to
    the sum of |products| is < 1/100 of bf16's and < 30x fp32's."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(1536, 576, generator=g), torch.randn(24, 576, generator=g)
    ref, scale = x.double() @ w.double().T, x.double().abs() @ w.double().abs().T

    def rel(y):
        return ((y.double() - ref).abs() / scale).max().item()

    e3 = rel(gemm.skinny_mm_bf16x3(x, gemm.pack_weight_bf16x3(w), 1536))
    eb = rel(gemm.skinny_mm_bf16(x, gemm.pack_weight_bf16(w), 1536))
    e32 = rel(x @ w.T)
    assert e3 < eb / 100 and e3 < 30 * e32, (e3, eb, e32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K,N", [(576, 960), (100, 97)])
def test_a_rows_bits_do_not_depend_on_m_its_neighbours_or_threads(isa, K, N):
    """Row i of an M-row product equals the same row computed alone, bit for bit (one
    and two 16-row AMX tiles per block accumulate in the same order)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(N, K, generator=g)
    wq = gemm.pack_weight_bf16x3(w)
    x = torch.randn(70, K, generator=g)
    alone = torch.cat([run_native(x[i:i + 1], wq, N, isa, threads=1) for i in range(70)])
    for M in (2, 16, 17, 32, 33, 48, 70):
        for start in (0, 70 - M):
            for threads in (1, 2):
                y = run_native(x[start:start + M], wq, N, isa, threads=threads)
                assert torch.equal(y, alone[start:start + M]), (isa, M, start, threads)


def test_pack_layout_is_the_high_then_the_low_bf16_panels_per_k_block():
    w = torch.randn(40, 70)
    wq = gemm.pack_weight_bf16x3(w)
    hi = w.to(torch.bfloat16)
    lo = (w - hi.float()).to(torch.bfloat16)
    assert wq.shape == (2, 3, 2, 16, 2, 32) and wq.dtype == torch.bfloat16 and wq.is_contiguous()
    assert torch.equal(wq[:, :, 0], gemm.pack_weight_bf16(hi))
    assert torch.equal(wq[:, :, 1], gemm.pack_weight_bf16(lo))
    # the parts add back to w within the split's bound
    assert ((hi.float() + lo.float() - w).abs() <= w.abs() * 2 ** -16).all()
    with pytest.raises(ValueError, match="float32"):
        gemm.pack_weight_bf16x3(w.to(torch.bfloat16))


def test_bad_input_is_refused_naming_the_problem():
    from specrt import _C

    wq = gemm.pack_weight_bf16x3(torch.randn(40, 24))
    y = torch.empty(2, 40)
    with pytest.raises(ValueError, match="x has K=40"):
        gemm.skinny_mm_bf16x3(torch.randn(2, 40), wq, 40)
    with pytest.raises(ValueError, match="panels"):
        gemm.skinny_mm_bf16x3(torch.randn(2, 24), wq, 70)
    with pytest.raises(ValueError, match="bf16x3 needs"):
        gemm.skinny_mm_bf16x3(torch.randn(2, 24), gemm.pack_weight_bf16(torch.randn(40, 24)), 40)
    with pytest.raises(ValueError, match="isa must be"):
        _C.skinny_mm_bf16x3(torch.randn(2, 24).numpy(), wq.view(torch.uint16).numpy(),
                            y.numpy(), 40, 1, "sse")
    with pytest.raises(ValueError, match="y must be"):
        _C.skinny_mm_bf16x3(torch.randn(3, 24).numpy(), wq.view(torch.uint16).numpy(),
                            y.numpy(), 40, 1)


def test_strided_rows_give_the_contiguous_result():
    w, x = torch.randn(40, 24), torch.randn(6, 48)
    wq = gemm.pack_weight_bf16x3(w)
    assert torch.equal(gemm.skinny_mm_bf16x3(x[:, :24], wq, 40),
                       gemm.skinny_mm_bf16x3(x[:, :24].contiguous(), wq, 40))


def test_torch_library_op_and_fake():
    x, w = torch.randn(5, 24), torch.randn(40, 24)
    wq = gemm.pack_weight_bf16x3(w)
    torch.library.opcheck(torch.ops.specrt.skinny_mm_bf16x3.default, (x, wq, 40))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        out = torch.ops.specrt.skinny_mm_bf16x3(mode.from_tensor(x), mode.from_tensor(wq), 40)
        assert out.shape == (5, 40) and out.dtype == torch.float32


def test_packed_linear_switches_precision_and_repacks():
    lin = torch.nn.Linear(24, 40, bias=True)
    pl = gemm.PackedLinear(fp32_precision="high")
    want_fmt = "bf16x3" if gemm.bf16x3_fast() else "fp32"
    with torch.no_grad():
        x = torch.randn(7, 24)
        got = pl(x, lin.weight, lin.bias)
        assert pl.format() == want_fmt
        assert pl.packed(lin.weight).dim() == (6 if want_fmt == "bf16x3" else 3)
        ref = x.double() @ lin.weight.double().T + lin.bias.double()
        assert ((got.double() - ref).abs() <= bound(x, lin.weight) + 1e-6).all()
        pl.fp32_precision = "highest"                       # back to fp32: packed again
        assert pl.format() == "fp32" and pl.packed(lin.weight).dim() == 3
        assert torch.allclose(pl(x, lin.weight, lin.bias), lin(x), atol=1e-5)
    with pytest.raises(ValueError, match="fp32_precision"):
        gemm.PackedLinear(fp32_precision="medium")


@pytest.mark.skipif(not gemm.bf16x3_fast(), reason="no bf16 dot products on this CPU")
def test_model_at_high_precision_is_one_model_at_every_tree_width():
    """A tiny Llama at "high" precision: logits near the fp32 model's, and a token's
    logits the same bits whether it is decoded alone or inside a wider forward (what
    makes greedy speculation equal plain decoding in this arithmetic)."""
    from specrt.cache.paged import PagedKVCache
    from specrt.model.llama import Llama, ModelArgs

    torch.manual_seed(0)
    a = ModelArgs(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    m = Llama(a).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)

    def run(prec, ids):
        m.use_fp32_precision(prec)
        c = PagedKVCache(a.num_hidden_layers, 16, 16, a.num_key_value_heads, a.head_dim)
        c.add(0)
        c.reserve(0, ids.shape[1])
        with torch.inference_mode():
            h = m(ids, torch.arange(ids.shape[1])[None], c.kv, c.block_table([0]),
                  torch.tensor([0]))
            return m.logits(h)[0]

    ids = torch.randint(0, 300, (1, 40))
    lh, lf = run("high", ids), run("highest", ids)
    assert m.fp32_precision == "highest"
    assert (lh - lf).abs().max() < 1e-3 * lf.abs().max()
    # the first 9 tokens alone give the same bits as inside the 40-token forward
    assert torch.equal(run("high", ids[:, :9]), lh[:9])
    with pytest.raises(ValueError, match="fp32_precision"):
        m.use_fp32_precision("medium")
