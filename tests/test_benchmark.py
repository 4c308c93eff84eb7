"""`specrt bench e2e`: schema of the JSON, losslessness count, the oracle row."""
import json

import pytest

from specrt.cli import main
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("bench"), "llama", seed=11)


def test_bench_e2e_json(tiny_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    rows = [{"id": f"x{i}", "task": t, "prompt": p} for i, (t, p) in enumerate([
        ("a", "abcabcabc abc"), ("a", "hello hello"), ("b", "xyz xyz"), ("b", "the cat")])]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "r.json"
    assert main(["bench", "e2e", "--prompts", str(prompts), "--max-tokens", "12", "--target",
                 str(tiny_dir), "--modes", "ar,ngram,recycling", "--json", str(out),
                 "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"ar", "ngram", "recycling", "oracle"}
    for m, per in res["modes"].items():
        assert set(per) == {"a", "b", "all"}
        for t, x in per.items():
            assert set(x) >= {"prompts", "tokens", "tokens_per_s", "acceptance_rate",
                              "mean_accepted_length"}
    assert res["mismatches"] == {"ar": 0, "ngram": 0, "recycling": 0}
    for t in ("a", "b", "all"):
        best = max(res["modes"][m][t]["mean_accepted_length"] for m in ("ngram", "recycling"))
        assert res["modes"]["oracle"][t]["mean_accepted_length"] >= best - 1e-9


def test_bench_e2e_pool_mode_and_unknown_drafter(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"x{i}", "task": "a", "prompt": p})
                                 for i, p in enumerate(["abcabc abc", "hello hello"])))
    out = tmp_path / "r.json"
    assert main(["bench", "e2e", "--prompts", str(prompts), "--max-tokens", "8", "--target",
                 str(tiny_dir), "--modes", "ar,pool,nosuch", "--json", str(out),
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "no drafter nosuch" in err and "no pool loaded" in err
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"ar", "pool"} and res["mismatches"] == {"ar": 0, "pool": 0}
    assert main(["bench", "e2e", "--prompts", str(prompts), "--target", str(tiny_dir),
                 "--modes", "nosuch", "--device", "cpu"]) == 2
    # fixed draft length (vanilla SD): still lossless; a bad length is a clear error
    assert main(["bench", "e2e", "--prompts", str(prompts), "--max-tokens", "8", "--target",
                 str(tiny_dir), "--modes", "ar,ngram", "--draft-len", "3", "--json", str(out),
                 "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["mismatches"] == {"ar": 0, "ngram": 0}
    # extra candidate drafters (a pool's unassigned ones) become modes and oracle entries
    import torch

    from specrt.draft.model import DraftNet
    from specrt.model import load_model

    model, _ = load_model(str(tiny_dir), device="cpu")
    DraftNet.from_target(model, arch="eagle", num_layers=1, vocab_ids=torch.arange(64)).save(
        tmp_path / "m.safetensors", tmp_path / "m.json", {"runtime": {"mode": "chain"}})
    assert main(["bench", "e2e", "--prompts", str(prompts), "--max-tokens", "8", "--target",
                 str(tiny_dir), "--modes", "ar,ngram,m", "--json", str(out),
                 "--device", "cpu", "--extra-drafters", str(tmp_path / "m.json")]) == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"ar", "ngram", "m", "oracle"}
    assert res["mismatches"] == {"ar": 0, "ngram": 0, "m": 0}
    assert main(["bench", "e2e", "--prompts", str(prompts), "--target", str(tiny_dir),
                 "--device", "cpu", "--extra-drafters", "recycling"]) == 2
    assert "already has a drafter 'recycling'" in capsys.readouterr().err
    assert main(["bench", "e2e", "--prompts", str(prompts), "--target", str(tiny_dir),
                 "--device", "cpu", "--extra-drafters", "bogus"]) == 2
    assert "--extra-drafters: 'bogus'" in capsys.readouterr().err
    assert main(["bench", "e2e", "--prompts", str(prompts), "--target", str(tiny_dir),
                 "--draft-len", "0", "--device", "cpu"]) == 2
    assert "--draft-len must be >= 1" in capsys.readouterr().err


def test_run_e2e_keeps_each_modes_acceptance_history_apart(tiny_dir):
    """Each mode learns its own drafter acceptance in the adaptive rule; the engine's
    own history is neither read nor changed by a benchmark."""
    import specrt
    from specrt.benchmark import run_e2e
    from tests.drafters import rate_snapshot, record_rate_tables

    eng = specrt.Engine.from_pretrained(str(tiny_dir), device="cpu")
    eng.generate("abcabc abc", specrt.SamplingParams(max_tokens=6), drafter="ngram")
    mine = eng.lengths.drafter_rate
    snapshot = rate_snapshot(mine)
    assert snapshot  # the engine has a history of its own
    seen = record_rate_tables(eng)
    rows = [{"prompt": p, "task": "a"} for p in ("abcabc abc", "hello hello")]
    run_e2e(eng, rows, ["ar", "ngram", "pool"], max_tokens=6, progress=False)
    assert eng.lengths.drafter_rate is mine
    assert rate_snapshot(mine) == snapshot
    ids = [id(x) for x in seen]  # per prompt: ar, ngram, pool -> three distinct tables
    assert ids[0:3] == ids[3:6] and len(set(ids[0:3])) == 3 and id(mine) not in ids
