"""The processed distribution (specrt.sampling.logits_to_probs): top-p keeps exactly the
smallest descending prefix whose mass reaches top_p, however wide the nucleus (the
search widens past its first 128 candidates up to the full sort)."""
import pytest
import torch

from specrt.sampling import logits_to_probs


def nucleus_reference(logits: torch.Tensor, temperature: float, top_p: float):
    """The specification, in float64: sort the whole vocabulary; a token stays if the mass
    strictly before it is < top_p; renormalise. Also returns which tokens are on the
    edge: their mass before is within float32 rounding (1e-5) of top_p."""
    p = torch.softmax(logits.double() / temperature, -1)
    sp, idx = torch.sort(p, -1, descending=True)
    before = sp.cumsum(-1) - sp
    out = torch.zeros_like(p).scatter_(-1, idx, sp * (before < top_p))
    edge = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, idx, (before - top_p).abs() < 1e-5)
    return out / out.sum(-1, keepdim=True), edge


def check(got: torch.Tensor, ref: torch.Tensor, edge: torch.Tensor) -> None:
    """Assert that ``got`` is the reference nucleus (row 0 uniform, the others random)."""
    # the same support but on the edge; in the uniform row every token ties, so which
    # ones stay is arbitrary: there only the count (within one) is fixed
    differ = (got > 0) != (ref > 0)
    assert not (differ[1:] & ~edge[1:]).any()
    assert abs(int((got[0] > 0).sum()) - int((ref[0] > 0).sum())) <= 1
    same = ~differ[1:].any(-1)
    assert same.any()
    assert torch.allclose(got[1:][same].double(), ref[1:][same], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("V", [7, 1000, 49152])
@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])      # flat (wide nucleus) .. peaked
@pytest.mark.parametrize("top_p", [0.1, 0.9, 0.999])
def test_top_p_keeps_the_reference_nucleus(V, scale, top_p):
    g = torch.Generator().manual_seed(V * 31 + int(scale * 100) + int(top_p * 1000))
    logits = torch.randn(5, V, generator=g) * scale
    logits[0, :] = 0.0                                    # a uniform row: the whole vocabulary
    got = logits_to_probs(logits, 0.9, 0, top_p)
    ref, edge = nucleus_reference(logits, 0.9, top_p)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    check(got, ref, edge)
    assert torch.allclose(got.sum(-1), torch.ones(5), atol=1e-5)


def test_top_p_one_and_greedy_are_untouched():
    logits = torch.randn(3, 500)
    assert torch.equal(logits_to_probs(logits, 0.7, 0, 1.0), torch.softmax(logits / 0.7, -1))
    g = logits_to_probs(logits, 0.0, 0, 0.5)
    assert torch.equal(g.argmax(-1), logits.argmax(-1)) and torch.equal(g.sum(-1), torch.ones(3))


def test_a_wrong_nucleus_is_caught():
    """Negative control: a nucleus one token short (the rule with <= for <) fails."""
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(5))
    logits[0] = 0.0
    ref, edge = nucleus_reference(logits, 1.0, 0.9)
    check(logits_to_probs(logits, 1.0, 0, 0.9), ref, edge)
    short = ref.clone()
    for r in range(1, 5):
        kept = (ref[r] > 0).nonzero().flatten()
        short[r, kept[ref[r, kept].argmin()]] = 0.0
    with pytest.raises(AssertionError):
        check(short.float(), ref, edge)
