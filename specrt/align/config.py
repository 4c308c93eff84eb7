"""The options of ``specrt align``, defined once: :class:`AlignConfig`'s fields carry
their defaults and, in their metadata, their command-line flag and help;
:func:`add_arguments` generates the argparse options from them and
:func:`config_from_args` reads a parsed namespace back."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

STAGES = ("collect", "features", "partition", "align", "assign", "route", "write")
ASSIGN_METRICS = ("goodput", "mean_accepted_length", "acceptance_rate")
CANDIDATES = ("aligned", "baseline", "ngram", "recycling", "ngram2+aligned+ngram",
              "ngram2+baseline+ngram", "ngram2+suffix+ngram", "ngram2+suffix+aligned+ngram",
              "ngram2+suffix+baseline+ngram")


def _split_list(s: str) -> tuple:
    return tuple(c.strip() for c in s.split(",") if c.strip())


def opt(default=dataclasses.MISSING, help: str | None = None, *, flag: str | None = None,
        type=None, choices=None, required: bool = False, parse=None, show=None,
        negate: str | None = None, cli: bool = True):
    """A config field with its command-line option.

    ``flag``: the option (default ``--`` + the field name with ``-``); ``type``: the
    argparse type (default: the default's type, else ``str``); ``parse``: turns the
    parsed value into the field's (e.g. a comma list into a tuple); ``show``: the
    default as the command line spells it (when ``parse`` changes it); ``negate``: a
    boolean field set False by this store-true flag; ``cli`` False: not an option."""
    meta = {"help": help, "flag": flag, "type": type, "choices": choices,
            "required": required, "parse": parse, "show": show, "negate": negate, "cli": cli}
    if isinstance(default, dict):
        return field(default_factory=lambda d=default: dict(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AlignConfig:
    """Options of :func:`specrt.align.pipeline.run_align` (the CLI flags of ``specrt
    align``)."""

    prompts: str = opt(help="prompt JSONL (id, task, prompt); only its train split is read",
                       required=True)
    out: str = opt(help="pool directory to write (work files in OUT/work)", required=True)
    target: str | None = opt(None, "HF model directory or .gguf file (default: the default "
                             "model)")
    work: str | None = opt(None, "stage outputs (default OUT/work)")
    clusters: str | int = opt("auto", "K, or 'auto' (silhouette over --k-min..--k-max)")
    k_min: int = opt(2, "smallest K tried by --clusters auto")
    k_max: int = opt(10, "largest K tried by --clusters auto")
    metric: str = opt("cosine", "k-means distance over the router features",
                      choices=["cosine", "euclidean"])
    per_task: int = opt(24, "train prompts per task")
    max_tokens: int = opt(48, "target tokens per prompt (collect)")
    max_prompt_chars: int = opt(1500, "collect: longer prompts keep head 2/3 + tail 1/3 of "
                                "this (0: off)")
    gen_batch: int = opt(16, "requests decoded together (collect)")
    collect_from: str | None = opt(None, "use the shards of a collection made before (e.g. "
                                   "the baseline trainer's WORK/corpus) instead of "
                                   "collecting; its seeded samples become alignment data")
    device: str | None = opt(None, "cpu or cuda[:N] (default: cuda if available)")
    seed: int = opt(0, "seed of the prompt sample, partition and training")
    budget_minutes: float | None = opt(None, "total minutes for the run: collect gets 40%%, "
                                       "alignment up to 30%% of what is left, assignment "
                                       "the rest (unless set below)", flag="--budget",
                                       type=float)
    collect_minutes: float | None = opt(None, "collection time (default: half of --budget, "
                                        "else unbounded)", type=float)
    align_minutes: float | None = opt(None, "alignment time over all clusters (default 30)",
                                      type=float)
    aligner: str = opt("distill", "aligner: distill or none", flag="--align")
    baseline: str | None = opt(None, "baseline model drafter .json (default: the shipped one "
                               "for the default target; none otherwise)")
    align_kind: str = opt("eagle", "drafter kind when there is no baseline",
                          choices=["lm", "eagle", "eagle3"])
    align_layers: int = opt(1, "decoder layers of a drafter built without a baseline")
    align_vocab: int = opt(4096, "reduced vocabulary of a drafter built without a "
                           "baseline")
    align_epochs: float = opt(30.0, "passes over each cluster's sequences")
    align_lr: float | None = opt(None, "learning rate (default 3e-3 with LoRA, 3e-4 full "
                                 "tuning)", type=float)
    align_lora: int = opt(16, "LoRA rank on the baseline drafter (0: tune all its weights)")
    align_ttt: int = opt(4, "eagle3 drafters: training-time-test steps (depths trained); "
                         "held-back chains of this length are measured")
    hold_frac: float = opt(0.25, "held-back share of each cluster's train prompts")
    assign_prompts: int = opt(4, "held-back train prompts per cluster for assign/route")
    assign_tokens: int = opt(48, "tokens generated per held-back prompt (assign)")
    assign_metric: str = opt("goodput", "what assign maximises per cluster",
                             choices=list(ASSIGN_METRICS))
    assign_margin: float = opt(0.02, "candidates within this relative margin of the best "
                               "metric tie; the longest mean accepted length among them wins")
    assign_budget: int | None = opt(3, "draft length at which candidates that tie on goodput "
                                    "(within --assign-margin) are compared by mean accepted "
                                    "length; 0: compare them as measured", type=int,
                                    parse=lambda v: v or None)
    candidates: tuple = opt(CANDIDATES, "drafters measured per cluster: aligned (the "
                            "cluster's own), baseline, ngram, ngramN (suffix matches of N+ "
                            "tokens only), recycling, suffix (lookup in the collection's "
                            "outputs, see specrt.draft.suffix), and fusions of them joined "
                            "by + (one merged draft tree per step, see specrt.draft.fused)",
                            type=str, parse=_split_list, show=",".join(CANDIDATES))
    suffix_window: int = opt(16, "suffix drafter: longest suffix matched in the datastore")
    suffix_min_prob: float = opt(0.1, "suffix drafter: a drafted node's least share of the "
                                 "matched occurrences")
    router_hidden: int = opt(128, "hidden units of the routing MLP")
    router_threshold: float = opt(0.5, "below this routing confidence the default drafter "
                                  "serves")
    router_epochs: int = opt(300, "training epochs of the routing MLP")
    progress: bool = opt(True, "progress bars (--no-progress: none)", negate="--no-progress")
    extra: dict = opt({}, cli=False)

    def validate(self) -> None:
        """``ValueError`` for options that cannot work (before any stage runs)."""
        if self.assign_metric not in ASSIGN_METRICS:
            raise ValueError(f"unknown assign metric {self.assign_metric!r}")
        if self.assign_budget is not None and not 1 <= self.assign_budget <= 6:
            raise ValueError(f"--assign-budget {self.assign_budget}: need 1..6 draft tokens "
                             "(the engine's largest budget), or 0 for none")
        if str(self.clusters) != "auto":
            try:
                int(self.clusters)
            except ValueError:
                raise ValueError(f"--clusters must be an integer or 'auto', got "
                                 f"{self.clusters!r}") from None


def _options():
    for f in dataclasses.fields(AlignConfig):
        if f.metadata.get("cli", False):
            yield f, f.metadata


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`AlignConfig` field (its flag, default, type, help)."""
    for f, m in _options():
        if m["negate"]:
            parser.add_argument(m["negate"], dest=f.name, action="store_false",
                                help=m["help"])
            continue
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "help": m["help"]}
        if m["required"]:
            kw["required"] = True
        else:
            kw["default"] = m["show"] if m["show"] is not None else f.default
        typ = m["type"] or (type(f.default) if f.default not in (None, dataclasses.MISSING)
                            else str)
        if typ is not str:
            kw["type"] = typ
        if m["choices"]:
            kw["choices"] = m["choices"]
        else:
            kw["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, **kw)


def config_from_args(args) -> AlignConfig:
    """An :class:`AlignConfig` from a namespace parsed with :func:`add_arguments`."""
    kw = {}
    for f, m in _options():
        v = getattr(args, f.name)
        kw[f.name] = m["parse"](v) if m["parse"] else v
    return AlignConfig(**kw)
