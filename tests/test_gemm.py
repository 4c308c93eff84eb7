"""The CPU skinny GEMM (csrc/gemm_cpu.cpp, specrt.ops.gemm): y = x @ W.T for few rows,
against a float64 reference on fresh random inputs, every SIMD path this CPU has, odd
shapes, poisoned outputs, strided inputs; the torch.library op and its fake."""
import pytest
import torch

from specrt.ops import gemm

ISAS = {"avx512": ["avx512", "avx2", "scalar"], "avx2": ["avx2", "scalar"],
        "scalar": ["scalar"]}[gemm.gemm_isa()]
MODEL_KN = [(576, 576), (576, 960), (576, 3072), (1536, 576), (576, 49152)]  # SmolLM2-135M
ODD_KN = [(1, 1), (7, 33), (31, 65), (100, 31), (513, 97)]


def reference(x, w):
    return x.double() @ w.double().T


def tol(K):  # fp32 accumulation over K terms of O(1) products
    return 2e-6 * K ** 0.5 * 8


def run_native(x, wp, n, isa, threads=2):
    """The kernel itself, into an output poisoned with NaN: every element must be
    written."""
    from specrt import _C

    y = torch.full((x.shape[0], n), float("nan"))
    _C.skinny_mm(x.numpy(), wp.numpy(), y.numpy(), n, threads, isa)
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K,N", MODEL_KN[:3] + ODD_KN)
def test_every_row_count_matches_float64(isa, K, N):
    g = torch.Generator().manual_seed(K * 1000 + N)
    w = torch.randn(N, K, generator=g)
    wp = gemm.pack_weight(w)
    for M in [1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 31, 32, 33, 63, 64]:
        x = torch.randn(M, K, generator=g)
        y = run_native(x, wp, N, isa, threads=1 + M % 2)
        assert not y.isnan().any(), (M, "unwritten outputs")
        err = (y.double() - reference(x, w)).abs().max().item()
        assert err < tol(K), (isa, M, K, N, err)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K,N", [(576, 960), (1536, 576), (513, 97)])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(isa, K, N):
    """Bit for bit: row i of an M-row product equals the same row computed alone, for
    every M (the row tiles, the two-panel path and K blocking all keep each output's
    summation order). Batch-invariant logits are what greedy speculative == plain
    decoding, and seeded reproduction inside any batch, stand on."""
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g)
    wp = gemm.pack_weight(w)
    x = torch.randn(70, K, generator=g)
    alone = torch.cat([run_native(x[i:i + 1], wp, N, isa) for i in range(70)])
    for M in [2, 3, 4, 7, 15, 16, 17, 33, 70]:
        for start in (0, 70 - M):
            y = run_native(x[start:start + M], wp, N, isa, threads=1 + M % 2)
            assert torch.equal(y, alone[start:start + M]), (isa, M, start)


@pytest.mark.parametrize("K,N", MODEL_KN[3:])
def test_model_shapes_with_larger_values(K, N):
    g = torch.Generator().manual_seed(N)
    w = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(19, K, generator=g) * 30
    y = gemm.skinny_mm(x, gemm.pack_weight(w), N)
    ref = reference(x, w)
    assert ((y.double() - ref).abs() <= 1e-5 * ref.abs().max()).all()


def test_pack_layout_is_panels_of_32_columns_zero_padded():
    w = torch.arange(70 * 3, dtype=torch.float32).view(70, 3)
    wp = gemm.pack_weight(w)
    assert wp.shape == (3, 3, 32) and wp.is_contiguous()
    assert torch.equal(wp[1, 2, 5], w[37, 2]) and torch.equal(wp[0, :, 0], w[0])
    assert (wp[2, :, 6:] == 0).all() and torch.equal(wp[2, :, :6].T, w[64:])


def test_strided_rows_are_handled_and_bad_input_refused():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 24, generator=g)
    wp = gemm.pack_weight(w)
    big = torch.randn(10, 50, generator=g)
    x = big[::2, 3:27]                                  # strided rows, contiguous columns
    assert torch.allclose(gemm.skinny_mm(x, wp, 40).double(), reference(x, w), atol=1e-5)
    xt = torch.randn(24, 6, generator=g).T              # column-major: copied, still right
    assert torch.allclose(gemm.skinny_mm(xt, wp, 40).double(), reference(xt, w), atol=1e-5)
    with pytest.raises(ValueError, match="K="):
        gemm.skinny_mm(torch.randn(3, 25), wp, 40)
    with pytest.raises(ValueError, match="panels"):
        gemm.skinny_mm(torch.randn(3, 24), wp, 70)
    with pytest.raises(ValueError, match="fp32"):
        gemm.skinny_mm(torch.randn(3, 24, dtype=torch.float64), wp, 40)
    with pytest.raises(ValueError, match="float32"):
        gemm.pack_weight(torch.randn(4, 4, dtype=torch.float16))
    from specrt import _C

    with pytest.raises(ValueError, match="isa"):
        _C.skinny_mm(torch.randn(1, 24).numpy(), wp.numpy(), torch.empty(1, 40).numpy(),
                     40, 1, "sse9")


def test_torch_library_op_and_fake():
    x, w = torch.randn(5, 24), torch.randn(40, 24)
    wp = gemm.pack_weight(w)
    torch.library.opcheck(torch.ops.specrt.skinny_mm.default, (x, wp, 40))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fwp = mode.from_tensor(x), mode.from_tensor(wp)
        assert torch.ops.specrt.skinny_mm(fx, fwp, 40).shape == (5, 40)


def test_packed_linear_picks_the_kernel_or_f_linear_and_repacks_changed_weights():
    lin = torch.nn.Linear(24, 40, bias=True)
    pl = gemm.PackedLinear()
    with torch.no_grad():
        for rows in (1, 7, gemm.MAX_ROWS, gemm.MAX_ROWS + 1):
            x = torch.randn(rows, 24)
            assert torch.allclose(pl(x, lin.weight, lin.bias), lin(x), atol=1e-5)
        packed = pl.packed(lin.weight)
        lin.weight.mul_(2.0)                              # in place: packed again
        assert pl.packed(lin.weight) is not packed
        x = torch.randn(2, 3, 24)                         # leading dims kept
        assert torch.allclose(pl(x, lin.weight, lin.bias), lin(x), atol=1e-5)
    x = torch.randn(3, 24, requires_grad=True)            # autograd: F.linear's path
    pl(x, lin.weight, lin.bias).sum().backward()
    assert x.grad is not None


def test_packed_linear_runs_the_kernel_in_chunks_past_max_rows(monkeypatch):
    lin = torch.nn.Linear(24, 40, bias=True)
    pl = gemm.PackedLinear()
    x = torch.randn(2 * gemm.MAX_ROWS + 3, 24)
    with torch.no_grad():
        want = lin(x)
        monkeypatch.setattr(gemm.F, "linear", None)   # the kernel only
        assert torch.allclose(pl(x, lin.weight, lin.bias), want, atol=1e-5)


def test_packed_linear_takes_inference_mode_weights():
    with torch.inference_mode():
        w, x = torch.randn(40, 24), torch.randn(3, 24)
    pl = gemm.PackedLinear()
    with torch.inference_mode():
        assert torch.allclose(pl(x, w), x @ w.T, atol=1e-5)


def test_big_packs_copied_into_huge_page_advised_memory_hold_the_same_values():
    from specrt.ops._backend import native

    assert native().advise_hugepages(0, 0) is False          # nothing to advise
    assert native().advise_hugepages(4096, 1 << 20) is False  # no whole 2 MB page inside
    w = torch.randn(1000, 1536, generator=torch.Generator().manual_seed(3))  # 6 MB packed
    wp = gemm.pack_weight(w)
    assert wp.is_contiguous() and torch.equal(wp[:, :, 7], w[7::32])  # same values
    wq = gemm.pack_weight_bf16(w)
    assert torch.equal(wq[0, 0, 0, 0, 2 * 7], w[7, 0].to(torch.bfloat16))
