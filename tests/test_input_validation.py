"""Typed input validation: every bad prompt or sampling parameter gives a ValueError that
names the field or prompt, queues nothing, and leaves the engine serving (blocks free,
the next request's output unchanged)."""
import math

import pytest

import specrt
from specrt import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return specrt.Engine.from_pretrained(str(tiny_llama), device="cpu", block_size=4,
                                         cache_tokens=1024)


@pytest.fixture(scope="module")
def good(engine):
    return engine.generate("hello world", SamplingParams(max_tokens=8))[0].token_ids


BAD_PARAMS = [
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature="1"), "temperature must be a finite number"),
    (dict(max_tokens=True), "max_tokens must be a positive integer"),
    (dict(max_tokens=2.0), "max_tokens must be a positive integer"),
    (dict(top_p="0.9"), "top_p must be a number"),
    (dict(top_k=True), "top_k must be an integer"),
    (dict(stop=[""]), "stop must be a string or a list of non-empty strings"),
    (dict(stop=[None]), "stop must be a string or a list of non-empty strings"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
    (dict(seed=2 ** 63), r"seed must be an integer in \[0, 2\*\*63\)"),
]


@pytest.mark.parametrize("kw,msg", BAD_PARAMS, ids=[m.split()[0] + str(i) for i, (_, m)
                                                     in enumerate(BAD_PARAMS)])
def test_bad_sampling_params_name_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_stop_none_means_no_stop_strings():
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


BAD_PROMPTS = [  # (prompts for generate, its message, the message of add_request(prompt))
    (b"hello", "prompts must be a string or a list, got bytes",
     "prompt must be a string or a list of token ids, got bytes"),
    ([b"hello"], "prompt 0 must be a string or a list of token ids, got bytes", None),
    (None, "prompts must be a string or a list, got NoneType",
     "prompt must be a string or a list of token ids, got NoneType"),
    (["ok", None], "prompt 1 must be a string or a list of token ids, got NoneType", None),
    ("hi \ud800 there", "prompt 0 is not valid text: surrogates not allowed at character 3",
     "prompt is not valid text: surrogates not allowed at character 3"),
    (["  "], "prompt 0 is empty", "prompt is empty"),
    ([[1, 2, 10 ** 6]], "prompt 0: token ids must be a non-empty list in 0..95",
     "prompt: token ids must be a non-empty list in 0..95"),
]


@pytest.mark.parametrize("prompts,msg,add_msg", BAD_PROMPTS,
                         ids=[str(i) for i in range(len(BAD_PROMPTS))])
def test_bad_prompt_is_refused_and_harms_nothing(engine, good, prompts, msg, add_msg):
    with pytest.raises(ValueError, match=msg):
        engine.generate(prompts, SamplingParams(max_tokens=8))
    if add_msg is not None:
        one = prompts[-1] if isinstance(prompts, list) else prompts
        with pytest.raises(ValueError, match=add_msg):
            engine.add_request(one, SamplingParams(max_tokens=8))
    assert not engine.has_unfinished()
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    assert engine.generate("hello world", SamplingParams(max_tokens=8))[0].token_ids == good


def test_params_of_the_wrong_type_are_refused(engine, good):
    with pytest.raises(ValueError, match="params must be SamplingParams, got dict"):
        engine.generate("hi", {"max_tokens": 3})
    with pytest.raises(ValueError, match="params must be SamplingParams, got dict"):
        engine.add_request("hi", {"max_tokens": 3})
    assert engine.generate("hello world", SamplingParams(max_tokens=8))[0].token_ids == good
