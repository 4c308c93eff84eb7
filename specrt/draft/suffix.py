"""Suffix drafter: continue the request with what followed the same words in the target's
own past outputs (a datastore), after SuffixDecoding (arXiv 2411.04975) and REST
(arXiv 2311.08252).

A deployment's outputs repeat themselves across requests: GSM8K-style answers share
their sentence templates ("... so she has ... left. #### "), code its idioms, chat its
openings. The datastore is a corpus of the target's outputs on the deployment's train
prompts (the collection that trains the model drafters, :mod:`specrt.draft.corpus`),
indexed once by :class:`SuffixIndex`. Each step the drafter finds the longest suffix of
the request's tokens that occurs in the corpus (up to ``window`` tokens), reads what
followed each occurrence, merges those continuations into a trie and proposes its most
frequent paths: a node's confidence is the share of the occurrences that continue
through it. Drafting costs a few binary searches and one small trie per request
(tens of microseconds), no model forward, so it pays under load where a model drafter
does not.

It looks only at the datastore; prompt lookup (:class:`specrt.draft.ngram.NgramDrafter`)
looks at the request itself. The two fuse (``ngram2+suffix+baseline+ngram``: sure
local copies first, then datastore continuations, then the model, see
:mod:`specrt.draft.fused`).

File format: one safetensors file, tensors ``corpus`` (int32 ``[N]``: the documents'
tokens, each document followed by -1) and ``order`` (int32 ``[M]``: the positions that
have a next token, sorted by the tokens that end there read backwards, see
:class:`SuffixIndex`), metadata ``{"format": "specrt-suffix", "version": "1",
"window": str, "vocab_size": str, "documents": str}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from specrt.draft.base import DraftTree, SeqState, Verified

FORMAT = "specrt-suffix"
VERSION = "1"


class SuffixIndex:
    """Every position of a token corpus, sorted by the tokens that end there, read
    backwards (the last token first) over at most ``window`` tokens.

    Positions whose backward keys share their first k tokens are contiguous, and the
    range of a longer suffix lies inside the range of a shorter one, so the longest
    suffix of a context found in the corpus is a chain of binary searches, one per
    matched token (:meth:`match`).

    Args:
        docs: the documents (token id sequences); no match crosses a document boundary.
        window: longest suffix matched.
        vocab_size: ids must lie in ``[0, vocab_size)`` (checked).
    """

    def __init__(self, docs: Iterable[Sequence[int]], window: int = 16,
                 vocab_size: int | None = None):
        parts = []
        n_docs = 0
        for d in docs:
            a = np.asarray(d, dtype=np.int64)
            if a.ndim != 1:
                raise ValueError("SuffixIndex: a document must be a 1-d sequence of token ids")
            if a.size:
                parts += [a, np.array([-1])]
                n_docs += 1
        corpus = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if corpus.size and (corpus.min() < -1 or (vocab_size is not None
                                                   and corpus.max() >= vocab_size)):
            raise ValueError(f"SuffixIndex: token ids must lie in [0, {vocab_size})")
        self.window, self.vocab_size, self.documents = int(window), vocab_size, n_docs
        self.corpus = corpus.astype(np.int32)
        self.order = self._sort(self.corpus, self.window)
        self._finish()

    @classmethod
    def _from_arrays(cls, corpus: np.ndarray, order: np.ndarray, window: int,
                     vocab_size: int | None, documents: int) -> "SuffixIndex":
        self = cls.__new__(cls)
        self.corpus, self.order = corpus.astype(np.int32), order.astype(np.int64)
        self.window, self.vocab_size, self.documents = window, vocab_size, documents
        self._finish()
        return self

    @staticmethod
    def _sort(corpus: np.ndarray, window: int) -> np.ndarray:
        """Positions with a next token, sorted by (c[i], c[i-1], ..., c[i-window+1]),
        where everything before a document's start reads as -1."""
        n = corpus.size
        pos = np.nonzero((corpus[:-1] >= 0) & (corpus[1:] >= 0))[0] if n > 1 else \
            np.zeros(0, np.int64)
        padded = np.concatenate([np.full(window, -1, np.int32), corpus])
        cols, dead = [], np.zeros(pos.size, bool)
        for k in range(window):
            c = padded[pos + window - k].astype(np.int64)
            dead |= c < 0
            cols.append(np.where(dead, -1, c))
        # np.lexsort sorts by the last key first: c[i] is the primary key
        return pos[np.lexsort(cols[::-1])] if pos.size else pos

    def _finish(self) -> None:
        # -1 before the corpus (reads past a document's start) and after it (continuations
        # past the end); ``corpus`` is a view into it, not a second copy
        self._padded = np.concatenate([np.full(self.window, -1, np.int32), self.corpus,
                                       np.full(64, -1, np.int32)])
        self.corpus = self._padded[self.window:self.window + self.corpus.size]
        self._first = self.corpus[self.order] if self.order.size else np.zeros(0, np.int32)

    def __len__(self) -> int:
        """Indexed positions (corpus tokens that have a next token)."""
        return int(self.order.size)

    def _col(self, lo: int, hi: int, k: int) -> np.ndarray:
        return self._padded[self.order[lo:hi] + self.window - k]

    def match(self, context: Sequence[int], min_len: int = 1) -> tuple[int, int, int]:
        """``(n, lo, hi)``: the longest suffix of ``context`` (``n`` tokens, at most
        ``window``) that occurs in the corpus followed by a token; its occurrences are
        ``order[lo:hi]`` (the positions of their last tokens). ``(0, 0, 0)`` when
        fewer than ``min_len`` tokens match."""
        m = min(self.window, len(context))
        if m == 0 or not self.order.size:
            return 0, 0, 0
        # keys as int32 like the arrays: a Python int would make numpy cast the whole
        # array to int64 on every search (30 us instead of 1 at 240k positions)
        t = np.int32(context[-1])
        lo = int(self._first.searchsorted(t, "left"))
        hi = int(self._first.searchsorted(t, "right"))
        if lo == hi:
            return 0, 0, 0
        n = 1
        for k in range(1, m):
            t = np.int32(context[-1 - k])
            col = self._col(lo, hi, k)
            a = int(col.searchsorted(t, "left"))
            b = int(col.searchsorted(t, "right"))
            if a == b:
                break
            lo, hi, n = lo + a, lo + b, k + 1
        return (n, lo, hi) if n >= min_len else (0, 0, 0)

    def continuations(self, lo: int, hi: int, depth: int, max_occ: int = 256) -> np.ndarray:
        """``[m, depth]`` int32: the ``depth`` tokens after each occurrence in
        ``order[lo:hi]`` (-1 past a document's end); at most ``max_occ`` occurrences,
        evenly spaced over the range when there are more."""
        occ = self.order[lo:hi]
        if occ.size > max_occ:
            occ = occ[np.linspace(0, occ.size - 1, max_occ).round().astype(np.int64)]
        idx = occ[:, None] + self.window + 1 + np.arange(depth)[None, :]
        c = self._padded[idx]
        # everything after a document's end is -1
        return np.where(np.maximum.accumulate(c < 0, axis=1), -1, c)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """Write the index (see the module docstring), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        meta = {"format": FORMAT, "version": VERSION, "window": str(self.window),
                "vocab_size": str(self.vocab_size if self.vocab_size is not None else -1),
                "documents": str(self.documents)}
        save_file({"corpus": torch.from_numpy(self.corpus.astype(np.int32)),
                   "order": torch.from_numpy(self.order.astype(np.int32))}, str(tmp), meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "SuffixIndex":
        """Read an index written by :meth:`save`; ``ValueError`` naming the file when it
        is not one (wrong format, missing tensors, positions out of range)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path}: not a suffix datastore (format "
                                     f"{meta.get('format')!r}, expected {FORMAT!r})")
                if meta.get("version") != VERSION:
                    raise ValueError(f"{path}: suffix datastore version "
                                     f"{meta.get('version')!r}, this build reads {VERSION}")
                keys = set(f.keys())
                if keys != {"corpus", "order"}:
                    raise ValueError(f"{path}: a suffix datastore holds tensors corpus and "
                                     f"order, found {sorted(keys)}")
                corpus = f.get_tensor("corpus").numpy()
                order = f.get_tensor("order").numpy()
        except ValueError:
            raise
        except Exception as e:   # safetensors' own errors: truncated or not safetensors
            raise ValueError(f"{path}: unreadable suffix datastore ({e})") from None
        window, vocab, ndoc = (int(meta.get(k, -1)) for k in ("window", "vocab_size",
                                                              "documents"))
        n = corpus.size
        if (corpus.ndim != 1 or order.ndim != 1 or window < 1 or order.size >= max(n, 1)
                or (order.size and (order.min() < 0 or order.max() >= n - 1))
                or (n and (corpus[-1] != -1 or corpus.min() < -1))
                or (vocab > 0 and n and corpus.max() >= vocab)):
            raise ValueError(f"{path}: corrupt suffix datastore (tensor shapes or values "
                             "out of range)")
        return cls._from_arrays(corpus, order, window, vocab if vocab > 0 else None, ndoc)


def build_tree(root: int, conts: np.ndarray, budget: int, min_prob: float,
               smoothing: float = 1.0) -> DraftTree:
    """The draft tree of the ``budget`` most frequent paths through ``conts`` (``[m, D]``
    continuations, -1 = none): the trie of the continuations, each node weighted by the
    share of continuations through it, ``count / (m + smoothing)``; nodes are taken in
    decreasing weight (a child never outweighs its parent, and ties go to the shallower
    node, so parents come first), those under ``min_prob`` left out. ``conf`` holds each
    node's weight (1.0 at the root)."""
    tokens, parents, conf = [root], [-1], [1.0]
    if budget <= 0 or conts.size == 0:
        return DraftTree(tokens, parents, conf=conf)
    counts: dict[tuple, int] = {}
    for row in conts.tolist():   # a few dozen rows of a few tokens: plain Python is fastest
        path: tuple = ()
        for t in row:
            if t < 0:
                break
            path += (t,)
            counts[path] = counts.get(path, 0) + 1
    denom = conts.shape[0] + smoothing
    least = min_prob * denom
    ranked = sorted((-c, len(p), p) for p, c in counts.items() if c >= least)
    where = {(): 0}
    for negc, _, p in ranked[:budget]:
        where[p] = len(tokens)
        tokens.append(p[-1])
        parents.append(where[p[:-1]])
        conf.append(-negc / denom)
    return DraftTree(tokens, parents, conf=conf)


class SuffixDrafter:
    """Draft trees from a :class:`SuffixIndex` of the target's past outputs.

    Args:
        index: the datastore.
        name: drafter name in the engine.
        min_match: shortest suffix match that drafts (shorter ones draft nothing).
        min_prob: a node needs at least this share of the matched occurrences.
        max_depth: deepest node drafted.
        max_occ: occurrences read per step (evenly spaced over the match's range).
    """

    kind = "suffix"

    def __init__(self, index: SuffixIndex, name: str = "suffix", min_match: int = 2,
                 min_prob: float = 0.1, max_depth: int = 8, max_occ: int = 64):
        if min_match < 1 or max_depth < 1 or max_occ < 1 or not 0 <= min_prob <= 1:
            raise ValueError("SuffixDrafter: need min_match >= 1, max_depth >= 1, "
                             "max_occ >= 1 and 0 <= min_prob <= 1")
        self.index, self.name = index, name
        self.min_match, self.min_prob = int(min_match), float(min_prob)
        self.max_depth, self.max_occ = int(max_depth), int(max_occ)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, vocab_size: int | None = None,
             **config) -> "SuffixDrafter":
        """The drafter of a datastore file (named after its stem by default);
        ``ValueError`` when it indexes another vocabulary than ``vocab_size`` (the
        target's, when given)."""
        path = Path(path)
        stem = path.name[:-len(".safetensors")] if path.name.endswith(".safetensors") \
            else path.stem
        index = SuffixIndex.load(path)
        if vocab_size is not None and index.vocab_size not in (None, vocab_size):
            raise ValueError(f"{path}: the datastore indexes a vocabulary of "
                             f"{index.vocab_size}, the target has {vocab_size}")
        return cls(index, name=name or stem, **config)

    def config(self) -> dict:
        """The constructor options (a pool entry's ``config``)."""
        return {"min_match": self.min_match, "min_prob": self.min_prob,
                "max_depth": self.max_depth, "max_occ": self.max_occ}

    def begin(self, seq: SeqState, prompt_hidden: torch.Tensor | None) -> None:
        pass

    def propose(self, seqs: list[SeqState], budgets: list[int]) -> list[DraftTree]:
        """A tree per request: the most frequent continuations of its longest suffix
        found in the datastore (just the root when none of ``min_match`` tokens)."""
        return [self._one(s.tokens, b) for s, b in zip(seqs, budgets)]

    def _one(self, toks: list[int], budget: int) -> DraftTree:
        root = toks[-1]
        if budget <= 0:
            return DraftTree([root], [-1], conf=[1.0])
        n, lo, hi = self.index.match(toks, self.min_match)
        if n == 0:
            return DraftTree([root], [-1], conf=[1.0])
        conts = self.index.continuations(lo, hi, min(budget, self.max_depth, 64), self.max_occ)
        return build_tree(root, conts, budget, self.min_prob)

    def update(self, seq: SeqState, result: Verified) -> None:
        pass

    def release(self, seq: SeqState) -> None:
        pass


def build_datastore(records: Iterable[dict], out: str | Path, *, vocab_size: int,
                    window: int = 16) -> SuffixIndex:
    """Index the ``output_ids`` of collected records (:mod:`specrt.draft.corpus`, every
    sample: on 156 train prompts held out, a datastore of greedy outputs only drafted
    as well as one with the seeded samples too) and write it to ``out``."""
    idx = SuffixIndex([r["output_ids"] for r in records], window=window,
                      vocab_size=vocab_size)
    idx.save(out)
    return idx
