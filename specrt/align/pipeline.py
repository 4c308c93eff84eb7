"""``specrt align``: build a task-aware heterogeneous drafter pool for a target.

Stages (outputs under ``OUT/work``; a stage whose output exists with the same
parameters is skipped on a rerun, and redoing a stage redoes the ones after it):

a. ``collect``  -- target outputs (greedy, through the engine with its default drafter,
   batched) for a task-balanced subsample of the TRAIN split; appended to
   ``collect.jsonl`` chunk by chunk, so an interrupted run resumes where it stopped.
b. ``features`` -- router features of every collected prompt (mean final-normed target
   state over the chat-templated prompt, as the engine computes online):
   ``features.safetensors``.
c. ``partition``-- k-means on the features (K given, or chosen by silhouette); purity and
   adjusted Rand index against the ``task`` labels are reported, never used;
   per cluster a held-back part of the TRAIN prompts is set aside for stages d/e/f,
   preferring prompts the baseline drafter was not trained on (its config's
   ``data.reserve_fraction``, :func:`specrt.data.is_reserved`):
   ``partition.json`` + ``partition.safetensors``.
d. ``align``    -- per cluster, a model drafter distilled on that cluster's target outputs
   (``specrt.draft.train.stage_train``: KL to the target's distribution): LoRA adapters
   on the baseline drafter (a few hundred KB; ``--align-lora 0``: full tuning), or the
   target's first layers when there is no baseline; teacher-forced draft accuracy on the
   cluster's held-back prompts before/after: ``align/aligned_<c>.*``, ``summary.json``.
   Pluggable (:data:`ALIGNERS`); ``--align none`` skips it.
e. ``assign``   -- per cluster, goodput (emitted tokens per wall second at batch 1) of
   each candidate drafter (aligned, baseline, n-gram, token recycling, and fusions of
   n-gram with the aligned drafter or the baseline) on the cluster's held-back prompts,
   and its mean accepted length at a fixed draft budget; the best goodput and the
   candidates not measurably slower tie, and the longest accepted length among them is
   assigned (:func:`pick_drafter`): ``assign.json``.
f. ``route``    -- the MLP routing head trained on (features, cluster) of the non-held
   prompts; accuracy on the held-back prompts and latency relative to a prefill:
   ``route.json`` + ``router.safetensors``.
g. ``write``    -- the pool directory ``OUT`` (``pool.json``, router, centroids, drafters).

The evaluation split of the prompt file (:func:`specrt.data.split`) is never read.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specrt.data import shorten_prompt

STAGES = ("collect", "features", "partition", "align", "assign", "route", "write")


@dataclass
class AlignConfig:
    """Options of :func:`run_align` (the CLI flags of ``specrt align``)."""

    prompts: str
    out: str
    target: str | None = None
    work: str | None = None               # default OUT/work
    clusters: str | int = "auto"          # K or "auto"
    k_min: int = 2
    k_max: int = 10
    metric: str = "cosine"
    per_task: int = 24                    # train prompts per task
    max_tokens: int = 48                  # target output tokens per prompt (collect)
    max_prompt_chars: int = 1500          # longer prompts: head 2/3 + tail 1/3 for collect
    gen_batch: int = 16
    device: str | None = None
    seed: int = 0
    budget_minutes: float | None = None   # total; splits into collect/align if those unset
    collect_minutes: float | None = None
    align_minutes: float | None = None    # total over clusters
    aligner: str = "distill"              # key of ALIGNERS, or "none"
    baseline: str | None = None           # baseline drafter config (.json); default: shipped
    align_kind: str = "eagle"             # when no baseline: DraftNet kind
    align_layers: int = 1
    align_vocab: int = 4096
    align_epochs: float = 30.0
    align_lr: float | None = None         # default 3e-3 with LoRA, 3e-4 full tuning
    align_lora: int = 16                  # LoRA rank on the baseline; 0 = full tuning
    hold_frac: float = 0.25               # held-back share of each cluster's train prompts
    assign_prompts: int = 4               # held-back prompts per cluster at most
    assign_tokens: int = 48
    assign_metric: str = "goodput"        # or "mean_accepted_length"
    assign_margin: float = 0.02           # relative: closer candidates tie (see pick_drafter)
    assign_budget: int | None = 3         # fixed draft length of the quality tie-break
    candidates: tuple = ("aligned", "baseline", "ngram", "recycling", "ngram+aligned",
                         "ngram+baseline", "ngram2+aligned+ngram", "ngram2+baseline+ngram")
    router_hidden: int = 128
    router_threshold: float = 0.5
    router_epochs: int = 300
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"[align] {msg}", flush=True)


class _Manifest:
    """``work/manifest.json``: per stage, the parameters it ran with and its seconds."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def done(self, stage: str, params: dict) -> bool:
        e = self.data.get(stage)
        return bool(e and e.get("done") and e.get("params") == _jsonable(params))

    def mark(self, stage: str, params: dict, seconds: float, **info) -> None:
        self.data[stage] = {"done": True, "params": _jsonable(params),
                            "seconds": round(seconds, 2), **info}
        self.save()

    def invalidate_after(self, stage: str) -> None:
        for s in STAGES[STAGES.index(stage) + 1:]:
            self.data.pop(s, None)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _hash_order(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def _fit_context(ids: list[int], limit: int) -> list[int]:
    """Head 2/3 + tail 1/3 of a token list longer than ``limit``."""
    if len(ids) <= limit:
        return ids
    h = limit * 2 // 3
    return ids[:h] + ids[len(ids) - (limit - h):]


# ------------------------------------------------------------------------ aligners
def _align_distill(ctx: "_Ctx", cluster: int, seqs: list[dict], out_stem: Path,
                   time_budget_s: float, held: list[dict] | None = None) -> dict | None:
    """Distil a model drafter on one cluster's sequences with
    :func:`specrt.draft.train.stage_train` -- LoRA adapters on the baseline drafter
    (``align_lora`` > 0 and a baseline exists) or full tuning of its layers; writes
    ``out_stem.{json,safetensors}``. With ``held`` (the cluster's held-back sequences)
    the teacher-forced draft accuracy before and after is measured on them. Returns a
    summary dict, or None when the drafter machinery is unavailable."""
    try:
        from specrt.draft.model import DraftNet
        from specrt.draft.train import stage_train, stage_vocab, teacher_forced_accuracy
    except ImportError as e:  # the model drafter is optional machinery
        _log(f"align: model drafter / distillation not available ({e}); skipping")
        return None
    cfg = ctx.cfg
    model = ctx.model
    if ctx.baseline_cfg is not None:
        net = DraftNet.load(ctx.baseline_cfg, model)
        init = f"baseline {ctx.baseline_cfg.name}"
    else:
        vf = ctx.work / "align" / "vocab.pt"
        if vf.is_file():
            vocab = torch.load(vf)
        else:
            n = min(cfg.align_vocab, model.args.vocab_size)
            vocab = stage_vocab(ctx.all_train_seqs(), n, extra=sorted(ctx.eos_ids))
            torch.save(vocab, vf)
        net = DraftNet.from_target(model, kind=cfg.align_kind, num_layers=cfg.align_layers,
                                   vocab_ids=vocab)
        init = f"target layers 0..{cfg.align_layers - 1}"
    lora = cfg.align_lora if ctx.baseline_cfg is not None else 0
    if lora > 0:  # adapters on the baseline: kilobytes per cluster, base shared
        net.add_lora(lora, targets=("qkv", "o", "gate_up", "down"), seed=cfg.seed)
        net.train_lora_only()
        init += f" + LoRA r{lora}"
    lr = cfg.align_lr if cfg.align_lr is not None else (3e-3 if lora > 0 else 3e-4)
    before = teacher_forced_accuracy(net, model, held) if held else None
    summary = stage_train(net, model, seqs, epochs=cfg.align_epochs, lr=lr,
                          max_len=256, batch_tokens=4096,
                          feat_weight=0.1 if net.kind == "eagle" else 0.0, seed=cfg.seed,
                          time_budget_s=time_budget_s)
    if held:
        after = teacher_forced_accuracy(net, model, held)
        summary["heldout"] = {"positions": after["positions"],
                              "baseline_top1": before["top1"], "aligned_top1": after["top1"],
                              "baseline_top3": before["top3"], "aligned_top3": after["top3"]}
        _log(f"align: cluster {cluster}: held-back draft accuracy (teacher forced, top-1) "
             f"{before['top1']:.3f} -> {after['top1']:.3f} over {after['positions']} positions")
    meta = {"runtime": ctx.baseline_runtime, "aligned": {
        "cluster": cluster, "init": init, "sequences": len(seqs), "train": summary}}
    net.save(out_stem.with_suffix(".safetensors"), out_stem.with_suffix(".json"), meta,
             base=ctx.baseline_cfg if lora > 0 else None)
    return {"init": init, "sequences": len(seqs), **summary}


ALIGNERS = {"distill": _align_distill}
"""Per-cluster aligners: ``f(ctx, cluster, seqs, out_stem, time_budget_s, held) ->
summary | None`` writing a model drafter (``DraftNet.save`` format) to
``out_stem.{json,safetensors}``; ``held`` are the cluster's held-back sequences."""


def _baseline_path(cfg: AlignConfig) -> Path | None:
    """The baseline drafter config: ``--baseline``, else the shipped one for the default
    target, else None."""
    b = cfg.baseline
    if b is None and cfg.target is None:
        shipped = Path(__file__).resolve().parents[1] / "pools" / "default" / "baseline.json"
        b = str(shipped) if shipped.is_file() else None
    if b is None:
        return None
    p = Path(b)
    if not p.is_file():
        raise FileNotFoundError(f"baseline drafter config not found: {b}")
    return p


def _baseline_reserve(cfg: AlignConfig) -> float:
    """Share of train prompts the baseline drafter was NOT trained on
    (:func:`specrt.data.is_reserved`), from its config; 0.0 when unknown."""
    p = _baseline_path(cfg)
    if p is None:
        return 0.0
    return float(json.loads(p.read_text()).get("data", {}).get("reserve_fraction", 0.0))


# ---------------------------------------------------------------------------- context
class _Ctx:
    """Shared state of one run: config, paths, target, engine, loaded stage outputs."""

    def __init__(self, cfg: AlignConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.work = Path(cfg.work) if cfg.work else self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.manifest = _Manifest(self.work / "manifest.json")
        self._engine = None
        self._seqs = None
        self.baseline_cfg: Path | None = None
        self.baseline_runtime: dict = {"mode": "chain", "max_depth": 8, "threshold": 0.2}

    # target and engine are loaded lazily: a fully cached rerun loads them for nothing
    @property
    def engine(self):
        if self._engine is None:
            from specrt.draft import default_drafters
            from specrt.engine import Engine
            from specrt.model import load_model

            model, tok = load_model(self.cfg.target, device=self.cfg.device)
            drafters = default_drafters(model, self.cfg.target)
            self._engine = Engine(model, tok, drafters=drafters, max_batch=self.cfg.gen_batch,
                                  cache_tokens=max(16384, self.cfg.gen_batch * 2048),
                                  adaptive=True)
            b = _baseline_path(self.cfg)
            if b is not None:
                self.baseline_cfg = b
                rt = json.loads(self.baseline_cfg.read_text()).get("runtime") or {}
                self.baseline_runtime.update({k: v for k, v in rt.items()
                                              if k in ("mode", "topk", "max_depth", "threshold")})
        return self._engine

    @property
    def model(self):
        return self.engine.model

    @property
    def eos_ids(self):
        return self.engine.eos_ids

    def baseline_drafter(self):
        """The baseline model drafter named ``baseline``, or None."""
        e = self.engine
        if self.baseline_cfg is None:
            return None
        from specrt.draft.model import ModelDrafter

        return ModelDrafter.load(self.baseline_cfg, e.model, name="baseline",
                                 **self.baseline_runtime)

    def read_collect(self) -> list[dict]:
        p = self.work / "collect.jsonl"
        out = []
        if p.is_file():
            for line in p.read_text().split("\n"):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by an interrupted write
                        pass
        return out

    def all_train_seqs(self) -> list[dict]:
        if self._seqs is None:
            part = json.loads((self.work / "partition.json").read_text())
            held = set(part["held"])
            ids = set(part["ids"])
            recs = [r for r in self.read_collect() if r["id"] in ids and r["id"] not in held]
            self._seqs = self.sequences(recs)
        return self._seqs

    def sequences(self, recs: list[dict]) -> list[dict]:
        """Distillation sequences ``{tokens [n+1], hidden [n, H] fp16, prompt_len, task}``
        (hidden = the target's pre-norm last-layer states, one teacher-forced prefill)."""
        from specrt.align.features import target_hidden

        model = self.model
        ctx_len = model.args.max_position_embeddings
        toks = [(r["prompt_ids"] + r["output_ids"])[:ctx_len + 1] for r in recs]
        keep = [i for i, t in enumerate(toks) if len(t) >= 2]
        hs = target_hidden(model, [toks[i][:-1] for i in keep], progress=self.cfg.progress,
                           reduce=lambda h, i: h.to(torch.float16).cpu().clone())
        return [{"tokens": torch.tensor(toks[i]), "hidden": h,
                 "prompt_len": len(recs[i]["prompt_ids"]), "task": recs[i]["task"]}
                for i, h in zip(keep, hs)]


# ---------------------------------------------------------------------------- stages
def _select_rows(cfg: AlignConfig) -> tuple[list[dict], dict[str, dict]]:
    from specrt.data import balanced_sample, interleave_tasks, load_prompts, split

    rows = load_prompts(cfg.prompts)
    train, _ = split(rows)  # the eval split is never read here
    if not train:
        raise ValueError(f"{cfg.prompts}: no prompts in the train split")
    sel = interleave_tasks(balanced_sample(train, cfg.per_task, seed=cfg.seed))
    return sel, {str(r["id"]): r for r in train}


def stage_collect(ctx: _Ctx, rows: list[dict], budget_s: float) -> dict:
    """Generate the target's greedy outputs for ``rows`` (chunks of ``gen_batch``),
    appending one JSON line per prompt to ``collect.jsonl``: ``{id, task, prompt_ids,
    output_ids, finish_reason}``. Prompts already in the file are skipped."""
    from specrt.sampling import SamplingParams

    cfg = ctx.cfg
    path = ctx.work / "collect.jsonl"
    have = {r["id"] for r in ctx.read_collect()}
    todo = [r for r in rows if str(r["id"]) not in have]
    _log(f"collect: {len(rows)} train prompts, {len(rows) - len(todo)} already collected")
    if not todo:
        return {"prompts": len(rows), "new": 0, "complete": True}
    eng = ctx.engine
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="a) collect",
                   unit="prompt")
    t0 = time.perf_counter()
    new = 0
    ctx_len = eng.model.args.max_position_embeddings
    complete = True
    for c in range(0, len(todo), cfg.gen_batch):
        if c > 0 and time.perf_counter() - t0 > budget_s:  # at least one chunk per run
            _log(f"collect: time budget reached ({len(todo) - c} prompts left; rerun to resume)")
            complete = False
            break
        part = todo[c:c + cfg.gen_batch]
        texts, ok = [], []
        for r in part:
            t = shorten_prompt(r["prompt"], cfg.max_prompt_chars)
            n = len(eng.tokenizer.encode_prompt(t))
            if n + 2 >= ctx_len:
                _log(f"collect: prompt {r['id']} too long ({n} tokens), skipped")
                continue
            texts.append(t)
            ok.append(r)
        if not ok:
            continue
        outs = eng.generate(texts, SamplingParams(max_tokens=cfg.max_tokens))
        with path.open("a") as f:
            for r, t, o in zip(ok, texts, outs):
                f.write(json.dumps({"id": str(r["id"]), "task": r["task"],
                                    "prompt_ids": eng.tokenizer.encode_prompt(t),
                                    "output_ids": o.token_ids,
                                    "finish_reason": o.finish_reason}) + "\n")
        new += len(ok)
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    return {"prompts": len(rows), "new": new, "complete": complete,
            "seconds": round(time.perf_counter() - t0, 1)}


def stage_features(ctx: _Ctx, recs: list[dict], by_id: dict[str, dict]) -> dict:
    """Router features of the collected prompts (full prompt text, as served) ->
    ``features.safetensors`` (``feats`` ``[N, hidden]`` fp32; ids in the metadata)."""
    from safetensors.torch import save_file

    from specrt.align.features import prompt_features

    eng = ctx.engine
    lim = eng.model.args.max_position_embeddings - 1
    ids = [r["id"] for r in recs]
    toks = [_fit_context(eng.tokenizer.encode_prompt(by_id[i]["prompt"]), lim) for i in ids]
    feats = prompt_features(eng.model, toks, block_size=eng.cache.block_size,
                            progress=ctx.cfg.progress)
    save_file({"feats": feats.contiguous()}, str(ctx.work / "features.safetensors"),
              metadata={"ids": json.dumps(ids), "tasks": json.dumps([r["task"] for r in recs])})
    return {"n": len(ids), "dim": int(feats.shape[1])}


def load_features(work: Path) -> tuple[torch.Tensor, list[str], list[str]]:
    """``(feats [N, H], ids, tasks)`` from ``work/features.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(work / "features.safetensors"), "pt") as f:
        meta = f.metadata()
        feats = f.get_tensor("feats")
    return feats, json.loads(meta["ids"]), json.loads(meta["tasks"])


def stage_partition(ctx: _Ctx) -> dict:
    """k-means (auto K by silhouette unless given), cluster report vs task labels,
    held-back prompts per cluster. Writes ``partition.json`` / ``partition.safetensors``."""
    from safetensors.torch import save_file

    from specrt.align.kmeans import (adjusted_rand_index, choose_k, kmeans, prepare, purity,
                                     silhouette_score)

    cfg = ctx.cfg
    X, ids, tasks = load_features(ctx.work)
    N = X.shape[0]
    if N < 2:
        raise ValueError(f"partition needs at least 2 collected prompts, have {N}")
    if str(cfg.clusters) == "auto":
        hi = min(cfg.k_max, N - 1)
        lo = min(max(2, cfg.k_min), hi)
        bar = range(lo, hi + 1)
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(bar, desc="c) partition (K)", unit="K")
        k, scores, res = choose_k(X, bar, metric=cfg.metric, seed=cfg.seed)
    else:
        k = int(cfg.clusters)
        if not 1 <= k <= N:
            raise ValueError(f"--clusters {k}: need 1 <= K <= {N} (collected prompts)")
        res = kmeans(X, k, metric=cfg.metric, seed=cfg.seed)
        scores = {k: silhouette_score(prepare(X, res.mean, res.std, cfg.metric), res.labels,
                                      cfg.metric)} if k >= 2 else {}
    labels = res.labels.tolist()
    comp = []
    held: list[str] = []
    # held-back prompts: those the baseline drafter never trained on first (its reserve),
    # so that measurements on them are not flattered by memorised outputs
    from specrt.data import is_reserved

    rf = _baseline_reserve(cfg)
    unseen = {i for i in ids if is_reserved({"id": i}, rf)}
    for c in range(k):
        mem = [i for i in range(N) if labels[i] == c]
        tc: dict[str, int] = {}
        for i in mem:
            tc[tasks[i]] = tc.get(tasks[i], 0) + 1
        order = sorted(mem, key=lambda i: (ids[i] not in unseen, _hash_order(ids[i], cfg.seed)))
        nh = 0 if len(mem) < 2 else min(cfg.assign_prompts,
                                        max(1, math.ceil(cfg.hold_frac * len(mem))))
        held += [ids[i] for i in order[:nh]]
        comp.append({"id": c, "size": len(mem),
                     "tasks": dict(sorted(tc.items(), key=lambda x: -x[1])),
                     "held_back": nh,
                     "held_back_unseen_by_baseline": sum(ids[i] in unseen for i in order[:nh])})
    rep = {"k": k, "metric": cfg.metric, "silhouette": {str(a): b for a, b in scores.items()},
           "purity": purity(labels, tasks), "ari": adjusted_rand_index(labels, tasks),
           "n": N, "clusters": comp, "ids": ids, "labels": labels, "held": held}
    save_file({"centroids": res.centroids.contiguous(), "mean": res.mean.contiguous(),
               "std": res.std.contiguous()}, str(ctx.work / "partition.safetensors"))
    (ctx.work / "partition.json").write_text(json.dumps(rep, indent=1))
    _log(f"partition: K={k} (silhouette {scores.get(k, float('nan')):.3f}), purity "
         f"{rep['purity']:.3f}, ARI {rep['ari']:.3f} vs task labels; sizes "
         f"{[c['size'] for c in comp]}")
    return {"k": k, "purity": rep["purity"], "ari": rep["ari"]}


def stage_align(ctx: _Ctx, budget_s: float) -> dict:
    """Per cluster, align a model drafter on the cluster's non-held sequences with the
    configured aligner; resumable per cluster. Writes ``align/summary.json``."""
    cfg = ctx.cfg
    (ctx.work / "align").mkdir(exist_ok=True)
    if cfg.aligner == "none":
        _log("align: skipped (--align none); candidates are the baseline and model-free drafters")
        return {"skipped": True}
    if cfg.aligner not in ALIGNERS:
        raise ValueError(f"unknown aligner {cfg.aligner!r}; have {sorted(ALIGNERS)} or 'none'")
    part = json.loads((ctx.work / "partition.json").read_text())
    held = set(part["held"])
    recs = {r["id"]: r for r in ctx.read_collect()}
    summ_p = ctx.work / "align" / "summary.json"
    summary = json.loads(summ_p.read_text()) if summ_p.is_file() else {}
    k = part["k"]
    clusters = range(k)
    if cfg.progress:
        from tqdm import tqdm

        clusters = tqdm(clusters, desc="d) align", unit="cluster")
    _ = ctx.engine  # resolves the baseline config
    for c in clusters:
        stem = ctx.work / "align" / f"aligned_{c}"
        if stem.with_suffix(".json").is_file() and str(c) in summary:
            continue
        mem = [i for i, lab in zip(part["ids"], part["labels"]) if lab == c and i not in held]
        if not mem:
            summary[str(c)] = None
            continue
        seqs = ctx.sequences([recs[i] for i in mem])
        hv = [i for i, lab in zip(part["ids"], part["labels"]) if lab == c and i in held
              and i in recs]
        s = ALIGNERS[cfg.aligner](ctx, c, seqs, stem, budget_s / k,
                                  ctx.sequences([recs[i] for i in hv]) if hv else None)
        if s is None:
            return {"skipped": True}
        summary[str(c)] = s
        summ_p.write_text(json.dumps(summary, indent=1))
    summ_p.write_text(json.dumps(summary, indent=1))
    return {"clusters": k}


def _measure(eng, rows: list[dict], names: list[str], max_tokens: int,
             fixed_budget: int | None = None) -> dict[str, dict]:
    """Greedy batch-1 generation of ``rows`` with each drafter in ``names``: goodput etc.

    Candidates are interleaved prompt by prompt (the order rotating), so a drift in the
    host's load during the measurement hits every candidate alike. The adaptive length
    rule's learned acceptance per drafter starts empty (restored afterwards): a
    candidate is measured as if deployed on this cluster alone, not with the history of
    clusters measured before (which made a drafter that fails on one task barely
    draft on the next); likewise what a drafter learns across requests (token
    recycling's matrix, via ``reset()``) starts empty in each pass, so the fixed-budget
    pass below does not replay outputs the first pass taught it. Each candidate's
    ``per_prompt`` ``[[tokens, seconds], ...]`` feeds :func:`pick_drafter`'s paired
    test.

    With ``fixed_budget`` K, every candidate also runs the rows once more with K draft
    tokens every step (adaptive rule off): its ``"fixed"`` entry ``{budget,
    mean_accepted_length, acceptance_rate}`` measures the drafter alone, apart from the
    draft lengths the adaptive rule picks on this machine (greedy: deterministic)."""
    from specrt.sampling import SamplingParams

    def run():
        for n in names:  # what persists across requests (recycling) starts empty
            getattr(eng.drafters[n], "reset", lambda: None)()
        acc_ = {n: [0, 0, 0, 0, 0.0] for n in names}  # tokens, accepted, drafted, steps, s
        per: dict[str, list] = {n: [] for n in names}  # per prompt: [tokens, seconds]
        for j, r in enumerate(rows):
            for q in range(len(names)):
                n = names[(j + q) % len(names)]
                t0 = time.perf_counter()
                o = eng.generate(r["prompt"], SamplingParams(max_tokens=max_tokens),
                                 drafter=n)[0]
                dt = time.perf_counter() - t0
                a = acc_[n]
                a[4] += dt
                s = o.stats
                a[0] += s["completion_tokens"]
                a[1] += s["accepted_tokens"]
                a[2] += s["drafted_tokens"]
                a[3] += s["steps"]
                per[n].append([s["completion_tokens"], round(dt, 5)])
        out = {}
        for n, (tok, acc, dr, steps, el) in acc_.items():
            out[n] = {"prompts": len(rows), "tokens": tok, "elapsed_s": round(el, 4),
                      "goodput_tok_s": tok / el if el > 0 else 0.0,
                      "accepted_per_s": acc / el if el > 0 else 0.0,
                      "acceptance_rate": acc / dr if dr else 0.0,
                      "mean_accepted_length": tok / steps if steps else 0.0,
                      "per_prompt": per[n]}
        return out

    with eng.lengths.scoped_rates():
        out = run()
    if fixed_budget is not None:
        with eng.lengths.scoped_rates(), eng.lengths.fixed_budget(fixed_budget):
            fx = run()
        for n in names:
            out[n]["fixed"] = {"budget": fixed_budget,
                               "mean_accepted_length": fx[n]["mean_accepted_length"],
                               "acceptance_rate": fx[n]["acceptance_rate"]}
    return out


# one-sided 95% quantiles of Student's t by degrees of freedom (df beyond the table: the
# largest tabulated df at or below it; the normal's 1.645 from 120 on)
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
        9: 1.833, 10: 1.812, 12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697, 60: 1.671,
        120: 1.645}


def _t95(df: int) -> float:
    return _T95[max(k for k in _T95 if k <= df)]


def slower_significantly(a: list | None, b: list | None) -> bool | None:
    """Whether ``a`` is slower than ``b`` by a one-sided paired t-test at the 5% level,
    over the same prompts' ``[[tokens, seconds], ...]`` (the per-prompt log goodput
    ratios are the pairs). None when it cannot tell: a record missing, fewer than two
    pairs, unequal counts, or an empty measurement."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    if any(x[0] <= 0 or x[1] <= 0 for x in a + b):
        return None
    r = [math.log((ta / sa) / (tb / sb)) for (ta, sa), (tb, sb) in zip(a, b)]
    mean, sd = statistics.fmean(r), statistics.stdev(r)
    if sd == 0.0:
        return mean < 0.0
    return mean / (sd / math.sqrt(len(r))) < -_t95(len(r) - 1)


def pick_drafter(m: dict[str, dict], key: str, margin: float) -> str:
    """The candidate to assign from measurements ``{name: {key, mean_accepted_length,
    per_prompt?, fixed?}}``: the best by ``key`` and every candidate not measurably
    worse tie, and among them the best drafter wins: the longest mean accepted length
    at the fixed budget (``fixed``, when every candidate has it), else the longest mean
    accepted length as measured; then the better ``key``, then the name.

    Not measurably worse: within ``margin`` (relative) of the best ``key``, or -- for
    goodput, given ``per_prompt`` records of the same prompts -- not slower than the
    best by a one-sided paired t-test at 5% (:func:`slower_significantly`). Wall-clock
    goodput over a few held-back prompts on a loaded host is noisy, and where it cannot
    tell candidates apart, accepted length at a fixed budget -- deterministic under
    greedy decoding, and the drafter's own quality apart from the draft lengths the
    adaptive rule picks on this machine -- decides."""
    top_name = max(sorted(m), key=lambda n: m[n][key])
    top = m[top_name][key]

    def not_worse(n: str) -> bool:
        if m[n][key] >= top * (1.0 - margin):
            return True
        if key != "goodput_tok_s":
            return False
        return slower_significantly(m[n].get("per_prompt"),
                                    m[top_name].get("per_prompt")) is False

    tied = [n for n in m if not_worse(n)]
    fixed = all("fixed" in m[n] for n in tied)

    def quality(n: str) -> float:
        return m[n]["fixed"]["mean_accepted_length"] if fixed else m[n]["mean_accepted_length"]

    return max(sorted(tied), key=lambda n: (quality(n), m[n][key]))


def candidate_drafters(tokens, have: dict) -> dict:
    """The candidates named by ``tokens`` (``--candidates``) among the drafters ``have``
    (``{token: drafter}``, e.g. ``aligned`` -> this cluster's aligned drafter): a token
    ``a+b`` is a :class:`~specrt.draft.fused.FusedDrafter` (``fill`` split) of those
    members, named after their names joined by ``+``. Tokens whose drafters are
    missing are left out. Returns ``{name: drafter}`` in token order."""
    from specrt.draft.fused import FusedDrafter

    out = {}
    for t in tokens:
        parts = t.split("+")
        if not all(p in have for p in parts):
            continue
        d = have[t] if len(parts) == 1 else FusedDrafter([have[p] for p in parts])
        out[d.name] = d
    return out


def stage_assign(ctx: _Ctx, by_id: dict[str, dict]) -> dict:
    """Per cluster, measure every candidate drafter on the cluster's held-back TRAIN
    prompts (batch 1, greedy) and assign the best by ``assign_metric``; resumable per
    cluster. Writes ``assign.json`` ``{clusters: {c: {candidates, drafter}}, default}``."""
    from specrt.draft import lookup_drafter
    from specrt.draft.model import ModelDrafter

    cfg = ctx.cfg
    part = json.loads((ctx.work / "partition.json").read_text())
    k = part["k"]
    eng = ctx.engine
    path = ctx.work / "assign.json"
    res = json.loads(path.read_text()) if path.is_file() else {"clusters": {}}
    shared = {}  # the model-free drafters the candidates name (ngram, ngram2, recycling)
    for piece in dict.fromkeys(x for t in cfg.candidates for x in t.split("+")):
        d = lookup_drafter(piece, eng.model.args.vocab_size)
        if d is not None:
            shared[piece] = d
    base = ctx.baseline_drafter() if "baseline" in cfg.candidates else None
    if base is not None:
        shared["baseline"] = base
    held = set(part["held"])
    old = eng.drafters, eng.default_drafter, eng.max_batch
    clusters = range(k)
    if cfg.progress:
        from tqdm import tqdm

        clusters = tqdm(clusters, desc="e) assign", unit="cluster")
    try:
        eng.max_batch = 1
        for c in clusters:
            if str(c) in res["clusters"]:
                continue
            mem = [i for i, lab in zip(part["ids"], part["labels"]) if lab == c]
            rows = [by_id[i] for i in mem if i in held] or [by_id[i] for i in mem][:1]
            have = dict(shared)
            al = ctx.work / "align" / f"aligned_{c}.json"
            if al.is_file() and any("aligned" in t.split("+") for t in cfg.candidates):
                have["aligned"] = ModelDrafter.load(al, eng.model, name=f"aligned_{c}",
                                                    **ctx.baseline_runtime)
            cand = candidate_drafters(cfg.candidates, have)
            if not cand:
                raise ValueError(f"no candidate drafters among {cfg.candidates}")
            eng.drafters = dict(cand)
            eng.default_drafter = next(iter(cand))
            rows = [dict(r, prompt=shorten_prompt(r["prompt"], cfg.max_prompt_chars))
                    for r in rows]
            m = _measure(eng, rows, list(cand), cfg.assign_tokens,
                         fixed_budget=cfg.assign_budget)
            key = "goodput_tok_s" if cfg.assign_metric == "goodput" else cfg.assign_metric
            best = pick_drafter(m, key, cfg.assign_margin)
            res["clusters"][str(c)] = {"candidates": m, "drafter": best,
                                       "held_back": [r["id"] for r in rows]}
            path.write_text(json.dumps(res, indent=1))
            _log(f"assign: cluster {c} -> {best} (" + ", ".join(
                f"{n} {v[key]:.2f}" for n, v in m.items()) + f" {key})")
    finally:
        eng.drafters, eng.default_drafter, eng.max_batch = old
    # default drafter: the baseline when there is one, else the best over all clusters
    if base is not None:
        default = "baseline"
    else:
        tot: dict[str, list[float]] = {}
        for v in res["clusters"].values():
            for n, x in v["candidates"].items():
                if "aligned_" not in n:  # cluster-specific drafters cannot be the default
                    a = tot.setdefault(n, [0.0, 0.0])
                    a[0] += x["tokens"]
                    a[1] += x["elapsed_s"]
        default = max(tot, key=lambda n: tot[n][0] / max(tot[n][1], 1e-9)) if tot else "ngram"
    res["default"] = default
    path.write_text(json.dumps(res, indent=1))
    return {"assigned": {c: v["drafter"] for c, v in res["clusters"].items()},
            "default": default}


def stage_route(ctx: _Ctx, by_id: dict[str, dict]) -> dict:
    """Train the MLP routing head on the non-held prompts' (features, cluster); report
    cluster and drafter accuracy on the held-back prompts and the head's latency
    relative to one prefill. Writes ``router.safetensors`` and ``route.json``."""
    from safetensors.torch import load_file

    from specrt.align.features import prompt_features
    from specrt.route import MLPRouter, router_latency

    cfg = ctx.cfg
    part = json.loads((ctx.work / "partition.json").read_text())
    asg = json.loads((ctx.work / "assign.json").read_text())
    X, ids, _ = load_features(ctx.work)
    y = torch.tensor(part["labels"])
    k = part["k"]
    cd = [asg["clusters"][str(c)]["drafter"] for c in range(k)]
    held = set(part["held"])
    tr = torch.tensor([i not in held for i in ids])
    pt = load_file(str(ctx.work / "partition.safetensors"))
    dev = next(ctx.model.parameters()).device
    router = MLPRouter(X.shape[1], k, cd, asg["default"], hidden=cfg.router_hidden,
                       threshold=cfg.router_threshold, metric=part["metric"]).to(dev)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=1, desc="f) route", unit="fit")
    fit = router.fit(X[tr], y[tr], centroids=pt["centroids"], epochs=cfg.router_epochs,
                     seed=cfg.seed)
    if bar is not None:
        bar.update(1)
        bar.close()
    rep: dict = {"train": fit, "clusters": k, "cluster_drafter": cd, "default": asg["default"]}
    hv = ~tr
    if hv.any():
        pred = router.predict_clusters(X[hv])
        rep["heldout_n"] = int(hv.sum())
        rep["heldout_cluster_acc"] = float((pred == y[hv]).float().mean())
        routed = [n for n, _, _ in router.route(X[hv])]
        want = [cd[int(c)] for c in y[hv]]
        rep["heldout_drafter_acc"] = sum(a == b for a, b in zip(routed, want)) / len(want)
        rep["heldout_fallback_rate"] = sum(
            f < router.threshold for _, _, f in router.route(X[hv])) / len(want)
    # latency: one route call vs one batch-1 prefill of a median-length collected prompt
    recs = ctx.read_collect()
    lens = sorted(len(r["prompt_ids"]) for r in recs)
    med = next(r for r in recs if len(r["prompt_ids"]) == lens[len(lens) // 2])
    ptoks = [med["prompt_ids"]]
    prompt_features(ctx.model, ptoks)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        prompt_features(ctx.model, ptoks)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    pre = sorted(ts)[1]
    lat = router_latency(router, X.shape[1], device=dev)
    rep.update(router_latency_s=lat, prefill_s=pre, prefill_tokens=len(ptoks[0]),
               router_over_prefill=lat / pre if pre > 0 else None)
    router.save(ctx.work / "router.safetensors")
    (ctx.work / "route.json").write_text(json.dumps(rep, indent=1))
    _log(f"route: held-back cluster acc {rep.get('heldout_cluster_acc', float('nan')):.3f}, "
         f"drafter acc {rep.get('heldout_drafter_acc', float('nan')):.3f}; latency "
         f"{lat * 1e3:.3f} ms = {100 * lat / max(pre, 1e-12):.2f}% of a "
         f"{len(ptoks[0])}-token prefill")
    return {k_: rep[k_] for k_ in ("heldout_cluster_acc", "heldout_drafter_acc",
                                   "router_over_prefill") if k_ in rep}


def stage_write(ctx: _Ctx) -> dict:
    """Write the pool directory from the stage outputs (see :mod:`specrt.pool`)."""
    from safetensors.torch import load_file

    from specrt.draft import lookup_drafter
    from specrt.pool import copy_model_drafter_files, drafter_entry, write_pool
    from specrt.route import MLPRouter

    cfg = ctx.cfg
    part = json.loads((ctx.work / "partition.json").read_text())
    asg = json.loads((ctx.work / "assign.json").read_text())
    route = json.loads((ctx.work / "route.json").read_text())
    model = ctx.model
    router = MLPRouter.load(ctx.work / "router.safetensors")
    used = list(dict.fromkeys(router.cluster_drafter + [router.default]))
    members = [m for n in used if "+" in n for m in n.split("+")]
    entries = []
    for n in dict.fromkeys([*members, *used]):  # a fused drafter's members come first
        lookup = lookup_drafter(n, model.args.vocab_size)
        if lookup is not None:
            entries.append(drafter_entry(lookup))
        elif n == "baseline":
            files = copy_model_drafter_files(ctx.baseline_cfg, ctx.out, "baseline")
            entries.append({"name": n, "kind": "model", "files": files,
                            "config": dict(ctx.baseline_runtime)})
        elif n.startswith("aligned_"):
            files = copy_model_drafter_files(ctx.work / "align" / f"{n}.json", ctx.out, n)
            entries.append({"name": n, "kind": "model", "files": files,
                            "config": dict(ctx.baseline_runtime)})
        elif "+" in n:
            entries.append({"name": n, "kind": "fused", "files": [],
                            "config": {"members": n.split("+"), "split": "fill"}})
        else:
            raise ValueError(f"unknown drafter {n!r} in the assignment")
    items = []
    for c in part["clusters"]:
        a = asg["clusters"][str(c["id"])]
        items.append({"id": c["id"], "size": c["size"], "tasks": c["tasks"],
                      "drafter": a["drafter"], "held_back": len(a["held_back"]),
                      "candidates": a["candidates"]})
    pt = load_file(str(ctx.work / "partition.safetensors"))
    manifest = ctx.manifest.data
    write_pool(ctx.out, model=model, drafters=entries, default_drafter=router.default,
               router=router, centroids=pt["centroids"], mean=pt.get("mean"),
               std=pt.get("std"), metric=part["metric"], clusters=items,
               target_name=cfg.target or "default",
               extra={"router": {k: v for k, v in route.items() if k not in ("clusters",)},
                      "partition": {k: part[k] for k in ("k", "metric", "silhouette", "purity",
                                                         "ari", "n")},
                      "build": {"prompts": str(cfg.prompts), "split": "train",
                                "per_task": cfg.per_task, "max_tokens": cfg.max_tokens,
                                "aligner": cfg.aligner, "assign_metric": cfg.assign_metric,
                                "assign_tokens": cfg.assign_tokens,
                                "stage_seconds": {s: manifest.get(s, {}).get("seconds")
                                                  for s in STAGES if s != "write"},
                                **cfg.extra}})
    return {"pool": str(ctx.out / "pool.json"), "drafters": used}


def _clear_partial(work: Path, stage: str) -> None:
    """Delete the per-cluster progress of ``stage`` (align: ``align/aligned_*`` and
    ``summary.json``; assign: ``assign.json``) before it reruns with new inputs."""
    if stage == "align" and (work / "align").is_dir():
        for f in (work / "align").iterdir():
            if f.name.startswith("aligned_") or f.name in ("summary.json", "vocab.pt"):
                f.unlink()
    elif stage == "assign":
        (work / "assign.json").unlink(missing_ok=True)


# ------------------------------------------------------------------------------ run
def run_align(cfg: AlignConfig) -> dict:
    """Run (or resume) every stage; returns ``{stage: "ran" | "skipped", ...,
    "reports": {stage: summary}}``."""
    t_all = time.perf_counter()
    if cfg.assign_metric not in ("goodput", "mean_accepted_length", "acceptance_rate"):
        raise ValueError(f"unknown assign metric {cfg.assign_metric!r}")
    if cfg.assign_budget is not None and not 1 <= cfg.assign_budget <= 6:
        raise ValueError(f"--assign-budget {cfg.assign_budget}: need 1..6 draft tokens "
                         "(the engine's largest budget), or 0 for none")
    if str(cfg.clusters) != "auto":
        try:
            int(cfg.clusters)
        except ValueError:
            raise ValueError(f"--clusters must be an integer or 'auto', got {cfg.clusters!r}")
    rows, by_id = _select_rows(cfg)  # clear errors for bad prompt files before any work
    if cfg.target is not None:
        from specrt.model import resolve_target

        resolve_target(cfg.target)  # unknown target: FileNotFoundError now
    total = (cfg.budget_minutes or 0) * 60 or None
    collect_s = (cfg.collect_minutes * 60 if cfg.collect_minutes is not None
                 else (0.5 * total if total else float("inf")))
    align_s = (cfg.align_minutes * 60 if cfg.align_minutes is not None
               else (0.35 * total if total else 30 * 60))
    ctx = _Ctx(cfg)
    status: dict = {"reports": {}}
    man = ctx.manifest
    tgt = cfg.target or "default"
    params = {
        "collect": {"prompts": str(Path(cfg.prompts).resolve()), "target": tgt,
                    "per_task": cfg.per_task, "max_tokens": cfg.max_tokens,
                    "max_prompt_chars": cfg.max_prompt_chars, "seed": cfg.seed},
    }
    params["features"] = dict(params["collect"])
    base_p = _baseline_path(cfg)
    base_sig = None
    if base_p is not None:  # a retrained baseline redoes partition (held-back) onward
        base_sig = [str(base_p.resolve()), hashlib.sha256(base_p.read_bytes()).hexdigest()[:16]]
    params["partition"] = {"clusters": str(cfg.clusters), "k_min": cfg.k_min, "k_max": cfg.k_max,
                           "metric": cfg.metric, "hold_frac": cfg.hold_frac,
                           "assign_prompts": cfg.assign_prompts, "baseline": base_sig}
    params["align"] = {"aligner": cfg.aligner, "baseline": cfg.baseline, "kind": cfg.align_kind,
                       "layers": cfg.align_layers, "vocab": cfg.align_vocab,
                       "epochs": cfg.align_epochs, "lr": cfg.align_lr, "lora": cfg.align_lora}
    params["assign"] = {"candidates": list(cfg.candidates), "tokens": cfg.assign_tokens,
                        "metric": cfg.assign_metric, "rates": "per-cluster",
                        "margin": cfg.assign_margin, "tie": "paired-t-5%", "cold": True,
                        "budget": cfg.assign_budget}
    params["route"] = {"hidden": cfg.router_hidden, "threshold": cfg.router_threshold,
                       "epochs": cfg.router_epochs}
    params["write"] = {"out": str(Path(cfg.out).resolve())}

    # collect: its file is reused across parameter changes only for the same outputs
    cp = params["collect"]
    old = man.data.get("collect", {}).get("params")
    same_out = old is not None and all(old.get(k) == cp[k] for k in
                                       ("prompts", "target", "max_tokens", "max_prompt_chars"))
    if old is not None and not same_out and (ctx.work / "collect.jsonl").is_file():
        _log("collect: parameters changed; discarding the old collect.jsonl")
        (ctx.work / "collect.jsonl").unlink()
    if man.done("collect", cp):
        status["collect"] = "skipped"
    else:
        t0 = time.perf_counter()
        rep = stage_collect(ctx, rows, collect_s)
        status["reports"]["collect"] = rep
        if rep.get("new", 0) or not man.data.get("collect"):
            man.invalidate_after("collect")
        if rep["complete"]:
            man.mark("collect", cp, time.perf_counter() - t0)
        status["collect"] = "ran"
    want = {str(r["id"]) for r in rows}
    recs = [r for r in ctx.read_collect() if r["id"] in want]
    if not recs:
        raise ValueError("collect produced no sequences")

    def step(name, fn):
        if man.done(name, params[name]):
            status[name] = "skipped"
            return
        # align and assign resume per cluster; their partial outputs are kept only when
        # they were made with these very parameters (and the earlier stages unchanged)
        prog = man.data.get(name)
        if not (prog and prog.get("params") == _jsonable(params[name])):
            _clear_partial(ctx.work, name)
        man.data[name] = {"done": False, "params": _jsonable(params[name])}
        man.save()
        t0 = time.perf_counter()
        status["reports"][name] = fn()
        man.invalidate_after(name)
        man.mark(name, params[name], time.perf_counter() - t0)
        status[name] = "ran"

    step("features", lambda: stage_features(ctx, recs, by_id))
    step("partition", lambda: stage_partition(ctx))
    step("align", lambda: stage_align(ctx, align_s))
    step("assign", lambda: stage_assign(ctx, by_id))
    step("route", lambda: stage_route(ctx, by_id))
    step("write", lambda: stage_write(ctx))
    status["seconds"] = round(time.perf_counter() - t_all, 1)
    _log(f"pool written to {cfg.out} ({status['seconds']} s; stages: " + ", ".join(
        f"{s} {status.get(s)}" for s in STAGES) + ")")
    return status


def config_from_args(args) -> AlignConfig:
    """An :class:`AlignConfig` from the ``specrt align`` argparse namespace."""
    cands = tuple(c.strip() for c in args.candidates.split(",") if c.strip())
    return AlignConfig(
        prompts=args.prompts, out=args.out, target=args.target, work=args.work,
        clusters=args.clusters, k_min=args.k_min, k_max=args.k_max, metric=args.metric,
        per_task=args.per_task, max_tokens=args.max_tokens,
        max_prompt_chars=args.max_prompt_chars, gen_batch=args.gen_batch, device=args.device,
        seed=args.seed, budget_minutes=args.budget, collect_minutes=args.collect_minutes,
        align_minutes=args.align_minutes, aligner=args.align, baseline=args.baseline,
        align_kind=args.align_kind, align_layers=args.align_layers,
        align_vocab=args.align_vocab, align_epochs=args.align_epochs,
        align_lr=args.align_lr, align_lora=args.align_lora,
        assign_prompts=args.assign_prompts, assign_tokens=args.assign_tokens,
        assign_metric=args.assign_metric, assign_margin=args.assign_margin, candidates=cands,
        assign_budget=args.assign_budget or None,
        router_hidden=args.router_hidden, router_threshold=args.router_threshold,
        progress=not args.no_progress)


def add_cli(sub) -> None:
    """Register ``specrt align`` on an argparse subparsers object."""
    a = sub.add_parser("align", help="build a task-aware drafter pool (resumable stages)",
                       description=__doc__.split("\n\n")[0])
    a.add_argument("--target", default=None,
                   help="HF model directory or .gguf file (default: the default model)")
    a.add_argument("--prompts", required=True, help="prompt JSONL (id, task, prompt); only "
                   "its train split is read")
    a.add_argument("--out", required=True, help="pool directory to write (work files in OUT/work)")
    a.add_argument("--work", default=None, help="stage outputs (default OUT/work)")
    a.add_argument("--clusters", default="auto", help="K, or 'auto' (silhouette over "
                   "--k-min..--k-max)")
    a.add_argument("--k-min", type=int, default=2)
    a.add_argument("--k-max", type=int, default=10)
    a.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine")
    a.add_argument("--per-task", type=int, default=24, help="train prompts per task")
    a.add_argument("--max-tokens", type=int, default=48, help="target tokens per prompt (collect)")
    a.add_argument("--max-prompt-chars", type=int, default=1500,
                   help="collect: longer prompts keep head 2/3 + tail 1/3 of this (0: off)")
    a.add_argument("--gen-batch", type=int, default=16)
    a.add_argument("--budget", type=float, default=None,
                   help="total minutes: collect gets 50%%, alignment 35%% (unless set below)")
    a.add_argument("--collect-minutes", type=float, default=None)
    a.add_argument("--align-minutes", type=float, default=None,
                   help="alignment time over all clusters (default 30)")
    a.add_argument("--align", default="distill", help="aligner: distill or none")
    a.add_argument("--baseline", default=None,
                   help="baseline model drafter .json (default: the shipped one for the "
                        "default target; none otherwise)")
    a.add_argument("--align-kind", choices=["lm", "eagle"], default="eagle",
                   help="drafter kind when there is no baseline")
    a.add_argument("--align-layers", type=int, default=1)
    a.add_argument("--align-vocab", type=int, default=4096)
    a.add_argument("--align-epochs", type=float, default=30.0,
                   help="passes over each cluster's sequences")
    a.add_argument("--align-lr", type=float, default=None,
                   help="learning rate (default 3e-3 with LoRA, 3e-4 full tuning)")
    a.add_argument("--align-lora", type=int, default=16,
                   help="LoRA rank on the baseline drafter (0: tune all its weights)")
    a.add_argument("--candidates", default=",".join(AlignConfig.candidates),
                   help="drafters measured per cluster: aligned (the cluster's own), "
                        "baseline, ngram, ngramN (suffix matches of N+ tokens only), "
                        "recycling, and fusions of them joined by + "
                        "(one merged draft tree per step, see specrt.draft.fused)")
    a.add_argument("--assign-prompts", type=int, default=4,
                   help="held-back train prompts per cluster for assign/route")
    a.add_argument("--assign-tokens", type=int, default=48)
    a.add_argument("--assign-metric", default="goodput",
                   choices=["goodput", "mean_accepted_length", "acceptance_rate"])
    a.add_argument("--assign-margin", type=float, default=0.02,
                   help="candidates within this relative margin of the best metric tie; "
                        "the longest mean accepted length among them wins")
    a.add_argument("--assign-budget", type=int, default=3,
                   help="draft length at which candidates that tie on goodput (within "
                        "--assign-margin, or not slower by a paired t-test at 5%%) are "
                        "compared by mean accepted length; 0: compare them as measured")
    a.add_argument("--router-hidden", type=int, default=128)
    a.add_argument("--router-threshold", type=float, default=0.5)
    a.add_argument("--device", default=None)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=lambda args: (run_align(config_from_args(args)), 0)[1])
