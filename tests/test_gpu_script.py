"""bench/gpu.sh, the one prepared GPU command: its --dry-run (every part on CPU with tiny
shapes) exits 0 and writes the promised JSON files; a run with no time left reports every
part as not run and exits non-zero."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["machine", "build", "pytest_gpu", "tree_attention", "verify", "kv", "e2e"]
FILES = {"summary.json", "pytest_gpu.json", "tree_attention.json", "verify.json", "kv.json",
         "e2e.json", "gpu.log"}


def _run(out, *extra, env_over=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("SPECRT_OPS_BACKEND",
                                                            "GPU_SH_BUDGET")}
    env.update(env_over or {})
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "out"
    r = _run(out, "--dry-run")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert names == FILES and len(names) <= 8          # the device returns at most 8 files
    js = {n: json.loads((out / n).read_text()) for n in FILES if n.endswith(".json")}

    s = js["summary.json"]
    assert s["ok"] is True and s["failed"] == [] and s["dry_run"] is True
    assert list(s["parts"]) == PARTS
    assert all(p["status"] == "ok" and p["rc"] == 0 for p in s["parts"].values())
    assert s["total_s"] <= s["budget_s"]
    assert s["machine"]["torch"] and "triton" in s["machine"] and "nvidia_smi" in s["machine"]
    assert set(s["files"]) == FILES

    for n in ("pytest_gpu.json", "tree_attention.json", "verify.json", "kv.json", "e2e.json"):
        assert js[n]["complete"] is True and js[n]["dry_run"] is True, n

    t = js["pytest_gpu.json"]
    assert t["tests"] >= 1 and t["failed"] == 0 and t["errors"] == 0
    assert t["skipped"] == t["tests"]                  # no GPU here: every gpu test skipped

    ta = js["tree_attention.json"]
    assert ta["backend"] == "triton (interpreted)" and len(ta["rows"]) >= 2
    for row in ta["rows"]:
        assert row["specrt_ms"] > 0 and row["sdpa_ms"] > 0
        assert row["maxdiff"] < 1e-4                   # fp32: the kernel agrees with SDPA

    v = js["verify.json"]
    assert v["impls"] == ["cpu", "triton"]
    assert {r["kind"] for r in v["rows"]} == {"chain", "tree"}
    for row in v["rows"]:
        keys = ["cpu_us", "triton_us"] if row["kind"] == "chain" else \
            ["greedy_us", "sampled_us", "deterministic_us"]
        assert all(row[k] > 0 for k in keys), row

    kv = js["kv.json"]
    assert kv["all_match"] is True and {r["op"] for r in kv["rows"]} == {"append", "commit"}
    assert all(r["cpu_matches_torch"] and r["triton_matches_torch"] for r in kv["rows"])

    e = js["e2e.json"]
    assert e["target"]["kind"] == "random" and e["prompts"] == 1
    assert e["command"].startswith("specrt bench e2e ")
    assert set(e["summary"]) >= {"ar", "ngram"}
    assert all(m["tokens"] > 0 for m in e["summary"].values())
    assert e["mismatches"] and all(n == 0 for n in e["mismatches"].values())  # lossless


def test_gpu_script_without_time_reports_every_part(tmp_path):
    r = _run(tmp_path, "--dry-run", env_over={"GPU_SH_BUDGET": "5"}, timeout=120)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] is False and s["failed"] == PARTS
    assert all(p["status"] == "skipped" for p in s["parts"].values())


def test_gpu_script_usage():
    r = _run("", timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
