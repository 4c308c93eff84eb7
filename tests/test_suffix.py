"""The suffix drafter's contract: its index finds exactly the longest suffix a brute-force
scan finds (never across a document's end), reads back exactly what followed each
occurrence, proposes the trie's most frequent paths within the budget, and a damaged
datastore file is refused naming the file."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specrt.draft.base import SeqState
from specrt.draft.registry import drafter_entry, drafter_from_spec
from specrt.draft.suffix import SuffixDrafter, SuffixIndex, build_tree


def random_docs(rng, n_docs, vocab, max_len):
    # few distinct tokens and repeated phrases so that long matches exist
    phrases = [[rng.randrange(vocab) for _ in range(rng.randint(2, 6))] for _ in range(6)]
    docs = []
    for _ in range(n_docs):
        d = []
        while len(d) < rng.randint(1, max_len):
            d += rng.choice(phrases) if rng.random() < 0.6 else [rng.randrange(vocab)]
        docs.append(d)
    return docs


def brute_match(docs, ctx, window):
    """Longest n <= window with ctx[-n:] inside one document followed by a token, and
    the (doc, end position) of each occurrence."""
    best, occ = 0, []
    for n in range(1, min(window, len(ctx)) + 1):
        pat = ctx[-n:]
        hits = [(di, j + n - 1) for di, d in enumerate(docs)
                for j in range(len(d) - n) if d[j:j + n] == pat]
        if not hits:
            break
        best, occ = n, hits
    return best, occ


@pytest.mark.parametrize("seed", range(6))
def test_match_is_the_longest_suffix_a_scan_finds(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 11])
    docs = random_docs(rng, rng.randint(1, 12), vocab, 40)
    window = rng.choice([1, 3, 8])
    idx = SuffixIndex(docs, window=window, vocab_size=vocab)
    starts = np.cumsum([0] + [len(d) + 1 for d in docs])
    for _ in range(60):
        src = rng.choice(docs)
        cut = rng.randint(1, len(src))
        ctx = src[:cut] if rng.random() < 0.7 else \
            [rng.randrange(vocab) for _ in range(rng.randint(1, 10))]
        n, lo, hi = idx.match(ctx)
        want_n, want_occ = brute_match(docs, ctx, window)
        assert n == want_n
        got = sorted(int(p) for p in idx.order[lo:hi])
        assert got == sorted(int(starts[di] + j) for di, j in want_occ)
        # what follows each occurrence, up to the document's end
        conts = idx.continuations(lo, hi, 5, max_occ=10_000)
        for row, p in zip(conts.tolist(), idx.order[lo:hi].tolist()):
            di = int(np.searchsorted(starts, p, "right")) - 1
            j = p - starts[di]
            want = docs[di][j + 1:j + 6]
            assert row == want + [-1] * (5 - len(want))


def test_min_len_and_empty_cases():
    idx = SuffixIndex([[1, 2, 3, 4], [2, 3, 9]], window=4)
    assert idx.match([7, 2, 3]) == (2, *idx.match([7, 2, 3])[1:])
    assert idx.match([7, 2, 3], min_len=3) == (0, 0, 0)
    assert idx.match([4]) == (0, 0, 0)          # 4 ends its document: nothing follows
    assert idx.match([]) == (0, 0, 0)
    assert len(SuffixIndex([], window=4)) == 0
    assert SuffixIndex([], window=4).match([1, 2]) == (0, 0, 0)
    with pytest.raises(ValueError, match="token ids"):
        SuffixIndex([[1, 50]], vocab_size=10)


def brute_trie(conts):
    counts = {}
    for row in conts.tolist():
        for d in range(len(row)):
            if row[d] < 0:
                break
            counts[tuple(row[:d + 1])] = counts.get(tuple(row[:d + 1]), 0) + 1
    return counts


@pytest.mark.parametrize("seed", range(5))
def test_tree_holds_the_most_frequent_paths(seed):
    rng = np.random.default_rng(seed)
    m, depth = int(rng.integers(1, 40)), int(rng.integers(1, 7))
    conts = rng.integers(0, 3, size=(m, depth))
    conts[rng.random((m, depth)) < 0.05] = -1
    conts = np.where(np.maximum.accumulate(conts < 0, axis=1), -1, conts)
    budget, min_prob = int(rng.integers(1, 12)), float(rng.choice([0.0, 0.1, 0.3]))
    tree = build_tree(7, conts, budget, min_prob)
    counts = brute_trie(conts)
    assert tree.tokens[0] == 7 and len(tree) - 1 <= budget
    paths = {0: ()}
    for i in range(1, len(tree)):
        assert tree.parents[i] < i
        paths[i] = paths[tree.parents[i]] + (tree.tokens[i],)
        assert tree.conf[i] == pytest.approx(counts[paths[i]] / (m + 1))
        assert tree.conf[i] >= min_prob
    kept = {paths[i] for i in range(1, len(tree))}
    assert len(kept) == len(tree) - 1                  # a trie: no duplicate paths
    # nothing left out beats what was kept (unless the budget ran out)
    eligible = [p for p, c in counts.items() if c / (m + 1) >= min_prob]
    if len(tree) - 1 < budget:
        assert kept == set(eligible)
    else:
        worst = min(counts[p] for p in kept)
        assert all(counts[p] <= worst for p in eligible if p not in kept)


def test_drafter_continues_what_followed_in_the_datastore():
    idx = SuffixIndex([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [1, 6, 7, 3]], window=8)
    d = SuffixDrafter(idx, min_match=2, min_prob=0.2)
    t = d.propose([SeqState(0, [4, 5, 6, 7], 1)], [3])[0]
    assert t.tokens == [7, 8, 9]                  # the 2 occurrences of 5 6 7 agree
    t = d.propose([SeqState(0, [0, 6, 7], 1)], [4])[0]
    assert t.tokens[:2] == [7, 8] and 3 in t.tokens[1:]   # 2 of 3 go on with 8, 1 with 3
    assert d.propose([SeqState(0, [9, 7], 1)], [4])[0].tokens == [7]   # min_match
    assert d.propose([SeqState(0, [5, 6, 7], 1)], [0])[0].tokens == [7]  # no budget


def test_datastore_file_round_trip_and_damage(tmp_path):
    rng = random.Random(0)
    docs = random_docs(rng, 20, 9, 30)
    idx = SuffixIndex(docs, window=6, vocab_size=9)
    p = tmp_path / "store.safetensors"
    idx.save(p)
    back = SuffixIndex.load(p)
    assert (back.corpus == idx.corpus).all() and (back.order == idx.order).all()
    assert back.window == 6 and back.vocab_size == 9 and back.documents == 20
    for _ in range(20):
        ctx = rng.choice(docs)[:5]
        assert back.match(ctx) == idx.match(ctx)
    # the registry's spec for a datastore file
    model = SimpleNamespace(args=SimpleNamespace(vocab_size=9))
    sd = drafter_from_spec(str(p), model)
    assert isinstance(sd, SuffixDrafter) and sd.name == "store"
    e = drafter_entry(sd, files=["store.safetensors"])
    assert e["kind"] == "suffix" and e["config"] == sd.config()
    with pytest.raises(ValueError, match="vocabulary of 9"):
        drafter_from_spec(str(p), SimpleNamespace(args=SimpleNamespace(vocab_size=96)))

    good = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[:len(good) - 7])
    with pytest.raises(ValueError, match="cut.safetensors"):
        SuffixIndex.load(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a suffix datastore"):
        SuffixIndex.load(tmp_path / "other.safetensors")
    save_file({"corpus": torch.tensor([1, 2, -1], dtype=torch.int32),
               "order": torch.tensor([5], dtype=torch.int32)},
              str(tmp_path / "bad.safetensors"),
              {"format": "specrt-suffix", "version": "1", "window": "4",
               "vocab_size": "9", "documents": "1"})
    with pytest.raises(ValueError, match="corrupt suffix datastore"):
        SuffixIndex.load(tmp_path / "bad.safetensors")
    assert p.read_bytes() == good                      # reading never writes
