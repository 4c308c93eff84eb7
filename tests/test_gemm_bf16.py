"""The CPU bf16 skinny GEMM (csrc/gemm_bf16_cpu.cpp, specrt.ops.gemm): y = bf16(x) @ W.T
from bf16 VNNI panels, fp32 sums. Against a float64 reference on the bf16-rounded inputs,
on every path this CPU has (AMX, AVX512-BF16, AVX-512, scalar), odd shapes, poisoned
outputs; each row's bits independent of M, its neighbours and the thread count; the
vector paths bit-equal to the scalar one; the torch.library op and its fake."""
import pytest
import torch

from specrt.ops import gemm

ISAS = {"amx": ["amx", "avx512bf16", "avx512", "scalar"],
        "avx512bf16": ["avx512bf16", "avx512", "scalar"],
        "avx512": ["avx512", "scalar"], "scalar": ["scalar"]}[gemm.gemm_bf16_isa()]
MODEL_KN = [(576, 960), (1536, 576), (576, 3072)]          # SmolLM2-135M
ODD_KN = [(1, 1), (37, 33), (100, 97), (33, 65), (576, 17)]
ROWS = [1, 2, 3, 5, 7, 8, 9, 13, 15, 16, 17, 31, 32, 33, 47, 63, 64]


def bf16(t):
    return t.to(torch.bfloat16).double()


def reference(x, w):
    """What the kernel computes: exact products of the bf16-rounded inputs, summed."""
    return bf16(x) @ bf16(w).T


def tol(x, w):   # fp32 accumulation: a few ulps of the sum of |products|
    return 4e-7 * x.shape[1] ** 0.5 * (bf16(x).abs() @ bf16(w).abs().T) + 1e-30


def run_native(x, wq, n, isa, threads=2):
    """The kernel itself, into an output poisoned with NaN: every element must be
    written."""
    from specrt import _C

    y = torch.full((x.shape[0], n), float("nan"))
    _C.skinny_mm_bf16(x.numpy(), wq.view(torch.uint16).numpy(), y.numpy(), n, threads, isa)
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K,N", MODEL_KN[:2] + ODD_KN)
def test_every_row_count_matches_float64_on_the_rounded_inputs(isa, K, N):
    g = torch.Generator().manual_seed(K * 1000 + N)
    w = torch.randn(N, K, generator=g)
    wq = gemm.pack_weight_bf16(w)
    for M in ROWS:
        x = torch.randn(M, K, generator=g)
        y = run_native(x, wq, N, isa, threads=1 + M % 2)
        assert not y.isnan().any(), (M, "unwritten outputs")
        err = (y.double() - reference(x, w)).abs()
        assert (err <= tol(x, w)).all(), (isa, M, K, N, err.max().item())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K,N", [(576, 960), (100, 97)])
def test_a_rows_bits_do_not_depend_on_m_its_neighbours_or_threads(isa, K, N):
    """Row i of an M-row product equals the same row computed alone, bit for bit, for
    every M and thread count: greedy speculative == plain decoding in bf16 mode stands
    on it (a tree's rows and a batch's rows are the same model as one row)."""
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g)
    wq = gemm.pack_weight_bf16(w)
    x = torch.randn(70, K, generator=g)
    alone = torch.cat([run_native(x[i:i + 1], wq, N, isa, threads=1) for i in range(70)])
    for M in [2, 3, 15, 16, 17, 32, 33, 48, 70]:
        for start in (0, 70 - M):
            for threads in (1, 2):
                y = run_native(x[start:start + M], wq, N, isa, threads=threads)
                assert torch.equal(y, alone[start:start + M]), (isa, M, start, threads)


@pytest.mark.parametrize("K,N", [(576, 960), (37, 33)])
def test_the_vector_paths_equal_the_scalar_one_bit_for_bit(K, N):
    """AVX512-BF16 and AVX-512 sum in the scalar loop's order (AMX sums inside the
    tile unit, so it is held to the float64 bound above instead)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(N, K, generator=g)
    wq = gemm.pack_weight_bf16(w)
    x = torch.randn(21, K, generator=g)
    want = run_native(x, wq, N, "scalar")
    for isa in [i for i in ISAS if i in ("avx512bf16", "avx512")]:
        assert torch.equal(run_native(x, wq, N, isa), want), isa


def test_x_is_rounded_to_nearest_even_and_nan_and_inf_propagate():
    """The kernel rounds x as torch does (ties to even), keeps inf and NaN."""
    K, N = 64, 32
    w = torch.zeros(N, K)
    w[0, 0] = 1.0                                   # y[:, 0] = bf16(x[:, 0])
    tie_up = 1.0 + 3 * 2 ** -8                      # odd mantissa below the tie: rounds up
    tie_down = 1.0 + 2 ** -8                        # even below: rounds down
    vals = torch.tensor([tie_up, tie_down, 1.0 + 2 ** -9, -3.14159, float("inf"),
                         float("nan"), 1e-40, 3.0e38])
    x = torch.zeros(len(vals), K)
    x[:, 0] = vals
    wq = gemm.pack_weight_bf16(w)
    for isa in ISAS:
        y = run_native(x, wq, N, isa)[:, 0]
        want = vals.to(torch.bfloat16).float()
        finite = torch.isfinite(want) & (want.abs() > 1e-37)   # AMX flushes denormals
        assert torch.equal(y[finite], want[finite]), isa
        assert y[4] == float("inf") and y[5].isnan(), isa


def test_model_shapes_with_larger_values():
    g = torch.Generator().manual_seed(5)
    for K, N in MODEL_KN[2:] + [(576, 49152)]:
        w = torch.randn(N, K, generator=g) * 0.05
        x = torch.randn(19, K, generator=g) * 30
        y = gemm.skinny_mm_bf16(x, gemm.pack_weight_bf16(w), N)
        assert ((y.double() - reference(x, w)).abs() <= tol(x, w)).all(), (K, N)


def test_pack_layout_is_vnni_panels_of_32_columns_zero_padded():
    N, K = 70, 37
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    wq = gemm.pack_weight_bf16(w)
    assert wq.shape == (3, 2, 16, 2, 32) and wq.dtype == torch.bfloat16 and wq.is_contiguous()
    wb = w.to(torch.bfloat16)
    for p, kb, h, r, j in [(0, 0, 0, 0, 0), (1, 0, 1, 5, 9), (2, 0, 0, 5, 11), (0, 1, 1, 1, 3),
                           (1, 1, 0, 2, 31)]:
        c, e = j // 2, j % 2
        n, k = 32 * p + 16 * h + c, 32 * kb + 2 * r + e
        want = wb[n, k] if n < N and k < K else torch.tensor(0, dtype=torch.bfloat16)
        assert torch.equal(wq[p, kb, r, h, j], want), (p, kb, h, r, j)
    assert (wq[2, :, :, :, 12:] == 0).all()          # columns past N = 70: 64 + 6
    assert (wq[:, 1, 3:] == 0).all()                 # k past K = 37: 32 + 2 * 3 >= 37
    assert torch.equal(gemm.pack_weight_bf16(wb), wq)   # bf16 weights pack the same


def test_strided_rows_are_handled_and_bad_input_refused():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 24, generator=g)
    wq = gemm.pack_weight_bf16(w)
    big = torch.randn(10, 50, generator=g)
    x = big[::2, 3:27]                                  # strided rows, contiguous columns
    assert torch.allclose(gemm.skinny_mm_bf16(x, wq, 40).double(), reference(x, w), atol=1e-4)
    xt = torch.randn(24, 6, generator=g).T              # column-major: copied, still right
    assert torch.allclose(gemm.skinny_mm_bf16(xt, wq, 40).double(), reference(xt, w), atol=1e-4)
    with pytest.raises(ValueError, match="K=33"):
        gemm.skinny_mm_bf16(torch.randn(3, 33), wq, 40)
    with pytest.raises(ValueError, match="panels"):
        gemm.skinny_mm_bf16(torch.randn(3, 24), wq, 70)
    with pytest.raises(ValueError, match="fp32 x and bf16 wq"):
        gemm.skinny_mm_bf16(torch.randn(3, 24, dtype=torch.float64), wq, 40)
    with pytest.raises(ValueError, match="fp32 x and bf16 wq"):
        gemm.skinny_mm_bf16(torch.randn(3, 24), wq.float(), 40)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        gemm.pack_weight_bf16(torch.randn(4, 4, dtype=torch.float16))
    from specrt import _C

    y = torch.empty(1, 40)
    with pytest.raises(ValueError, match="isa must be"):
        _C.skinny_mm_bf16(torch.randn(1, 24).numpy(), wq.view(torch.uint16).numpy(),
                          y.numpy(), 40, 1, "sse9")
    missing = [i for i in ("amx", "avx512bf16", "avx512") if i not in ISAS]
    for isa in missing:                                 # a path this CPU lacks: named
        with pytest.raises(ValueError, match=f"lacks {isa}"):
            _C.skinny_mm_bf16(torch.randn(1, 24).numpy(), wq.view(torch.uint16).numpy(),
                              y.numpy(), 40, 1, isa)
    with pytest.raises(ValueError, match="y must be"):
        _C.skinny_mm_bf16(torch.randn(2, 24).numpy(), wq.view(torch.uint16).numpy(),
                          y.numpy(), 40, 1)


def test_torch_library_op_and_fake():
    x, w = torch.randn(5, 24), torch.randn(40, 24)
    wq = gemm.pack_weight_bf16(w)
    torch.library.opcheck(torch.ops.specrt.skinny_mm_bf16.default, (x, wq, 40))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fwq = mode.from_tensor(x), mode.from_tensor(wq)
        out = torch.ops.specrt.skinny_mm_bf16(fx, fwq, 40)
        assert out.shape == (5, 40) and out.dtype == torch.float32


def test_packed_linear_streams_bf16_when_asked_and_repacks_on_a_dtype_change():
    lin = torch.nn.Linear(24, 40, bias=True)
    pl = gemm.PackedLinear(weight_dtype=torch.bfloat16)
    with torch.no_grad():
        x = torch.randn(7, 24)
        got = pl(x, lin.weight, lin.bias)
        want = reference(x, lin.weight) + lin.bias.double()
        assert torch.allclose(got.double(), want, atol=1e-4)
        assert pl.packed(lin.weight).dtype == torch.bfloat16
        pl.weight_dtype = torch.float32                   # back to fp32: packed again
        assert pl.packed(lin.weight).dtype == torch.float32
        assert torch.allclose(pl(x, lin.weight, lin.bias), lin(x), atol=1e-5)
    with pytest.raises(ValueError, match="weight_dtype"):
        gemm.PackedLinear(weight_dtype=torch.float16)
