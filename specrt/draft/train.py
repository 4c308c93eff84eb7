"""Train the baseline model drafter of a target by distillation on its own outputs.

Stages (each cached under ``--work``; rerunning skips the stages already done):

1. ``collect``: a task-balanced subsample of the TRAIN split of a prompt file is
   generated greedily by the target through :class:`specrt.Engine` (batched). A
   recording drafter that never drafts captures, for free, the target's pre-norm
   last-layer hidden state at every position (prompt and output). Saved in chunks
   ``collect_XXX.pt`` (token ids + fp16 hidden states), so an interrupted run resumes.
2. ``vocab``: the ``--vocab`` most frequent tokens of the target's outputs (prompt
   tokens fill up the rest) form the drafter's reduced output vocabulary.
3. ``train``: the drafter (initialised from the target's first ``--layers`` layers and
   its final norm; embedding and LM head frozen and shared) is trained with a KL loss
   to the target's next-token distribution restricted to the reduced vocabulary
   (computed on the fly from the cached hidden states: ``final_norm(h) @ head_sub.T``).
   For ``--kind eagle`` a smooth-L1 loss also regresses the target's hidden state of
   the same position (both RMS-normalised).
4. ``eval``: greedy acceptance of chains on held-out EVAL-split prompts.

Usage::

    python -m specrt.draft.train --out specrt/pools/default --kind eagle --layers 1 --threads 1

(the shipped baseline: 24 prompts/task, 64 output tokens, 24 epochs capped at 13 min).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from specrt.draft.base import DraftTree, SeqState, Verified


class _Recorder:
    """A drafter that never drafts and records the target's hidden states per request."""

    name = "recorder"
    kind = "recorder"

    def __init__(self):
        self.done: list[dict] = []

    def begin(self, seq: SeqState, prompt_hidden):
        seq.state["hid"] = [prompt_hidden.detach().to(torch.float16).clone()]

    def propose(self, seqs, budgets):
        return [DraftTree([s.tokens[-1]], [-1]) for s in seqs]

    def update(self, seq: SeqState, result: Verified):
        seq.state["hid"].append(result.target_hidden[:1].detach().to(torch.float16).clone())

    def release(self, seq: SeqState):
        hid = torch.cat(seq.state.pop("hid"))
        n = min(hid.shape[0], len(seq.tokens) - 1)  # a state for every token but the last
        hid = hid[:n]
        self.done.append({"tokens": torch.tensor(seq.tokens[:n + 1]), "hidden": hid,
                          "prompt_len": seq.prompt_len})


def _log(msg: str) -> None:
    print(f"[train] {msg}", flush=True)


def stage_collect(engine, rows: list[dict], work: Path, max_tokens: int, batch: int,
                  chunk: int = 16, budget_s: float = float("inf")) -> list[dict]:
    """Generate the target's greedy outputs for ``rows`` and record hidden states.

    Returns the list of sequences ``{tokens [n+1], hidden [n, H] fp16, prompt_len,
    task}``; chunks already on disk are loaded instead of regenerated. No new chunk is
    started after ``budget_s`` seconds (rows are interleaved across tasks, so a cut
    collection stays balanced).
    """
    from tqdm import tqdm

    from specrt import SamplingParams

    rec = _Recorder()
    seqs: list[dict] = []
    t_start = time.perf_counter()
    # the recorder alone, never drafting (draft length 0): plain greedy target outputs
    with engine.using(drafters=[rec], max_draft=0):
        nchunks = -(-len(rows) // chunk)
        for c in tqdm(range(nchunks), desc="collect chunks", unit="chunk"):
            f = work / f"collect_{c:03d}.pt"
            part = rows[c * chunk:(c + 1) * chunk]
            if f.is_file():  # reuse a chunk only if it holds exactly these prompts
                got = torch.load(f)
                want = sorted(tuple(engine.tokenizer.encode_prompt(r["prompt"])) for r in part)
                have = sorted(tuple(d["tokens"][:d["prompt_len"]].tolist()) for d in got)
                if want == have:
                    seqs.extend(got)
                    continue
            if time.perf_counter() - t_start > budget_s:
                _log(f"collect time budget reached: {c} of {nchunks} chunks")
                break
            rec.done.clear()
            by_id: dict[tuple, str] = {}
            for r in part:
                by_id[tuple(engine.tokenizer.encode_prompt(r["prompt"]))] = r["task"]
            engine.generate([r["prompt"] for r in part], SamplingParams(max_tokens=max_tokens),
                            progress=True)
            got = []
            for d in rec.done:
                d["task"] = by_id.get(tuple(d["tokens"][:d["prompt_len"]].tolist()), "unknown")
                got.append(d)
            torch.save(got, f)
            seqs.extend(got)
    return seqs


def stage_vocab(seqs: list[dict], n: int, extra: list[int]) -> torch.Tensor:
    """The ``n`` most frequent output tokens (prompt tokens fill up), ``extra`` forced in.

    Returns sorted int64 ids.
    """
    out = torch.zeros(0, dtype=torch.long)
    cnt_out: dict[int, int] = {}
    cnt_in: dict[int, int] = {}
    for s in seqs:
        t = s["tokens"].tolist()
        p = s["prompt_len"]
        for x in t[p:]:
            cnt_out[x] = cnt_out.get(x, 0) + 1
        for x in t[:p]:
            cnt_in[x] = cnt_in.get(x, 0) + 1
    order = [x for x in extra]
    order += sorted(cnt_out, key=lambda x: -cnt_out[x])
    order += sorted(cnt_in, key=lambda x: -cnt_in[x])
    seen, ids = set(), []
    for x in order:
        if x not in seen:
            seen.add(x)
            ids.append(x)
        if len(ids) == n:
            break
    x = 0
    while len(ids) < n:  # tiny corpora: pad with the lowest unused ids
        if x not in seen:
            ids.append(x)
            seen.add(x)
        x += 1
    out = torch.tensor(sorted(ids), dtype=torch.long)
    tot = sum(cnt_out.values())
    cov = sum(cnt_out.get(int(i), 0) for i in out) / max(tot, 1)
    _log(f"reduced vocab {n}: covers {cov:.1%} of {tot} output tokens "
         f"({len(cnt_out)} distinct)")
    return out


def _batches(seqs: list[dict], max_len: int, batch_tokens: int, rng: random.Random):
    """Windows of at most ``max_len`` positions (ending at the sequence end, so the
    outputs are always included), grouped into batches of ~``batch_tokens``."""
    items = []
    for s in seqs:
        n = s["hidden"].shape[0]
        end = n
        while end > 0:
            start = max(0, end - max_len)
            items.append((s, start, end))
            end = start
            if end < s["prompt_len"] // 2:  # long prompts: keep one window into them
                break
    rng.shuffle(items)
    items.sort(key=lambda it: it[2] - it[1])  # similar lengths together, less padding
    groups, cur, cur_len = [], [], 0
    for it in items:
        L = it[2] - it[1]
        if cur and (len(cur) + 1) * max(cur_len, L) > batch_tokens:
            groups.append(cur)
            cur, cur_len = [], 0
        cur.append(it)
        cur_len = max(cur_len, L)
    if cur:
        groups.append(cur)
    rng.shuffle(groups)
    return groups


def _assemble(g: list, hidden_size: int):
    """One batch of windows ``(seq, start, end)``: ``toks [B, L+1]``, target states
    ``hid [B, L, H]`` (fp32), previous-position states ``prev [B, L, H]``, valid
    ``mask [B, L]``, window-local ``pos [B, L]`` and ``out [B, L]`` (position j
    predicts an OUTPUT token: j + 1 >= prompt_len)."""
    B, L = len(g), max(e - s for _, s, e in g)
    toks = torch.zeros(B, L + 1, dtype=torch.long)
    hid = torch.zeros(B, L, hidden_size)
    mask = torch.zeros(B, L, dtype=torch.bool)
    out = torch.zeros(B, L, dtype=torch.bool)
    prev = torch.zeros(B, L, hidden_size)
    for i, (s, a, e) in enumerate(g):
        n = e - a
        toks[i, :n + 1] = s["tokens"][a:e + 1]
        hid[i, :n] = s["hidden"][a:e].float()
        if a > 0:
            prev[i, 0] = s["hidden"][a - 1].float()
        prev[i, 1:n] = hid[i, :n - 1]
        mask[i, :n] = True
        j = torch.arange(a, e)
        out[i, :n] = j + 1 >= s["prompt_len"]
    return toks, hid, prev, mask, torch.arange(L).expand(B, L), out


@torch.no_grad()
def teacher_forced_accuracy(net, target, seqs: list[dict], max_len: int = 256,
                            batch_tokens: int = 4096) -> dict:
    """Draft accuracy of ``net`` on ``seqs`` (as for :func:`stage_train`), teacher
    forced: at each position whose next token is a target OUTPUT token, does the
    drafter's argmax equal the target's (``top1``), is the target's token among the
    drafter's top 3 (``top3``)? Returns ``{"top1", "top3", "positions"}``."""
    was = net.training
    net.eval()
    hits1 = hits3 = n = 0
    for g in _batches(seqs, max_len, batch_tokens, random.Random(0)):
        toks, hid, prev, mask, pos, out = _assemble(g, target.args.hidden_size)
        L = pos.shape[1]
        sel = mask & out
        if not sel.any():
            continue
        x = net.train_forward(toks[:, :L], pos, prev if net.arch == "eagle" else None)
        dl = net.logits(x)[sel]
        want = toks[:, 1:L + 1][sel]
        top = net.vocab_ids[dl.topk(min(3, dl.shape[-1]), -1).indices]
        hits1 += int((top[:, 0] == want).sum())
        hits3 += int((top == want[:, None]).any(-1).sum())
        n += int(sel.sum())
    net.train(was)
    return {"top1": hits1 / n if n else 0.0, "top3": hits3 / n if n else 0.0, "positions": n}


def stage_train(drafter_net, target, seqs: list[dict], *, epochs: float, lr: float,
                max_len: int, batch_tokens: int, feat_weight: float, seed: int,
                time_budget_s: float) -> dict:
    """Distil ``drafter_net`` (a :class:`specrt.draft.model.DraftNet`) on ``seqs``.

    Loss per position j (predicting token j+1): KL(target || drafter) over the reduced
    vocabulary; for eagle nets plus ``feat_weight`` x smooth-L1 of the drafter's output
    state against the target's hidden state at j. Returns a summary dict.
    """
    from tqdm import tqdm

    from specrt.draft.model import feature_norm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    net = drafter_net
    params = [p for p in net.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    groups_per_epoch = len(_batches(seqs, max_len, batch_tokens, rng))
    total = max(1, int(groups_per_epoch * epochs))
    warm = max(1, total // 20)

    def set_lr(frac: float) -> None:  # warm-up, then cosine to 10% over steps or time
        f = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g_ in opt.param_groups:
            g_["lr"] = lr * f

    head_sub = net.head_sub.detach()
    norm_w, eps = target.norm.detach(), target.args.rms_norm_eps
    step, t0 = 0, time.perf_counter()
    ema = None
    bar = tqdm(total=total, desc=f"train {net.arch}", unit="batch")
    net.train()
    while step < total:
        for g in _batches(seqs, max_len, batch_tokens, rng):
            frac = max(step / total, (time.perf_counter() - t0) / time_budget_s)
            if frac >= 1.0:
                break
            set_lr(frac)
            toks, hid, prev, mask, pos, _ = _assemble(g, target.args.hidden_size)
            L = pos.shape[1]
            with torch.no_grad():
                from specrt.model.llama import rms_norm
                tl = F.linear(rms_norm(hid, norm_w, eps), head_sub)[mask]
                tp = F.log_softmax(tl, -1)
            x = net.train_forward(toks[:, :L], pos, prev if net.arch == "eagle" else None)
            dl = net.logits(x)[mask]
            dp = F.log_softmax(dl, -1)
            kl = (tp.exp() * (tp - dp)).sum(-1).mean()
            loss = kl
            feat = torch.zeros(())
            if net.arch == "eagle" and feat_weight > 0:
                feat = F.smooth_l1_loss(feature_norm(x[mask]), feature_norm(hid[mask]))
                loss = loss + feat_weight * feat
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            with torch.no_grad():
                acc = (dl.argmax(-1) == tl.argmax(-1)).float().mean().item()
            cur = (kl.item(), feat.item(), acc)
            ema = cur if ema is None else tuple(0.95 * a + 0.05 * b for a, b in zip(ema, cur))
            bar.set_postfix(kl=f"{ema[0]:.3f}", feat=f"{ema[1]:.3f}", top1=f"{ema[2]:.3f}")
            bar.update(1)
        if time.perf_counter() - t0 > time_budget_s:
            _log(f"time budget reached after {step} batches")
            break
    bar.close()
    net.eval()
    return {"steps": step, "planned_steps": total, "final_kl": ema[0] if ema else None,
            "final_top1_match": ema[2] if ema else None,
            "seconds": round(time.perf_counter() - t0, 1)}


def stage_eval(engine, drafter, rows: list[dict], max_tokens: int, max_draft: int) -> dict:
    """Greedy acceptance of ``drafter`` on ``rows`` (batch 1, budgets pinned to
    ``max_draft``), measured by :func:`specrt.measure.measure`."""
    from specrt import SamplingParams
    from specrt.measure import by_task, measure

    with engine.using(drafters=[drafter], max_batch=1, max_draft=max_draft, adaptive=False):
        recs = measure(engine, rows, [drafter.name], SamplingParams(max_tokens=max_tokens))
    per = by_task(recs[drafter.name])
    s = per.pop("all")
    return {"prompts": len(rows), "max_draft": max_draft,
            "acceptance_rate": round(s["acceptance_rate"], 4),
            "tokens_per_step": round(s["mean_accepted_length"], 3),
            "per_task_acceptance": {k: round(v["acceptance_rate"], 3)
                                    for k, v in per.items()}}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``python -m specrt.draft.train --help``)."""
    from specrt.data import (balanced_sample, default_prompts_path, interleave_tasks,
                             load_prompts, shorten_prompt, split)

    ap = argparse.ArgumentParser(prog="python -m specrt.draft.train",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (baseline.safetensors/json)")
    ap.add_argument("--name", default="baseline", help="file stem of the shipped drafter")
    ap.add_argument("--target", default=None, help="target model (default: the default model)")
    ap.add_argument("--prompts", default=None, help="prompt JSONL (default ../shared/data/prompts.jsonl)")
    ap.add_argument("--work", default=None, help="cache dir for stages (default ~/.cache/specrt/draft_train)")
    ap.add_argument("--per-task", type=int, default=24, help="train prompts per task")
    ap.add_argument("--max-tokens", type=int, default=64, help="target output tokens per prompt")
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--max-prompt-chars", type=int, default=1500,
                    help="longer train prompts keep their first 2/3 and last 1/3 of this")
    ap.add_argument("--collect-minutes", type=float, default=20.0,
                    help="start no new generation chunk after this long")
    ap.add_argument("--kind", choices=["lm", "eagle"], default="eagle")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--epochs", type=float, default=24.0)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--feat-weight", type=float, default=0.1)
    ap.add_argument("--train-minutes", type=float, default=13.0)
    ap.add_argument("--eval-prompts", type=int, default=1, help="eval prompts per task (0: skip)")
    ap.add_argument("--eval-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch default; 1 is much faster on a busy "
                         "shared CPU, where extra threads oversubscribe the cores)")
    ap.add_argument("--reserve-frac", type=float, default=0.3,
                    help="leave this share of the train prompts (specrt.data.is_reserved) "
                         "out of training: `specrt align` measures drafters on them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-after", choices=["collect", "vocab", "train"], default=None)
    a = ap.parse_args(argv)

    import specrt

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path.home() / ".cache" / "specrt" / "draft_train"
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t = time.perf_counter()
    engine = specrt.Engine.from_pretrained(a.target, device="cpu", max_batch=a.gen_batch,
                                           drafters=[], cache_tokens=32768)
    times["load_target_s"] = round(time.perf_counter() - t, 1)
    rows = load_prompts(a.prompts or default_prompts_path())
    train_rows, eval_rows = split(rows)
    train_rows = interleave_tasks(balanced_sample(train_rows, a.per_task, seed=a.seed))
    # long documents: keep head and tail (batched prefill pads)
    train_rows = [dict(r, prompt=shorten_prompt(r["prompt"], a.max_prompt_chars))
                  for r in train_rows]
    _log(f"{len(train_rows)} train prompts ({a.per_task}/task max)")

    t = time.perf_counter()
    seqs = stage_collect(engine, train_rows, work, a.max_tokens, a.gen_batch,
                         chunk=a.gen_batch, budget_s=a.collect_minutes * 60)
    times["collect_s"] = round(time.perf_counter() - t, 1)
    for s in seqs:  # every position j < n needs the next token
        n = min(s["hidden"].shape[0], len(s["tokens"]) - 1)
        s["hidden"], s["tokens"] = s["hidden"][:n], s["tokens"][:n + 1]
    seqs = [s for s in seqs if s["hidden"].shape[0] >= 2]
    n_reserved = 0
    if a.reserve_frac > 0:  # collected for every selected prompt; train on the rest
        from specrt.data import is_reserved

        res_keys = {tuple(engine.tokenizer.encode_prompt(r["prompt"])) for r in train_rows
                    if is_reserved(r, a.reserve_frac)}
        keep = [s for s in seqs if tuple(s["tokens"][:s["prompt_len"]].tolist()) not in res_keys]
        n_reserved = len(seqs) - len(keep)
        seqs = keep
        _log(f"reserve: {n_reserved} sequences of reserved prompts left out of training")
    n_pos = sum(s["hidden"].shape[0] for s in seqs)
    n_out = sum(len(s["tokens"]) - s["prompt_len"] for s in seqs)
    _log(f"collect: {len(seqs)} sequences, {n_pos} positions, {n_out} output tokens "
         f"({times['collect_s']} s)")
    if a.stop_after == "collect":
        return 0

    from specrt.draft.model import DraftNet
    from specrt.draft.registry import model_drafter

    t = time.perf_counter()
    vf = work / f"vocab_{a.vocab}.pt"
    if vf.is_file():
        vocab = torch.load(vf)
    else:
        vocab = stage_vocab(seqs, a.vocab, extra=sorted(engine.eos_ids))
        torch.save(vocab, vf)
    times["vocab_s"] = round(time.perf_counter() - t, 1)
    if a.stop_after == "vocab":
        return 0

    t = time.perf_counter()
    net = DraftNet.from_target(engine.model, arch=a.kind, num_layers=a.layers, vocab_ids=vocab)
    summary = stage_train(net, engine.model, seqs, epochs=a.epochs, lr=a.lr, max_len=a.max_len,
                          batch_tokens=a.batch_tokens, feat_weight=a.feat_weight, seed=a.seed,
                          time_budget_s=a.train_minutes * 60)
    times["train_s"] = round(time.perf_counter() - t, 1)
    meta = {
        "target": a.target or "default", "train": summary,
        "data": {"prompts_file": str(a.prompts or default_prompts_path().name),
                 "split": "train", "per_task": a.per_task, "sequences": len(seqs),
                 "reserve_fraction": a.reserve_frac, "reserved_left_out": n_reserved,
                 "positions": n_pos, "output_tokens": n_out, "max_tokens": a.max_tokens,
                 "tasks": sorted({s["task"] for s in seqs})},
        "stage_seconds": times,
    }
    net.save(out / f"{a.name}.safetensors", out / f"{a.name}.json", meta)
    _log(f"saved {out / (a.name + '.safetensors')} ({times['train_s']} s training)")
    if a.stop_after == "train" or a.eval_prompts <= 0:
        return 0

    t = time.perf_counter()
    ev = balanced_sample(eval_rows, a.eval_prompts, seed=a.seed + 1)
    drafter = model_drafter(out / f"{a.name}.json", engine.model, runtime={"mode": "chain"})
    res = stage_eval(engine, drafter, ev, a.eval_tokens, max_draft=5)
    times["eval_s"] = round(time.perf_counter() - t, 1)
    _log(f"eval (chain, K=5, {len(ev)} eval prompts): {res}")
    cfg = json.loads((out / f"{a.name}.json").read_text())
    cfg["measured"] = {"eval_chain_k5": res}
    cfg["stage_seconds"] = times
    (out / f"{a.name}.json").write_text(json.dumps(cfg, indent=1))
    _log(f"stage times: {times}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
