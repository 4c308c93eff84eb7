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
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F



def _log(msg: str) -> None:
    print(f"[train] {msg}", flush=True)


def parse_samples(spec: str) -> dict[str, int]:
    """``"chat=3,code=3"`` -> ``{"chat": 3, "code": 3}`` (extra sampled outputs per
    prompt of each task; tasks not named get none). ``ValueError`` naming the bad part."""
    out: dict[str, int] = {}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        task, eq, n = part.partition("=")
        if not eq or not task or not n.strip().isdigit():
            raise ValueError(f"--samples: {part!r} is not TASK=N (e.g. chat=3)")
        out[task.strip()] = int(n)
    return out


def stage_collect(engine, rows: list[dict], work: Path, *, max_tokens: int, batch: int,
                  samples: dict[str, int], temperature: float,
                  budget_s: float = float("inf")) -> list[dict]:
    """The target's outputs for ``rows`` through the shared collector
    (:func:`specrt.draft.corpus.collect`, shards under ``work/corpus``; resumable): each
    row's greedy output, plus ``samples[task]`` seeded samples at ``temperature``.
    Returns the collected records (:data:`specrt.draft.corpus.RECORD_FIELDS`) of ``rows``."""
    from specrt.draft import corpus

    ctx = engine.model.args.max_position_embeddings
    items = corpus.plan(rows, engine.tokenizer.encode_prompt, samples=samples,
                        temperature=temperature, max_prompt_tokens=ctx - max_tokens - 1)
    rep = corpus.collect(engine, items, work / "corpus", max_tokens=max_tokens, batch=batch,
                         budget_s=budget_s)
    _log(f"collect: {rep}")
    want = {it.key for it in items}
    return [r for r in corpus.read_shards(work / "corpus") if (r["id"], r["sample"]) in want]


def sequences(model, recs: list[dict], progress: bool = True,
              taps: tuple[int, ...] = ()) -> list[dict]:
    """Distillation sequences ``{tokens [n+1], hidden [n, H] fp16, prompt_len, task, id}``
    of collected records: the target's pre-norm last-layer states recomputed by one
    teacher-forced prefill of prompt + output (cheap next to generating). With ``taps``
    (ascending, ending at the last layer; eagle3's ``feature_layers`` + last) also
    ``feats`` ``[n, k, H]`` fp16, of which ``hidden`` is the last column (a view)."""
    from specrt.align.features import target_hidden

    last = model.args.num_hidden_layers - 1
    if taps and taps[-1] != last:
        taps = tuple(sorted(set(taps) | {last}))
    ctx_len = model.args.max_position_embeddings
    toks = [(r["prompt_ids"] + r["output_ids"])[:ctx_len + 1] for r in recs]
    keep = [i for i, t in enumerate(toks) if len(t) >= 2]
    hs = target_hidden(model, [toks[i][:-1] for i in keep], progress=progress, taps=taps,
                       reduce=lambda h, i: h.to(torch.float16).cpu().clone())
    out = []
    for i, h in zip(keep, hs):
        s = {"tokens": torch.tensor(toks[i]), "id": recs[i]["id"],
             "prompt_len": len(recs[i]["prompt_ids"]), "task": recs[i]["task"]}
        if taps:
            s.update(feats=h, hidden=h[:, -1], taps=taps)
        else:
            s["hidden"] = h
        out.append(s)
    return out


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


def _assemble(g: list, hidden_size: int, feature_layers: tuple[int, ...] = ()):
    """One batch of windows ``(seq, start, end)``: ``toks [B, L+1]``, target states
    ``hid [B, L, H]`` (fp32), previous-position states ``prev [B, L, H]`` -- with
    ``feature_layers`` (eagle3) the previous position's tapped states
    ``[B, L, k, H]`` instead -- valid ``mask [B, L]``, window-local ``pos [B, L]`` and
    ``out [B, L]`` (position j predicts an OUTPUT token: j + 1 >= prompt_len)."""
    B, L = len(g), max(e - s for _, s, e in g)
    toks = torch.zeros(B, L + 1, dtype=torch.long)
    hid = torch.zeros(B, L, hidden_size)
    mask = torch.zeros(B, L, dtype=torch.bool)
    out = torch.zeros(B, L, dtype=torch.bool)
    k = len(feature_layers)
    prev = torch.zeros(B, L, k, hidden_size) if k else torch.zeros(B, L, hidden_size)
    for i, (s, a, e) in enumerate(g):
        n = e - a
        toks[i, :n + 1] = s["tokens"][a:e + 1]
        hid[i, :n] = s["hidden"][a:e].float()
        src = s["hidden"]
        if k:
            if "feats" not in s:
                raise ValueError("eagle3 training needs sequences with tapped states "
                                 "(sequences(..., taps=net.feature_layers))")
            src = s["feats"][:, [s["taps"].index(x) for x in feature_layers]]
        if a > 0:
            prev[i, 0] = src[a - 1].float()
        prev[i, 1:n] = src[a:e - 1].float()
        mask[i, :n] = True
        j = torch.arange(a, e)
        out[i, :n] = j + 1 >= s["prompt_len"]
    return toks, hid, prev, mask, torch.arange(L).expand(B, L), out


def _net_forward(net, toks, pos, prev, steps: int = 1) -> list[torch.Tensor]:
    """The drafter's pre-norm output states, one ``[B, L, H]`` per unrolled step (eagle3:
    training-time test; other architectures: one teacher-forced step)."""
    if net.arch == "eagle3":
        return net.ttt_forward(toks, pos, prev, steps)
    return [net.train_forward(toks, pos, prev if net.arch == "eagle" else None)]


@torch.no_grad()
def teacher_forced_accuracy(net, target, seqs: list[dict], max_len: int = 256,
                            batch_tokens: int = 4096, steps: int = 1) -> dict:
    """Draft accuracy of ``net`` on ``seqs`` (as for :func:`stage_train`), teacher
    forced: at each position whose next token is a target OUTPUT token, does the
    drafter's argmax equal the target's (``top1``), is the target's token among the
    drafter's top 3 (``top3``)? For eagle3 with ``steps`` > 1 also ``top1_by_depth``
    (depth ``s + 1``: the head unrolled ``s`` times on its own states, the tokens
    teacher-forced) and ``chain_accepted`` (mean tokens a greedy chain of ``steps``
    drafts emits per step, bonus included: 1 + the run of correct depths).
    Returns ``{"top1", "top3", "positions", ...}``."""
    was = net.training
    net.eval()
    steps = steps if net.arch == "eagle3" else 1
    hits1 = hits3 = n = 0
    depth_hits = [0] * steps
    depth_n = [0] * steps
    chain_sum = chain_n = 0
    fl = net.feature_layers if net.arch == "eagle3" else ()
    for g in _batches(seqs, max_len, batch_tokens, random.Random(0)):
        toks, hid, prev, mask, pos, out = _assemble(g, target.args.hidden_size, fl)
        L = pos.shape[1]
        sel = mask & out
        if not sel.any():
            continue
        ys = _net_forward(net, toks[:, :L], pos, prev, steps)
        want = toks[:, 1:L + 1]
        ok = []
        for s_, y in enumerate(ys):
            am = net.vocab_ids[net.logits(y).argmax(-1)]          # [B, L]
            okk = am == want
            ok.append(okk)
            v = sel.clone()
            v[:, :s_] = False
            depth_hits[s_] += int((okk & v).sum())
            depth_n[s_] += int(v.sum())
        dl = net.logits(ys[0])[sel]
        top = net.vocab_ids[dl.topk(min(3, dl.shape[-1]), -1).indices]
        w = want[sel]
        hits1 += int((top[:, 0] == w).sum())
        hits3 += int((top == w[:, None]).any(-1).sum())
        n += int(sel.sum())
        if steps > 1:  # chains starting at j: depth s is judged at position j + s
            run = torch.ones_like(sel, dtype=torch.long)
            alive = torch.ones_like(sel)
            start_ok = sel.clone()
            start_ok[:, L - steps + 1:] = False   # the whole chain inside the window
            for s_ in range(steps):
                okj = torch.zeros_like(sel)
                okj[:, :L - s_] = ok[s_][:, s_:] & mask[:, s_:]
                alive = alive & okj
                run = run + alive.long()
            chain_sum += int(run[start_ok].sum())
            chain_n += int(start_ok.sum())
    net.train(was)
    res = {"top1": hits1 / n if n else 0.0, "top3": hits3 / n if n else 0.0, "positions": n}
    if steps > 1:
        res["top1_by_depth"] = [h / max(c, 1) for h, c in zip(depth_hits, depth_n)]
        res["chain_accepted"] = chain_sum / max(chain_n, 1)
    return res


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _trainable_state(net) -> dict[str, torch.Tensor]:
    """The tensors training changes (the net's own parameters and LoRA factors)."""
    sd = {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}
    for key, ad in net.lora.items():
        for x in ("A", "B"):
            if ad[x].requires_grad:
                sd[f"lora.{key}.{x}"] = ad[x].detach().clone()
    return sd


def _load_trainable(net, sd: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        params = dict(net.named_parameters())
        for k, v in sd.items():
            if k.startswith("lora."):
                key, x = k[len("lora."):].rsplit(".", 1)
                net.lora[key][x].copy_(v)
            else:
                params[k].copy_(v)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def stage_train(drafter_net, target, seqs: list[dict], *, epochs: float, lr: float,
                max_len: int, batch_tokens: int, feat_weight: float, seed: int,
                time_budget_s: float, ttt_steps: int = 1, ttt_decay: float = 0.8,
                held: list[dict] | None = None, eval_every: int = 0, patience: int = 3,
                checkpoint: Path | None = None, checkpoint_every_s: float = 120.0,
                max_batches: int | None = None, bf16: bool = False) -> dict:
    """Distil ``drafter_net`` (a :class:`specrt.draft.model.DraftNet`) on ``seqs``.

    Loss per position j (predicting token j+1): KL(target || drafter) over the reduced
    vocabulary; for eagle nets plus ``feat_weight`` x smooth-L1 of the drafter's output
    state against the target's hidden state at j. eagle3 nets are unrolled
    ``ttt_steps`` times (training-time test, :meth:`Eagle3Net.ttt_forward`); step ``s``
    is weighted ``ttt_decay ** s``.

    ``held``: held-out sequences, evaluated (teacher-forced top-1) every ``eval_every``
    batches (default: 4 times an epoch); the best state is kept and training stops
    after ``patience`` evaluations without a gain (early stopping). ``checkpoint``: a
    file written atomically every ``checkpoint_every_s`` seconds (state, optimiser,
    step, best); a rerun with the same file resumes from it. ``max_batches`` stops this
    call after that many batches (as an interruption would; tests). ``bf16``: the
    drafter's forward and backward under bfloat16 autocast (weights, optimiser and the
    target's distribution stay fp32; 2.4x faster on CPUs with AVX512-BF16, see
    :func:`cpu_has_bf16`). Returns a summary.
    """
    from tqdm import tqdm

    from specrt.draft.model import feature_norm
    from specrt.model.llama import rms_norm

    torch.manual_seed(seed)
    net = drafter_net
    params = [p for p in net.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    per_epoch = len(_batches(seqs, max_len, batch_tokens, random.Random(seed)))
    total = max(1, int(per_epoch * epochs))
    warm = max(1, total // 20)
    eval_every = eval_every or max(1, per_epoch // 4)
    fl = net.feature_layers if net.arch == "eagle3" else ()
    steps_ttt = ttt_steps if net.arch == "eagle3" else 1
    head_sub = net.head_sub.detach()
    norm_w, eps = target.norm.detach(), target.args.rms_norm_eps
    step, spent, ema = 0, 0.0, None
    best = {"top1": -1.0, "step": 0, "state": None, "evals": []}
    if checkpoint is not None and Path(checkpoint).is_file():
        try:
            ck = torch.load(checkpoint, weights_only=False)
            _load_trainable(net, ck["state"])
            opt.load_state_dict(ck["opt"])
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{checkpoint}: unreadable training checkpoint ({e}); delete "
                             f"it to train from the start") from None
        step, spent, ema, best = ck["step"], ck["spent"], ck["ema"], ck["best"]
        _log(f"resuming from {checkpoint} at batch {step}/{total}")

    def set_lr(frac: float) -> None:  # warm-up, then cosine to 10% over steps or time
        f = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g_ in opt.param_groups:
            g_["lr"] = lr * f

    def evaluate() -> bool:
        """Held-out top-1; True when training should stop (no gain for ``patience``)."""
        r = teacher_forced_accuracy(net, target, held, max_len, batch_tokens)
        best["evals"].append((step, round(r["top1"], 4)))
        if r["top1"] > best["top1"]:
            best.update(top1=r["top1"], step=step, state=_trainable_state(net))
        stale = sum(1 for st, _ in best["evals"] if st > best["step"])
        _log(f"held-out top-1 {r['top1']:.4f} at batch {step} (best {best['top1']:.4f})")
        return stale >= patience

    t0 = time.perf_counter() - spent
    step0 = step
    t_ck = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=f"train {net.arch}", unit="batch",
               mininterval=2.0)
    net.train()
    stop = False
    while step < total and not stop:
        epoch, skip = divmod(step, per_epoch)
        groups = _batches(seqs, max_len, batch_tokens, random.Random(seed * 7919 + epoch))
        for g in groups[skip:]:
            frac = max(step / total, (time.perf_counter() - t0) / time_budget_s)
            if frac >= 1.0:
                stop = True
                break
            set_lr(frac)
            toks, hid, prev, mask, pos, _ = _assemble(g, target.args.hidden_size, fl)
            L = pos.shape[1]
            with torch.no_grad():
                tp_all = F.log_softmax(F.linear(rms_norm(hid, norm_w, eps), head_sub), -1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                ys = _net_forward(net, toks[:, :L], pos, prev, steps_ttt)
                loss, kls = 0.0, []
                wsum = sum(ttt_decay ** s_ for s_ in range(len(ys)))
                for s_, y in enumerate(ys):
                    m = mask.clone()
                    m[:, :s_] = False  # depth s + 1 needs s earlier positions in the window
                    tp = tp_all[m]
                    dp = F.log_softmax(net.logits(y)[m].float(), -1)
                    kl = (tp.exp() * (tp - dp)).sum(-1).mean()
                    kls.append(kl)
                    loss = loss + (ttt_decay ** s_ / wsum) * kl
            ys = [y.float() for y in ys]
            x = ys[0]
            feat = torch.zeros(())
            if net.arch == "eagle" and feat_weight > 0:
                feat = F.smooth_l1_loss(feature_norm(x[mask]), feature_norm(hid[mask]))
                loss = loss + feat_weight * feat
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if max_batches is not None and step - step0 >= max_batches:
                stop = True
            with torch.no_grad():
                acc = (net.logits(x[mask]).argmax(-1) == tp_all[mask].argmax(-1)).float().mean().item()
            cur = (kls[0].item(), kls[-1].item(), feat.item(), acc)
            ema = cur if ema is None else tuple(0.95 * a + 0.05 * b for a, b in zip(ema, cur))
            bar.set_postfix(kl=f"{ema[0]:.3f}", kl_last=f"{ema[1]:.3f}", top1=f"{ema[3]:.3f}")
            bar.update(1)
            if held and step % eval_every == 0 and evaluate():
                _log(f"early stop: no held-out gain in {patience} evaluations")
                stop = True
            if checkpoint is not None and (stop or step >= total or
                                           time.perf_counter() - t_ck > checkpoint_every_s):
                _save_atomic({"state": _trainable_state(net), "opt": opt.state_dict(),
                              "step": step, "spent": time.perf_counter() - t0, "ema": ema,
                              "best": best}, Path(checkpoint))
                t_ck = time.perf_counter()
            if stop:
                break
        if time.perf_counter() - t0 > time_budget_s:
            _log(f"time budget reached after {step} batches")
            break
    bar.close()
    if held and (not best["evals"] or best["evals"][-1][0] != step):
        evaluate()
    if best["state"] is not None:
        _load_trainable(net, best["state"])
    net.eval()
    return {"steps": step, "planned_steps": total, "final_kl": ema[0] if ema else None,
            "final_kl_deepest": ema[1] if ema else None, "ttt_steps": steps_ttt,
            "final_top1_match": ema[3] if ema else None,
            "heldout_best_top1": best["top1"] if held else None,
            "best_step": best["step"] if held else None,
            "heldout_evals": best["evals"] if held else None,
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


def _held_out(rid: str, fraction: float) -> bool:
    """Fixed membership of a train prompt in the early-stopping split (hash of its id)."""
    import hashlib

    h = int.from_bytes(hashlib.sha256(f"early-stop:{rid}".encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``python -m specrt.draft.train --help``)."""
    from specrt.data import (balanced_sample, default_prompts_path, interleave_tasks,
                             load_prompts, shorten_prompt, split)

    ap = argparse.ArgumentParser(prog="python -m specrt.draft.train",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (NAME.safetensors/json)")
    ap.add_argument("--name", default="baseline", help="file stem of the drafter")
    ap.add_argument("--target", default=None, help="target model (default: the default model)")
    ap.add_argument("--prompts", default=None, help="prompt JSONL (default ../shared/data/prompts.jsonl)")
    ap.add_argument("--work", default=None, help="cache dir for stages (default ~/.cache/specrt/draft_train)")
    ap.add_argument("--per-task", type=int, default=24, help="train prompts per task")
    ap.add_argument("--max-tokens", type=int, default=64, help="target output tokens per prompt")
    ap.add_argument("--gen-batch", type=int, default=32, help="requests decoded together (collect)")
    ap.add_argument("--samples", default="", help="extra sampled outputs per prompt, per task: "
                    "TASK=N,... (e.g. chat=3,code=3); default: greedy only")
    ap.add_argument("--sample-temperature", type=float, default=0.8,
                    help="temperature of the extra samples (top-p 0.95)")
    ap.add_argument("--max-prompt-chars", type=int, default=1500,
                    help="longer train prompts keep their first 2/3 and last 1/3 of this")
    ap.add_argument("--collect-minutes", type=float, default=20.0,
                    help="start no new generation after this long (rerun to resume)")
    ap.add_argument("--eval-collect", type=int, default=0,
                    help="EVAL-split prompts per task whose greedy outputs are collected "
                         "(work/corpus_eval) to measure the drafter on, never to train")
    ap.add_argument("--kind", choices=["lm", "eagle", "eagle3"], default="eagle",
                    help="drafter architecture")
    ap.add_argument("--layers", type=int, default=1, help="drafter decoder layers")
    ap.add_argument("--vocab", type=int, default=4096, help="reduced output vocabulary size")
    ap.add_argument("--ttt-steps", type=int, default=4,
                    help="eagle3: training-time-test steps (draft depths trained)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="train under bfloat16 autocast (default: when the CPU has "
                         "AVX512-BF16/AMX)")
    ap.add_argument("--epochs", type=float, default=24.0)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--max-len", type=int, default=256, help="training window (positions)")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="positions per batch")
    ap.add_argument("--feat-weight", type=float, default=0.1,
                    help="eagle: weight of the hidden-state regression loss")
    ap.add_argument("--train-minutes", type=float, default=13.0, help="training time cap")
    ap.add_argument("--held-frac", type=float, default=0.05,
                    help="share of train prompts held out for early stopping")
    ap.add_argument("--patience", type=int, default=3,
                    help="early stopping: evaluations without held-out gain")
    ap.add_argument("--eval-prompts", type=int, default=1,
                    help="eval prompts per task for the engine acceptance check (0: skip)")
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
    from specrt.draft import corpus

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path.home() / ".cache" / "specrt" / "draft_train"
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t = time.perf_counter()
    engine = specrt.Engine.from_pretrained(a.target, device="cpu", max_batch=a.gen_batch,
                                           drafters=[], cache_tokens=max(32768, a.gen_batch * 1024))
    times["load_target_s"] = round(time.perf_counter() - t, 1)
    rows = load_prompts(a.prompts or default_prompts_path())
    train_rows, eval_rows = split(rows)
    train_rows = interleave_tasks(balanced_sample(train_rows, a.per_task, seed=a.seed))
    # long documents: keep head and tail (batched prefill pads)
    train_rows = [dict(r, prompt=shorten_prompt(r["prompt"], a.max_prompt_chars))
                  for r in train_rows]
    _log(f"{len(train_rows)} train prompts ({a.per_task}/task max)")

    t = time.perf_counter()
    recs = stage_collect(engine, train_rows, work, max_tokens=a.max_tokens, batch=a.gen_batch,
                         samples=parse_samples(a.samples), temperature=a.sample_temperature,
                         budget_s=a.collect_minutes * 60)
    ev_recs = []
    if a.eval_collect > 0:  # measurement only: never trained on
        ev_rows = [dict(r, prompt=shorten_prompt(r["prompt"], a.max_prompt_chars))
                   for r in interleave_tasks(balanced_sample(eval_rows, a.eval_collect,
                                                             seed=a.seed + 1))]
        items = corpus.plan(ev_rows, engine.tokenizer.encode_prompt,
                            max_prompt_tokens=engine.model.args.max_position_embeddings
                            - a.max_tokens - 1)
        _log(f"eval collect: {corpus.collect(engine, items, work / 'corpus_eval', max_tokens=a.max_tokens, batch=a.gen_batch)}")
        keys = {it.key for it in items}
        ev_recs = [r for r in corpus.read_shards(work / "corpus_eval")
                   if (r["id"], r["sample"]) in keys]
    times["collect_s"] = round(time.perf_counter() - t, 1)
    if a.stop_after == "collect":
        return 0
    n_reserved = 0
    if a.reserve_frac > 0:  # collected for every selected prompt; train on the rest
        from specrt.data import is_reserved

        res = {str(r["id"]) for r in train_rows if is_reserved(r, a.reserve_frac)}
        n_reserved = sum(r["id"] in res for r in recs)
        recs = [r for r in recs if r["id"] not in res]
        _log(f"reserve: {n_reserved} records of reserved prompts left out of training")
    held_recs = [r for r in recs if _held_out(r["id"], a.held_frac)]
    recs = [r for r in recs if not _held_out(r["id"], a.held_frac)]

    from specrt.draft.eagle3 import default_feature_layers
    from specrt.draft.model import DraftNet
    from specrt.draft.registry import model_drafter

    taps = default_feature_layers(engine.model.args.num_hidden_layers) \
        if a.kind == "eagle3" else ()
    t = time.perf_counter()
    seqs = sequences(engine.model, recs, taps=taps)
    held = sequences(engine.model, held_recs, taps=taps) if held_recs else None
    times["features_s"] = round(time.perf_counter() - t, 1)
    n_pos = sum(s["hidden"].shape[0] for s in seqs)
    n_out = sum(len(s["tokens"]) - s["prompt_len"] for s in seqs)
    by_task: dict[str, int] = {}
    for s_ in seqs:
        by_task[s_["task"]] = by_task.get(s_["task"], 0) + len(s_["tokens"]) - s_["prompt_len"]
    _log(f"data: {len(seqs)} sequences, {n_pos} target-labelled positions, {n_out} output "
         f"tokens {by_task}; {len(held or [])} held out for early stopping")

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
                          time_budget_s=a.train_minutes * 60, ttt_steps=a.ttt_steps,
                          held=held, patience=a.patience,
                          checkpoint=work / f"train_{a.name}_{a.kind}.ckpt",
                          bf16=cpu_has_bf16() if a.bf16 is None else a.bf16)
    times["train_s"] = round(time.perf_counter() - t, 1)
    cover = _coverage(vocab, seqs)
    meta = {
        "target": a.target or "default", "train": summary,
        "data": {"prompts_file": str(a.prompts or default_prompts_path().name),
                 "split": "train", "per_task": a.per_task, "sequences": len(seqs),
                 "samples": a.samples, "sample_temperature": a.sample_temperature,
                 "reserve_fraction": a.reserve_frac, "reserved_left_out": n_reserved,
                 "held_out_fraction": a.held_frac,
                 "positions": n_pos, "output_tokens": n_out, "output_tokens_by_task": by_task,
                 "max_tokens": a.max_tokens, "vocab_coverage_of_outputs": round(cover, 4),
                 "tasks": sorted({s["task"] for s in seqs})},
        "stage_seconds": times,
    }
    if ev_recs:
        ev = sequences(engine.model, ev_recs, taps=taps)
        meta["eval_split"] = _eval_by_task(net, engine.model, ev, a.ttt_steps)
        _log(f"eval split (teacher forced): {meta['eval_split']['all']}")
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


def _coverage(vocab: torch.Tensor, seqs: list[dict]) -> float:
    """Share of the target's output tokens in ``seqs`` that the reduced vocabulary holds."""
    ids = set(vocab.tolist())
    tot = hit = 0
    for s in seqs:
        out = s["tokens"][s["prompt_len"]:].tolist()
        tot += len(out)
        hit += sum(x in ids for x in out)
    return hit / max(tot, 1)


def _eval_by_task(net, target, seqs: list[dict], steps: int) -> dict:
    """:func:`teacher_forced_accuracy` over ``seqs``, overall (``"all"``) and per task."""
    res = {"all": teacher_forced_accuracy(net, target, seqs, steps=steps)}
    for task in sorted({s["task"] for s in seqs}):
        res[task] = teacher_forced_accuracy(net, target, [s for s in seqs if s["task"] == task],
                                            steps=steps)
    return res


if __name__ == "__main__":
    raise SystemExit(main())
