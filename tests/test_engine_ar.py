"""Autoregressive generation: equals HF greedy decoding, batching, sampling, stops, errors."""
import pytest
import torch

import specrt
from specrt import SamplingParams
from tests.tiny import make_tiny_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ar"), "llama", seed=3)


class AREngine(specrt.Engine):
    """The engine with speculation off by default (these tests are about plain AR)."""

    def generate(self, prompts, params=None, **kw):
        kw.setdefault("speculative", False)
        return super().generate(prompts, params, **kw)

    def stream(self, prompts, params=None, **kw):
        kw.setdefault("speculative", False)
        return super().stream(prompts, params, **kw)


@pytest.fixture
def engine(tiny_dir):
    return AREngine.from_pretrained(str(tiny_dir), device="cpu", block_size=4,
                                    cache_tokens=1024, max_batch=3)


PROMPTS = ["hello world", "a", "The quick brown fox jumps", "xyz 123", "tiny"]


def hf_greedy(tiny_dir, ids, n):
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    x = torch.tensor([ids])
    out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_equals_hf_and_batching(engine, tiny_dir):
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = engine.generate(PROMPTS, p)  # 5 prompts through a batch of 3: admission waits
    for prompt, o in zip(PROMPTS, outs):
        ids = engine.tokenizer.encode_prompt(prompt)
        assert o.token_ids == hf_greedy(tiny_dir, ids, 12), prompt
        assert o.finish_reason == "length" and len(o.token_ids) == 12
        assert o.stats["steps"] == 12 and o.stats["mean_accepted_length"] == 1.0
        assert o.stats["tokens_per_s"] > 0 and o.stats["drafter"] is None
    single = engine.generate(PROMPTS[2], p)[0]
    assert single.token_ids == outs[2].token_ids
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


def test_sampling_seeded_and_follows_params(engine, tiny_dir):
    p = SamplingParams(max_tokens=8, temperature=0.9, top_k=5, seed=7, ignore_eos=True)
    a = engine.generate(["hello", "world"], p)
    b = engine.generate(["hello", "world"], p)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = engine.generate(["hello"], SamplingParams(max_tokens=8, temperature=0.9, top_k=5, seed=8,
                                                   ignore_eos=True))
    assert len(c[0].token_ids) == 8
    assert c[0].token_ids != a[0].token_ids          # another seed, another sample
    # every sampled token is among the target's top 5 at its position (top_k honoured)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for prompt, out in (("hello", a[0]), ("world", a[1]), ("hello", c[0])):
        ids = engine.tokenizer.encode_prompt(prompt)
        with torch.no_grad():
            logits = ref(torch.tensor([ids + out.token_ids])).logits[0]
        for j, t in enumerate(out.token_ids):
            assert t in logits[len(ids) + j - 1].topk(5).indices.tolist(), (out.token_ids, j)
    # top_k=1 sampling is greedy
    g = engine.generate("hello", SamplingParams(max_tokens=8, ignore_eos=True))[0]
    k1 = engine.generate("hello", SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=1,
                                                 ignore_eos=True))[0]
    assert g.token_ids == k1.token_ids


def test_stop_string_and_stream(engine):
    p = SamplingParams(max_tokens=16, ignore_eos=True)
    full = engine.generate("hello", p)[0].text
    assert len(full) >= 6
    stop = full[3:5]
    o = engine.generate("hello", SamplingParams(max_tokens=16, stop=[stop], ignore_eos=True))[0]
    assert o.finish_reason == "stop" and o.text == full[:full.index(stop)]
    streamed = "".join(ev.text for ev in engine.stream("hello", p))
    assert streamed == full
    streamed = "".join(ev.text for ev in engine.stream("hello", SamplingParams(
        max_tokens=16, stop=[stop], ignore_eos=True)))
    assert streamed == o.text


def test_eos_stops(engine, tiny_dir):
    from specrt.model import Tokenizer

    p = SamplingParams(max_tokens=12, ignore_eos=True)
    o = engine.generate("hello", p)[0]
    # the same model with a tokenizer that declares the 5th output token an EOS
    eos = specrt.Engine(engine.model, Tokenizer(tiny_dir, eos_ids=[o.token_ids[4]]),
                        block_size=4, cache_tokens=1024)
    e = eos.generate("hello", SamplingParams(max_tokens=12), speculative=False)[0]
    first = o.token_ids.index(o.token_ids[4])
    assert e.finish_reason == "stop" and e.token_ids == o.token_ids[:first]
    assert e.stats["steps"] == first + 1    # the EOS was produced, then nothing more


@pytest.mark.parametrize("bad, match", [
    (dict(prompts=""), "empty"),
    (dict(prompts=["ok", "   "]), "empty"),
    (dict(prompts="x" * 400), "limit"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_input_clear_error_and_harmless(engine, bad, match):
    good = engine.generate("hello", SamplingParams(max_tokens=6, ignore_eos=True))[0]
    with pytest.raises(ValueError, match=match):
        prompts = bad.pop("prompts", "hello")
        engine.generate(prompts, SamplingParams(**{"ignore_eos": True, "max_tokens": 6, **bad}))
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    again = engine.generate("hello", SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert again.token_ids == good.token_ids


def test_record_served_requests(tiny_dir, tmp_path):
    """Online-learning row: served prompts and outputs are appended to a JSONL that is
    itself a valid prompt file for `specrt align`; an unwritable path only warns."""
    import json

    from specrt.data import load_prompts

    rec = tmp_path / "served.jsonl"
    eng = specrt.Engine.from_pretrained(str(tiny_dir), device="cpu", block_size=4,
                                        cache_tokens=1024, max_batch=2, record=str(rec))
    outs = eng.generate(PROMPTS[:3], SamplingParams(max_tokens=5))
    rows = [json.loads(x) for x in rec.read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted(PROMPTS[:3])
    by = {r["prompt"]: r for r in rows}
    for p, o in zip(PROMPTS[:3], outs):
        assert by[p]["output_ids"] == o.token_ids and by[p]["output"] == o.text
        assert by[p]["finish_reason"] == o.finish_reason and by[p]["task"] == "served"
    assert [r["prompt"] for r in load_prompts(str(rec))] and len(load_prompts(str(rec))) == 3
    bad = specrt.Engine.from_pretrained(str(tiny_dir), device="cpu", block_size=4,
                                        cache_tokens=1024, record=str(tmp_path / "no" / "x.jsonl"))
    with pytest.warns(UserWarning, match="cannot record"):
        again = bad.generate(PROMPTS[:2], SamplingParams(max_tokens=5))
    assert [a.token_ids for a in again] == [o.token_ids for o in outs[:2]]
