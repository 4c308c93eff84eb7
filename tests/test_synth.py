"""Synthetic train prompts (specrt.draft.synth) and the trainer's ``--extra-prompts``:
the rows are deterministic, every id is unique and apart from the prompt file's, an
unusable document is dropped, the file is written whole, and the trainer collects and
trains on extra rows without ever putting one in the eval split."""
import json

import pytest

from specrt.data import load_prompts
from specrt.draft import corpus, synth
from specrt.draft.train import load_extra_prompts, main
from tests.tiny import make_tiny_model


def test_template_rows_are_deterministic_unique_and_cover_topics_first():
    a = synth.template_rows(["qa", "chat", "instruction"], 200)
    assert a == synth.template_rows(["qa", "chat", "instruction"], 200)
    assert len(a) == 600 and len({r["id"] for r in a}) == 600
    assert len({r["prompt"] for r in a}) == 600
    qa = [r for r in a if r["task"] == "qa"]
    n = len(synth.TOPICS)
    assert all(synth.TOPICS[i] in qa[i]["prompt"] for i in range(min(n, 200)))
    # more than templates x topics: capped, never repeated
    cap = len(synth.TEMPLATES["qa"]) * n
    assert len(synth.template_rows(["qa"], cap + 50)) == cap


def test_seed_rows_name_their_topic_and_task():
    rows = synth.seed_rows(["summarization", "rag"], 3)
    assert [r["id"] for r in rows] == [f"synth-seed:{t}:{i}" for t in ("summarization", "rag")
                                       for i in range(3)]
    assert all(r["topic"] in r["prompt"] for r in rows)


def test_prompt_from_wraps_documents_and_drops_short_ones():
    doc = "Volcanoes erupt. " * 40
    assert synth.prompt_from("summarization", "volcanoes", "too short", 0) is None
    s = synth.prompt_from("summarization", "volcanoes", "Title: Big news\n" + doc, 0)
    assert s.startswith("Summarize: Volcanoes erupt.") and "Title" not in s
    r = synth.prompt_from("rag", "tea", doc, 1)
    assert r.startswith("Volcanoes erupt.") and r.endswith("Describe tea according to the text.")
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        synth.prompt_from("qa", "tea", doc, 0)


def test_build_rows_skips_errors_duplicates_and_unknown_ids():
    seeds = synth.seed_rows(["summarization"], 3)
    doc = "A long article about things. " * 30
    texts = {1: doc, 2: doc, 3: "short"}
    recs = [{"id": s["id"], "sample": 1, "output_ids": [i + 1],
             "finish_reason": "length"} for i, s in enumerate(seeds)]
    recs.append({"id": "other", "sample": 1, "output_ids": [1], "finish_reason": "stop"})
    recs.append({"id": seeds[0]["id"], "sample": 2, "output_ids": [9], "finish_reason": "error"})
    rows = synth.build_rows(seeds, recs, lambda ids: texts.get(ids[0], doc))
    assert [r["id"] for r in rows] == ["synth:summarization:0:1"]   # 1: duplicate, 2: short


def test_main_writes_templated_prompts_whole_without_a_target(tmp_path):
    out = tmp_path / "s" / "synth.jsonl"
    assert synth.main(["--out", str(out), "--work", str(tmp_path), "--tasks", "qa,chat",
                       "--per-task", "7", "--target", "/nonexistent"]) == 0
    rows = load_prompts(out)
    assert [r["task"] for r in rows] == ["qa"] * 7 + ["chat"] * 7
    assert not list(out.parent.glob(".*tmp"))
    with pytest.raises(SystemExit, match="no recipe for task 'translation'"):
        synth.main(["--out", str(out), "--work", str(tmp_path), "--tasks", "translation"])


def test_extra_prompts_must_not_reuse_ids_and_need_a_task(tmp_path):
    base = [{"id": "a", "task": "chat", "prompt": "hi"}]
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"id": "a", "task": "qa", "prompt": "q?"}) + "\n")
    with pytest.raises(ValueError, match="x.jsonl: row 1: id 'a' is already used"):
        load_extra_prompts(str(f), base)
    f.write_text(json.dumps({"id": "b", "prompt": "q?"}) + "\n")
    with pytest.raises(ValueError, match="x.jsonl: row 1 has no 'task'"):
        load_extra_prompts(str(f), base)
    f.write_text("".join(json.dumps({"id": i, "task": "qa", "prompt": "q?"}) + "\n"
                         for i in ("b", "b")))
    with pytest.raises(ValueError, match="row 2: id 'b' is already used"):
        load_extra_prompts(str(f), base)


def test_trainer_collects_and_trains_on_extra_prompts(tmp_path):
    """Every extra row is collected (greedy) into the same corpus and counted in the
    training data; the prompt file's eval split is untouched by them."""
    tiny = make_tiny_model(tmp_path / "m", "llama", seed=3)
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps({"id": f"w{i}", "task": "chat",
                                      "prompt": f"say {i} then {i * 7}"}) + "\n"
                          for i in range(10)))
    xf = tmp_path / "x.jsonl"
    synth.main(["--out", str(xf), "--work", str(tmp_path), "--tasks", "qa", "--per-task", "5"])
    assert main(["--target", str(tiny), "--prompts", str(pf), "--per-task", "4",
                 "--max-tokens", "5", "--kind", "eagle", "--epochs", "1", "--batch-tokens",
                 "64", "--max-len", "32", "--vocab", "40", "--eval-prompts", "0",
                 "--reserve-frac", "0", "--held-frac", "0", "--gen-batch", "4",
                 "--extra-prompts", str(xf), "--out", str(tmp_path / "o"),
                 "--work", str(tmp_path / "w")]) == 0
    recs = corpus.read_shards(tmp_path / "w" / "corpus")
    assert sum(r["id"].startswith("synth:qa:") for r in recs) == 5
    assert all(r["sample"] == 0 for r in recs if r["id"].startswith("synth:"))
    cfg = json.loads((tmp_path / "o" / "baseline.json").read_text())
    assert cfg["data"]["extra_prompts"] == {"file": str(xf), "rows": 5}
    assert cfg["data"]["sequences"] == len(recs)
