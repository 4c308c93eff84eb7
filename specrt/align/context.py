"""What the stages of ``specrt align`` share: the run's context (config, paths, the
target and engine, loaded stage outputs), the work-dir manifest that makes stages
skippable on a rerun, the baseline drafter's location, small helpers."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from specrt.align.config import STAGES, AlignConfig

BASELINE_RUNTIME = {"mode": "chain", "max_depth": 8, "threshold": 0.2}
"""Runtime options of the baseline and aligned model drafters unless the baseline's
config records its own (``"runtime"``)."""


def log(msg: str) -> None:
    print(f"[align] {msg}", flush=True)


def jsonable(x):
    return json.loads(json.dumps(x, default=str))


def hash_order(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def fit_context(ids: list[int], limit: int) -> list[int]:
    """Head 2/3 + tail 1/3 of a token list longer than ``limit``."""
    if len(ids) <= limit:
        return ids
    h = limit * 2 // 3
    return ids[:h] + ids[len(ids) - (limit - h):]


class Manifest:
    """``work/manifest.json``: per stage, the parameters it ran with and its seconds."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def done(self, stage: str, params: dict) -> bool:
        e = self.data.get(stage)
        return bool(e and e.get("done") and e.get("params") == jsonable(params))

    def mark(self, stage: str, params: dict, seconds: float, **info) -> None:
        self.data[stage] = {"done": True, "params": jsonable(params),
                            "seconds": round(seconds, 2), **info}
        self.save()

    def invalidate_after(self, stage: str) -> None:
        for s in STAGES[STAGES.index(stage) + 1:]:
            self.data.pop(s, None)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))


def baseline_path(cfg: AlignConfig) -> Path | None:
    """The baseline drafter config: ``--baseline``, else the shipped one for the default
    target, else None."""
    from specrt.draft.registry import SHIPPED_BASELINE

    b = cfg.baseline
    if b is None and cfg.target is None:
        b = str(SHIPPED_BASELINE) if SHIPPED_BASELINE.is_file() else None
    if b is None:
        return None
    p = Path(b)
    if not p.is_file():
        raise FileNotFoundError(f"baseline drafter config not found: {b}")
    return p


def baseline_reserve(cfg: AlignConfig) -> float:
    """Share of train prompts the baseline drafter was NOT trained on
    (:func:`specrt.data.is_reserved`), from its config; 0.0 when unknown."""
    p = baseline_path(cfg)
    if p is None:
        return 0.0
    return float(json.loads(p.read_text()).get("data", {}).get("reserve_fraction", 0.0))


class Ctx:
    """Shared state of one run: config, paths, baseline drafter, target, engine, loaded
    stage outputs. The target and engine are loaded lazily (a fully cached rerun loads
    them for nothing); the baseline's config and runtime are known from the start."""

    def __init__(self, cfg: AlignConfig):
        from specrt.draft.registry import recorded_runtime

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.work = Path(cfg.work) if cfg.work else self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.work / "manifest.json")
        self._engine = None
        self._seqs = None
        self._recs = None
        self.baseline_cfg: Path | None = baseline_path(cfg)
        self.baseline_runtime: dict = dict(BASELINE_RUNTIME)
        if self.baseline_cfg is not None:
            self.baseline_runtime.update(recorded_runtime(self.baseline_cfg))

    @property
    def engine(self):
        if self._engine is None:
            from specrt.draft import default_drafters
            from specrt.engine import Engine
            from specrt.model import load_model

            model, tok = load_model(self.cfg.target, device=self.cfg.device)
            self._engine = Engine(model, tok, drafters=default_drafters(model, self.cfg.target),
                                  max_batch=self.cfg.gen_batch,
                                  cache_tokens=max(16384, self.cfg.gen_batch * 2048),
                                  adaptive=True)
        return self._engine

    @property
    def model(self):
        return self.engine.model

    @property
    def eos_ids(self):
        return self.engine.eos_ids

    def model_drafter(self, config_json: Path, name: str):
        """A model drafter of this run (baseline or aligned) with the baseline's runtime."""
        from specrt.draft.registry import model_drafter

        return model_drafter(config_json, self.model, name=name, runtime=self.baseline_runtime)

    def baseline_drafter(self):
        """The baseline model drafter named ``baseline``, or None."""
        if self.baseline_cfg is None:
            return None
        return self.model_drafter(self.baseline_cfg, "baseline")

    @property
    def suffix_path(self) -> Path:
        """The suffix drafter's datastore of this run (:meth:`suffix_drafter`)."""
        return self.work / "suffix.safetensors"

    def suffix_drafter(self):
        """The suffix drafter (:mod:`specrt.draft.suffix`) over the outputs of every
        collected record (seeded samples too) except those of the held-back prompts,
        which assign measures on; its datastore is (re)written to :attr:`suffix_path`."""
        from specrt.draft.suffix import SuffixDrafter, build_datastore

        held = set(self.read("partition")["held"])
        recs = [r for r in self.read_collect(all_samples=True) if r["id"] not in held]
        idx = build_datastore(recs, self.suffix_path, vocab_size=self.model.args.vocab_size,
                              window=self.cfg.suffix_window)
        log(f"suffix: datastore of {len(idx)} positions from {idx.documents} outputs "
            f"({len(held)} held-back prompts left out)")
        return SuffixDrafter(idx, name="suffix", min_prob=self.cfg.suffix_min_prob)

    @property
    def collect_dir(self) -> Path:
        """The collected shards (:mod:`specrt.draft.corpus`): ``--collect-from``'s
        directory (a collection made before, e.g. by the baseline trainer), else the
        collect stage's own ``work/collect``."""
        return Path(self.cfg.collect_from) if self.cfg.collect_from else self.work / "collect"

    def forget_collect(self) -> None:
        """Drop the records read so far (the collect stage wrote more)."""
        self._recs = None

    def read_collect(self, all_samples: bool = False) -> list[dict]:
        """The collected records: one per prompt (its greedy output), or with
        ``all_samples`` every record (the seeded samples too: more alignment data). A
        damaged shard is refused naming its file (:func:`specrt.draft.corpus.read_shards`)."""
        from specrt.draft import corpus

        if self._recs is None:
            self._recs = corpus.read_shards(self.collect_dir)
        return [r for r in self._recs if all_samples or r["sample"] == 0]

    def read(self, name: str) -> dict:
        """A stage's JSON output in the work dir (``partition``, ``assign``, ``route``)."""
        return json.loads((self.work / f"{name}.json").read_text())

    def all_train_seqs(self) -> list[dict]:
        if self._seqs is None:
            part = self.read("partition")
            held = set(part["held"])
            ids = set(part["ids"])
            recs = [r for r in self.read_collect() if r["id"] in ids and r["id"] not in held]
            self._seqs = self.sequences(recs)
        return self._seqs

    def sequences(self, recs: list[dict], taps: tuple[int, ...] = ()) -> list[dict]:
        """Distillation sequences ``{tokens [n+1], hidden [n, H] fp16, prompt_len, task}``
        (hidden = the target's pre-norm last-layer states, one teacher-forced prefill;
        with ``taps``, an eagle3 drafter's layers, also ``feats``; see
        :func:`specrt.draft.train.sequences`)."""
        from specrt.draft.train import sequences

        return sequences(self.model, recs, progress=self.cfg.progress, taps=taps)
