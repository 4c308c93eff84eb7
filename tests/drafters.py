"""Test-only drafters that make the target reject often (so commit paths get exercised)."""
from __future__ import annotations

import random

import torch

from specrt.draft.base import DraftTree


class ScriptedTreeDrafter:
    """Random trees whose branches sometimes follow a known continuation.

    ``script`` maps a token prefix length -> the reference continuation (token list of the
    whole sequence); each tree puts the true next tokens on one random branch with
    probability ``p_true`` per level and random tokens elsewhere.
    """

    kind = "test"

    def __init__(self, name, reference: dict[tuple, list[int]], vocab: int, seed=0,
                 p_true=0.7, width=2, chain=False, sampled=False):
        self.name = name
        self.reference = reference  # prompt tuple -> full greedy sequence (prompt + output)
        self.vocab, self.p_true, self.width, self.chain = vocab, p_true, width, chain
        self.sampled = sampled
        self.rng = random.Random(seed)

    def begin(self, seq, prompt_hidden):
        seq.state["ref"] = self.reference.get(tuple(seq.tokens[:seq.prompt_len]), [])

    def propose(self, seqs, budgets):
        out = []
        for s, b in zip(seqs, budgets):
            ref = s.state["ref"]
            n = len(s.tokens)
            tokens, parents = [s.tokens[-1]], [-1]
            frontier = [(0, True, 0)]  # (node, on the true path, depth)
            while frontier and len(tokens) <= b:
                node, on_true, d = frontier.pop(0)
                kids = 1 if self.chain else self.rng.randint(1, self.width)
                for k in range(kids):
                    if len(tokens) > b:
                        break
                    truth = on_true and k == 0 and n + d < len(ref) and self.rng.random() < self.p_true
                    tok = ref[n + d] if truth else self.rng.randrange(self.vocab)
                    tokens.append(tok)
                    parents.append(node)
                    frontier.append((len(tokens) - 1, truth, d + 1))
            if self.sampled:  # claim a uniform q for every node: still a valid draft distribution
                q = torch.full((len(tokens), self.vocab), 1.0 / self.vocab)
                out.append(DraftTree(tokens, parents, probs=q))
            else:
                out.append(DraftTree(tokens, parents))
        return out

    def update(self, seq, result):
        seq.state.setdefault("paths", []).append(list(result.path))

    def release(self, seq):
        pass


def record_rate_tables(engine) -> list:
    """Wrap ``engine.generate`` so that each call appends the acceptance table the
    adaptive length rule uses during it (``engine.lengths.drafter_rate``); returns the
    list it fills (tests of whose history a measurement reads and writes)."""
    seen: list = []
    orig = engine.generate

    def spy(*a, **kw):
        seen.append(engine.lengths.drafter_rate)
        return orig(*a, **kw)

    engine.generate = spy
    return seen


def rate_snapshot(table: dict) -> dict:
    """``{drafter: (hits, trials)}`` of an acceptance table, for equality checks."""
    return {k: (v.hits, v.trials) for k, v in table.items()}


def greedy_reference(engine, prompts: list[str], n: int) -> tuple[dict, list[list[int]]]:
    """Plain AR greedy outputs of ``prompts`` (``n`` tokens, EOS ignored): ``({prompt ids
    tuple: prompt + output ids}, [output ids per prompt])`` -- the ``reference`` that
    :class:`ScriptedTreeDrafter` follows, and what lossless runs must reproduce."""
    from specrt import SamplingParams

    outs = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True),
                           speculative=False)
    ref = {}
    for p, o in zip(prompts, outs):
        ids = engine.tokenizer.encode_prompt(p)
        ref[tuple(ids)] = ids + o.token_ids
    return ref, [o.token_ids for o in outs]


def run_to_end(eng, abort_at=None) -> dict:
    """Step ``eng`` (the step API) until nothing is left: request id -> RequestOutput.
    ``abort_at`` = (step number, request id) aborts that request before that step. A
    request finishing twice is an error."""
    outs, n = {}, 0
    while eng.has_unfinished():
        if abort_at and n == abort_at[0]:
            eng.abort(abort_at[1])
        for ev in eng.step():
            if ev.finished:
                assert ev.request_id not in outs, "a request finished twice"
                outs[ev.request_id] = ev.output
        n += 1
    return outs
