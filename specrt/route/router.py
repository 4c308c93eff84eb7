"""The routing head: prompt features -> task cluster -> drafter.

:class:`MLPRouter` standardizes the features with stats stored inside it, classifies
the task cluster (a small MLP, or the nearest k-means centroid), maps the cluster to
its assigned drafter, and falls back to the pool's default drafter when its
confidence is below ``threshold``. It runs on the target's device inside
``Engine._prefill`` (``route(feats [B, hidden])``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("mlp", "centroid")


class _one_thread:
    """Run the head's tiny CPU ops on one thread: waking torch's intra-op pool for
    [B, 64..576] tensors costs more than the op (milliseconds on a busy machine)."""

    def __init__(self, device):
        self.cpu = torch.device(device).type == "cpu"

    def __enter__(self):
        if self.cpu:
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.cpu:
            torch.set_num_threads(self.n)


class MLPRouter(nn.Module):
    """Features ``[B, D]`` -> cluster probabilities ``[B, K]`` -> (drafter, cluster, conf).

    Args:
        dim: feature size D (the target's hidden size).
        n_clusters: K.
        cluster_drafter: K drafter names (cluster c routes to ``cluster_drafter[c]``).
        default: the fallback drafter name (low confidence).
        hidden: MLP width (64..256).
        threshold: confidence below which ``default`` is used. The confidence of a
            drafter is the summed probability of all clusters assigned to it.
        mode: ``"mlp"`` (two-layer MLP) or ``"centroid"`` (softmax over negative
            squared distances to the k-means centroids, temperature ``tau``).
        metric: the k-means space for ``centroid`` mode (``cosine``/``euclidean``).
    """

    def __init__(self, dim: int, n_clusters: int, cluster_drafter: list[str], default: str,
                 hidden: int = 128, threshold: float = 0.5, mode: str = "mlp",
                 metric: str = "cosine", tau: float = 1.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if len(cluster_drafter) != n_clusters:
            raise ValueError(f"{len(cluster_drafter)} drafter names for {n_clusters} clusters")
        self.dim, self.n_clusters, self.hidden = dim, n_clusters, hidden
        self.cluster_drafter = list(cluster_drafter)
        self.default, self.threshold, self.mode = default, float(threshold), mode
        self.metric, self.tau = metric, float(tau)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("centroids", torch.zeros(n_clusters, dim))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, n_clusters)
        self.drafter_names = sorted(set(cluster_drafter))
        # [K, n_drafters] 0/1: which drafter each cluster maps to
        m = torch.zeros(n_clusters, len(self.drafter_names))
        for c, n in enumerate(cluster_drafter):
            m[c, self.drafter_names.index(n)] = 1.0
        self.register_buffer("assign", m)

    # ---------------------------------------------------------------- inference
    def standardize(self, feats: torch.Tensor) -> torch.Tensor:
        """``(feats - mean) / std`` in fp32 on the router's device. ``[B, D] -> [B, D]``."""
        return (feats.to(self.mean.device, torch.float32) - self.mean) / self.std

    def cluster_probs(self, feats: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities ``[B, K]`` of raw features ``[B, D]``."""
        z = self.standardize(feats)
        if self.mode == "mlp":
            return torch.softmax(self.fc2(F.gelu(self.fc1(z))), -1)
        if self.metric == "cosine":
            z = F.normalize(z, dim=-1)
            d2 = (2.0 - 2.0 * z @ self.centroids.T).clamp_min(0)
        else:
            d2 = torch.cdist(z, self.centroids).pow(2)
        return torch.softmax(-d2 / self.tau, -1)

    @torch.inference_mode()
    def route(self, feats: torch.Tensor) -> list[tuple[str, int, float]]:
        """Route a batch: feats ``[B, D]`` (mean final-normed prompt states) ->
        B tuples ``(drafter_name, cluster_id, confidence)``; drafter is the default
        when the confidence of the argmax cluster's drafter is below the threshold."""
        with _one_thread(self.mean.device):
            p = self.cluster_probs(feats)                               # [B, K]
            cl = p.argmax(-1)                                           # [B]
            dconf = p @ self.assign                                     # [B, n_drafters]
            conf = dconf.gather(1, self.assign[cl].argmax(-1, keepdim=True))[:, 0]
        out = []
        for c, f in zip(cl.tolist(), conf.tolist()):
            name = self.cluster_drafter[c] if f >= self.threshold else self.default
            out.append((name, int(c), float(f)))
        return out

    @torch.inference_mode()
    def predict_clusters(self, feats: torch.Tensor) -> torch.Tensor:
        """Argmax cluster ``[B]`` (CPU int64) of raw features ``[B, D]``."""
        with _one_thread(self.mean.device):
            return self.cluster_probs(feats).argmax(-1).cpu()

    # ----------------------------------------------------------------- training
    def fit(self, feats: torch.Tensor, clusters: torch.Tensor, *, centroids: torch.Tensor
            | None = None, epochs: int = 300, lr: float = 3e-3, weight_decay: float = 1e-3,
            label_smoothing: float = 0.05, seed: int = 0) -> dict:
        """Fit the standardization stats (from ``feats``), store ``centroids`` (k-means,
        ``[K, D]`` in the standardized (cosine: unit-row) space, used by ``centroid``
        mode) and train the MLP with class-balanced cross-entropy on (feats ``[N, D]``,
        clusters ``[N]`` int) full-batch with AdamW. Returns ``{"train_acc", "loss"}``."""
        torch.manual_seed(seed)
        X = feats.detach().float().cpu()
        y = clusters.detach().long().cpu()
        dev = self.mean.device
        with torch.no_grad():
            self.mean.copy_(X.mean(0).to(dev))
            self.std.copy_(X.std(0, unbiased=False).clamp_min(1e-6).to(dev))
            if centroids is not None:
                self.centroids.copy_(centroids.float().to(dev))
            g = torch.Generator().manual_seed(seed)
            for lin in (self.fc1, self.fc2):
                nn.init.normal_(lin.weight, 0.0, 1.0 / lin.in_features ** 0.5, generator=g)
                nn.init.zeros_(lin.bias)
        cnt = torch.bincount(y, minlength=self.n_clusters).float()
        w = (cnt.sum() / (cnt.clamp_min(1) * self.n_clusters)).to(dev)
        Z = self.standardize(X.to(dev))
        y = y.to(dev)
        opt = torch.optim.AdamW([*self.fc1.parameters(), *self.fc2.parameters()], lr=lr,
                                weight_decay=weight_decay)
        self.train()
        with _one_thread(dev):
            self._train_loop(Z, y, w, opt, epochs, label_smoothing)
        self.eval()
        acc = float((self.predict_clusters(X) == y.cpu()).float().mean()) if len(y) else 0.0
        return {"train_acc": acc, "loss": self._last_loss}

    def _train_loop(self, Z, y, w, opt, epochs, label_smoothing):
        loss = torch.zeros(())
        for _ in range(epochs):
            logits = self.fc2(F.gelu(self.fc1(Z)))
            loss = F.cross_entropy(logits, y, weight=w, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self._last_loss = float(loss.detach())

    # ---------------------------------------------------------------- save/load
    def config(self) -> dict:
        return {"dim": self.dim, "n_clusters": self.n_clusters, "hidden": self.hidden,
                "cluster_drafter": self.cluster_drafter, "default": self.default,
                "threshold": self.threshold, "mode": self.mode, "metric": self.metric,
                "tau": self.tau}

    def save(self, weights: str | Path, config: str | Path | None = None) -> None:
        """Write ``weights`` (safetensors, fp32; the config is also in its metadata) and,
        if given, ``config`` (JSON)."""
        from safetensors.torch import save_file

        sd = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        cfg = self.config()
        save_file(sd, str(weights), metadata={"specrt_router": json.dumps(cfg)})
        if config is not None:
            Path(config).write_text(json.dumps(cfg, indent=1))

    @classmethod
    def load(cls, weights: str | Path, config: str | Path | dict | None = None,
             device: str | torch.device = "cpu") -> "MLPRouter":
        """Load a router saved by :meth:`save`; ``config`` (path or dict) overrides the
        config stored in the weights file's metadata (e.g. an edited threshold).

        ``FileNotFoundError`` for a missing file; ``ValueError`` naming the file (and
        key) for a damaged weights file, a config that is not a JSON object, or one
        that misses keys or does not fit the weights."""
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"router weights not found: {weights}")
        cfg = _weights_config(weights)
        if isinstance(config, (str, Path)):
            cfg.update(_config_file(Path(config)))
        elif isinstance(config, dict):
            cfg.update(config)
        where = f"{weights}" + (f" + {config}" if isinstance(config, (str, Path)) else "")
        missing = [k for k in ("dim", "n_clusters", "cluster_drafter", "default")
                   if k not in cfg]
        if missing:
            raise ValueError(f"router config ({where}) misses {', '.join(map(repr, missing))}")
        try:
            r = cls(cfg["dim"], cfg["n_clusters"], cfg["cluster_drafter"], cfg["default"],
                    hidden=cfg.get("hidden", 128), threshold=cfg.get("threshold", 0.5),
                    mode=cfg.get("mode", "mlp"), metric=cfg.get("metric", "cosine"),
                    tau=cfg.get("tau", 1.0))
            r.load_state_dict(_weights_tensors(weights))
        except (TypeError, RuntimeError) as e:  # wrong types, shapes that do not fit
            raise ValueError(f"router config ({where}) does not fit: {e}") from None
        except ValueError as e:
            raise ValueError(f"router config ({where}): {e}") from None
        return r.to(device).eval()


def _weights_config(weights: Path) -> dict:
    """The config stored in a router weights file's metadata (``{}`` when none);
    ``ValueError`` naming the file when it is not readable safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read router weights {weights}: truncated or not "
                         f"safetensors ({e})") from None
    if "specrt_router" not in meta:
        return {}
    try:
        cfg = json.loads(meta["specrt_router"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{weights}: the router config in its metadata is not JSON ({e})"
                         ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{weights}: the router config in its metadata is not an object")
    return cfg


def _config_file(path: Path) -> dict:
    """A router config JSON file as a dict; ``ValueError`` naming it otherwise."""
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"router config {path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"router config {path} must be a JSON object, got "
                         f"{type(cfg).__name__}")
    return cfg


def _weights_tensors(weights: Path) -> dict:
    """All tensors of a router weights file; ``ValueError`` naming it when damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read router weights {weights}: truncated or not "
                         f"safetensors ({e})") from None

def router_latency(router: MLPRouter, dim: int, batch: int = 1, reps: int = 50,
                   device=None) -> float:
    """Median seconds of one ``route`` call on a ``[batch, dim]`` feature batch."""
    dev = device or router.mean.device
    x = torch.randn(batch, dim, device=dev)
    router.route(x)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        router.route(x)
        if torch.device(dev).type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]
