"""Drafter pools on disk (DESIGN.md "Pools"): write and load a pool directory.

A pool directory holds ``pool.json`` plus safetensors files::

    {
      "format": "specrt-pool", "version": 1, "created": "...",
      "target": {"name": str, "fingerprint": str, "config_sha": str, "weights_sha": str,
                 "vocab_size": int, "hidden_size": int},
      "drafters": [{"name": str, "kind": "model" | "ngram" | "recycling" | "suffix" | "fused",
                    "files": [relative paths], "config": {constructor / runtime options}}],
      "default_drafter": str,
      "clusters": {"k": int, "metric": "cosine" | "euclidean",
                   "centroids": "clusters.safetensors",   # tensors centroids, mean, std
                   "items": [{"id": int, "size": int, "tasks": {task: count},
                              "drafter": str,
                              "candidates": {name: {"acceptance_rate", "mean_accepted_length",
                                                    "goodput_tok_s", "accepted_per_s",
                                                    "prompts", "tokens"}}}]},
      "router": {"file": "router.safetensors", "config": "router.json", "mode", "threshold",
                 "hidden", ... measured accuracy / latency},
      "partition": {...}, "build": {...}      # free-form reports
    }

A ``model`` drafter's files are its ``<stem>.json`` config and weights as written by
:meth:`specrt.draft.model.DraftNet.save` (the target's embedding and LM head are
shared, not stored); ``files[0]`` is the config. Its ``config`` holds the runtime
options (mode, topk, max_depth, threshold) given to
:class:`specrt.draft.model.ModelDrafter`.

A ``suffix`` drafter's one file is its datastore (:mod:`specrt.draft.suffix`: the
target's outputs on the train prompts, indexed); its ``config`` holds
:class:`specrt.draft.suffix.SuffixDrafter`'s options (min_match, min_prob, max_depth,
max_occ).

A ``fused`` drafter (:class:`specrt.draft.fused.FusedDrafter`) has no files; its
``config`` is ``{"members": [names of other drafters of the pool], "split": "fill" |
"share"}``. Its members are the pool's own drafter objects (shared, not copies).

Entries are made from live drafters or spec strings, and drafters from entries, by the
drafter registry (:mod:`specrt.draft.registry`; ``drafter_entry`` is re-exported here).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import shutil
from pathlib import Path

import torch

from specrt.draft.registry import (KINDS, drafter_entry, drafter_from_entry,  # noqa: F401
                                   fused_members)

POOL_FORMAT = "specrt-pool"
POOL_VERSION = 1
SHIPPED_POOL = Path(__file__).resolve().parent / "pools" / "default"
"""The pool shipped for the default target (``Engine.from_pretrained()`` loads it)."""


class PoolError(ValueError):
    """A pool directory that cannot be used (missing files, other target, bad JSON)."""


# --------------------------------------------------------------------- target identity
def target_fingerprint(model) -> dict:
    """Identity of a target model: ``config_sha`` (its hyper-parameters), ``weights_sha``
    (a bf16-rounded sample of its embedding and final norm, so the same weights give the
    same value in fp32 or bf16, on CPU or GPU), ``fingerprint`` (both combined),
    ``vocab_size``, ``hidden_size``."""
    a = model.args
    cfg = json.dumps(dataclasses.asdict(a), sort_keys=True, default=str).encode()
    config_sha = hashlib.sha256(cfg).hexdigest()[:16]
    with torch.no_grad():
        e = model.embed.weight
        rows = torch.linspace(0, e.shape[0] - 1, min(64, e.shape[0])).long().to(e.device)
        sample = torch.cat([e[rows].flatten(), model.norm.flatten()])
        sample = sample.float().to(torch.bfloat16).float().cpu()
    weights_sha = hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]
    fp = hashlib.sha256(f"{config_sha}:{weights_sha}".encode()).hexdigest()[:16]
    return {"fingerprint": fp, "config_sha": config_sha, "weights_sha": weights_sha,
            "vocab_size": a.vocab_size, "hidden_size": a.hidden_size}


# ---------------------------------------------------------------------------- write
def copy_model_drafter_files(config_json: str | Path, out_dir: str | Path, stem: str
                             ) -> list[str]:
    """Copy a saved model drafter (``<x>.json`` + the weights file it names) into
    ``out_dir`` as ``<stem>.json`` / ``<stem>.safetensors``; returns the two relative
    file names (config first). Copies nothing when source and destination coincide.

    A LoRA drafter saved over a base (config key ``"base"``) brings its base along: the
    base is copied under its own stem (once, however many drafters share it), its two
    files are appended to the returned list, and the copied config points at it."""
    src = Path(config_json)
    out = Path(out_dir)
    cfg = json.loads(src.read_text())
    extra: list[str] = []
    if cfg.get("base"):
        bsrc = src.parent / cfg["base"]
        extra = copy_model_drafter_files(bsrc, out, bsrc.stem)
        cfg["base"] = extra[0]
    wsrc = src.parent / cfg["weights"]
    wdst, cdst = out / f"{stem}.safetensors", out / f"{stem}.json"
    if wsrc.resolve() != wdst.resolve():
        shutil.copyfile(wsrc, wdst)
    cfg["weights"] = wdst.name
    if src.resolve() != cdst.resolve():
        cdst.write_text(json.dumps(cfg, indent=1))
    return [cdst.name, wdst.name, *extra]


def write_pool(out_dir: str | Path, *, model, drafters: list[dict], default_drafter: str,
               router, centroids: torch.Tensor, mean: torch.Tensor | None,
               std: torch.Tensor | None, metric: str, clusters: list[dict],
               target_name: str | None = None, extra: dict | None = None) -> Path:
    """Write ``pool.json``, ``router.safetensors``/``router.json`` and
    ``clusters.safetensors`` into ``out_dir`` (model drafter files must already be there,
    see :func:`copy_model_drafter_files`).

    Args:
        model: the target the pool was aligned to (for the fingerprint).
        drafters: entries as made by :func:`drafter_entry`.
        default_drafter: fallback drafter name (one of ``drafters``).
        router: a :class:`specrt.route.MLPRouter` whose cluster->drafter map uses those
            names.
        centroids: ``[K, D]`` k-means centroids (prepared space); ``mean``/``std`` ``[D]``.
        clusters: K dicts (id, size, tasks, drafter, candidates ...).
        extra: more top-level keys (partition / build reports).

    Returns the path of ``pool.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [d["name"] for d in drafters]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate drafter names {names}")
    if default_drafter not in names:
        raise ValueError(f"default drafter {default_drafter!r} not among {names}")
    for d in drafters:
        if d["kind"] not in KINDS:
            raise ValueError(f"drafter {d['name']!r}: kind {d['kind']!r} not in {KINDS}")
        for f in d["files"]:
            if not (out / f).is_file():
                raise FileNotFoundError(f"drafter {d['name']!r}: {out / f} not written")
        if d["kind"] == "fused":
            fused_members(d, {e["name"]: e["kind"] for e in drafters}, ValueError)
    missing = set(router.cluster_drafter) - set(names)
    if missing or router.default not in names:
        raise ValueError(f"router routes to drafters not in the pool: "
                         f"{sorted(missing | ({router.default} - set(names)))}")
    from safetensors.torch import save_file

    router.save(out / "router.safetensors", out / "router.json")
    ct = {"centroids": centroids.detach().float().contiguous().cpu()}
    if mean is not None:
        ct["mean"], ct["std"] = mean.float().contiguous().cpu(), std.float().contiguous().cpu()
    save_file(ct, str(out / "clusters.safetensors"))
    meta = {
        "format": POOL_FORMAT, "version": POOL_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": {"name": target_name or "default", **target_fingerprint(model)},
        "drafters": drafters,
        "default_drafter": default_drafter,
        "clusters": {"k": int(centroids.shape[0]), "metric": metric,
                     "centroids": "clusters.safetensors", "items": clusters},
        "router": {"file": "router.safetensors", "config": "router.json", **router.config()},
    }
    for k, v in (extra or {}).items():
        if k in meta and isinstance(meta[k], dict) and isinstance(v, dict):
            meta[k].update(v)
        else:
            meta[k] = v
    p = out / "pool.json"
    p.write_text(json.dumps(meta, indent=1))
    return p


# ----------------------------------------------------------------------------- load
_FIELD_TYPES = (("target", dict, "an object"), ("drafters", list, "a list"),
                ("default_drafter", str, "a string"), ("clusters", dict, "an object"),
                ("router", dict, "an object"))


def read_json_file(path: str | Path, what: str = "file"):
    """The parsed JSON of ``path``; :class:`PoolError` naming the file (``what`` says
    what it is) when it is missing, unreadable or not JSON."""
    p = Path(path)
    if not p.is_file():
        raise PoolError(f"{what} missing: {p}")
    try:
        return json.loads(p.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PoolError(f"{p}: {what} is not valid JSON ({e})") from None
    except OSError as e:
        raise PoolError(f"{p}: cannot read {what} ({e})") from None


def check_safetensors(path: str | Path) -> None:
    """:class:`PoolError` naming ``path`` unless it is a complete safetensors file: an
    8-byte header length, a JSON header, and exactly the data bytes the header's
    ``data_offsets`` cover (a truncated copy fails here, before any tensor is read)."""
    p = Path(path)
    size = p.stat().st_size
    bad = f"{p}: not a complete safetensors file"
    if size < 8:
        raise PoolError(f"{bad} ({size} bytes; truncated?)")
    with p.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise PoolError(f"{bad} (its header says {n} bytes, the file has {size}; "
                            "truncated?)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PoolError(f"{bad} (its header is not JSON)") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__"), default=0)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError):
        raise PoolError(f"{bad} (its header lists no valid data_offsets)") from None
    if 8 + n + end != size:
        raise PoolError(f"{bad} (its header needs {8 + n + end} bytes, the file has "
                        f"{size}; truncated or damaged)")


def _check_meta_shape(meta, p: Path) -> None:
    """:class:`PoolError` naming ``p`` and the field when ``pool.json`` is not an object
    or a top-level field or drafter entry has the wrong JSON type."""
    if not isinstance(meta, dict):
        raise PoolError(f"{p}: expected a JSON object, got {type(meta).__name__}")
    for key, typ, spelled in _FIELD_TYPES:
        if meta.get(key) is not None and not isinstance(meta[key], typ):
            raise PoolError(f"{p}: field {key!r} must be {spelled}, got "
                            f"{type(meta[key]).__name__}")
    for i, e in enumerate(meta.get("drafters") or []):
        where = f"{p}: field 'drafters'[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise PoolError(f"{where} must be an object with a string 'name'")
        files = e.get("files", [])
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise PoolError(f"{where} ({e['name']!r}): 'files' must be a list of file names")
        if not isinstance(e.get("config", {}), dict):
            raise PoolError(f"{where} ({e['name']!r}): 'config' must be an object")


def read_pool_meta(pool_dir: str | Path) -> dict:
    """``pool.json`` of a pool directory, checked for format, version and the JSON
    types of its fields (:class:`PoolError` naming the file and field otherwise)."""
    d = Path(pool_dir)
    p = d / "pool.json"
    if not p.is_file():
        raise PoolError(f"not a pool directory (no pool.json): {d}")
    meta = read_json_file(p, "pool.json")
    _check_meta_shape(meta, p)
    if meta.get("format") != POOL_FORMAT:
        raise PoolError(f"{p}: not a specrt pool (format {meta.get('format')!r})")
    version = meta.get("version", 0)
    if not isinstance(version, int):
        raise PoolError(f"{p}: field 'version' must be an integer, got {version!r}")
    if version > POOL_VERSION:
        raise PoolError(f"{p}: pool version {version} is newer than this specrt "
                        f"reads ({POOL_VERSION})")
    return meta


def _check_drafter_config(p: Path, name: str, seen: set) -> None:
    """A model drafter's config ``p``: JSON object naming a complete weights file, and
    (LoRA drafters) a base config that passes the same check."""
    if p in seen:
        return
    seen.add(p)
    cfg = read_json_file(p, f"config of drafter {name!r}")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("weights"), str):
        raise PoolError(f"{p}: config of drafter {name!r} must be a JSON object with a "
                        "string field 'weights'")
    w = p.parent / cfg["weights"]
    if not w.is_file():
        raise PoolError(f"{p}: field 'weights' names a missing file {cfg['weights']}")
    check_safetensors(w)
    if cfg.get("base"):
        if not isinstance(cfg["base"], str):
            raise PoolError(f"{p}: field 'base' must be a file name, got {cfg['base']!r}")
        _check_drafter_config(p.parent / cfg["base"], name, seen)


def check_drafter_files(entry: dict, pool_dir: str | Path) -> None:
    """:class:`PoolError` naming the file when a file of a ``pool.json`` drafter entry
    is missing, a safetensors file is incomplete, or a model drafter's config is not
    JSON (checked before anything is built from them)."""
    d, name = Path(pool_dir), entry.get("name")
    for f in entry.get("files", []):
        p = d / f
        if not p.is_file():
            raise PoolError(f"pool {d}: drafter {name!r} misses file {f}")
        if p.suffix == ".safetensors":
            check_safetensors(p)
    files = entry.get("files", [])
    if entry.get("kind") == "model" and files:
        _check_drafter_config(d / files[0], name, set())


def check_target(meta: dict, model, pool_dir: str | Path = "") -> None:
    """Raise :class:`PoolError` when ``model`` is not the target the pool was aligned to."""
    want = meta.get("target", {})
    have = target_fingerprint(model)
    for key in ("vocab_size", "hidden_size", "config_sha", "weights_sha"):
        if key in want and want[key] != have[key]:
            raise PoolError(
                f"pool {pool_dir} was aligned to target {want.get('name')!r} "
                f"(fingerprint {want.get('fingerprint')}), but this target differs "
                f"({key}: pool {want[key]!r}, target {have[key]!r}; fingerprint "
                f"{have['fingerprint']}). Rebuild the pool with `specrt align` for this target.")


def load_pool(pool_dir: str | Path, model, *, check: bool = True):
    """Load a pool for ``model`` (the target).

    Returns ``(drafters, router, default_name, meta)``: the drafter objects (protocol
    of :mod:`specrt.draft.base`), the :class:`specrt.route.MLPRouter` on the target's
    device, the default drafter's name, and the parsed ``pool.json``.

    Raises :class:`PoolError` (a ``ValueError``) naming the file (and field) when the
    directory is not a pool, a file is missing, truncated or not JSON, a field has the
    wrong type, or the pool was aligned to a different target (``check``). Reads only.
    """
    d = Path(pool_dir)
    meta = read_pool_meta(d)
    if check:
        check_target(meta, model, d)
    entries = meta.get("drafters") or []
    if not entries:
        raise PoolError(f"pool {d}: no drafters")
    for e in entries:
        check_drafter_files(e, d)
    built = {e.get("name"): _build(e, d, model)
             for e in entries if e.get("kind") != "fused"}
    for e in entries:  # fused drafters last: their members are the pool's own drafters
        if e.get("kind") == "fused":
            built[e.get("name")] = drafter_from_entry(e, d, model, built)
    drafters = [built[e.get("name")] for e in entries]
    names = [x.name for x in drafters]
    default = meta.get("default_drafter")
    if default not in names:
        raise PoolError(f"pool {d}: default drafter {default!r} not among {names}")
    router = _load_router(d, meta.get("router") or {}, next(model.parameters()).device)
    bad = (set(router.cluster_drafter) | {router.default}) - set(names)
    if bad:
        raise PoolError(f"pool {d}: router names drafters not in the pool: {sorted(bad)}")
    return drafters, router, default, meta


def _build(entry: dict, d: Path, model):
    """:func:`drafter_from_entry`, with a damaged file's error naming the drafter and its
    files (the files passed :func:`check_drafter_files`; this is the safety net)."""
    from safetensors import SafetensorError

    try:
        return drafter_from_entry(entry, d, model)
    except (SafetensorError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PoolError(f"pool {d}: drafter {entry.get('name')!r} cannot be built from "
                        f"{', '.join(entry.get('files', [])) or 'its entry'}: "
                        f"{type(e).__name__}: {e}") from None


def _load_router(d: Path, r: dict, device):
    """The pool's :class:`specrt.route.MLPRouter` from its ``router`` field (weights
    file, optional JSON config), every damaged file named in a :class:`PoolError`."""
    from specrt.route import MLPRouter

    rname = r.get("file", "router.safetensors")
    if not isinstance(rname, str):
        raise PoolError(f"{d / 'pool.json'}: field 'router.file' must be a file name")
    rfile = d / rname
    if not rfile.is_file():
        raise PoolError(f"pool {d}: router file missing: {rfile.name}")
    check_safetensors(rfile)
    rcfg = d / r["config"] if isinstance(r.get("config"), str) and \
        (d / r["config"]).is_file() else None
    try:
        return MLPRouter.load(rfile, rcfg, device=device)
    except ValueError as e:
        raise PoolError(f"pool {d}: {e}") from None
