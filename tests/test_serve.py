"""``specrt serve``: a real uvicorn server on a free loopback port (a thread of this
process, or a subprocess for the signal tests) over a tiny engine, driven by the
``openai`` client and raw ``httpx``.

Shows: chat and completions, streamed and not, equal the offline ``Engine.generate``
token for token (and streamed text equals non-streamed text); requests join a running
batch; a bounded load run answers every request once with 200 or a clean 429 and leaves
every KV block free; cancelled streams, a malformed request in a load run and a drafter
that raises each fail alone; every bad input gets its own 4xx with OpenAI's error
object naming the field; SIGTERM/SIGINT drain and exit 0; the adaptive draft length
turns speculation down as the batch grows.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

import specrt
from specrt import SamplingParams
from specrt.draft import NgramDrafter
from specrt.draft.adaptive import LengthController
from specrt.draft.base import DraftTree
from specrt.serve.config import ServeConfig
from specrt.serve.server import BackgroundServer

MODEL = "tiny"
N = 12                      # output tokens of most requests
ROOT = Path(__file__).resolve().parents[1]


class Sleepy(NgramDrafter):
    """Drafts nothing (root-only trees: one token per step, like plain decoding) and
    sleeps in every propose: steps slow enough to act on a request mid-way."""

    def __init__(self, delay=0.004):
        super().__init__(name="slow")
        self.delay = delay

    def propose(self, seqs, budgets):
        time.sleep(self.delay)
        return [DraftTree([s.tokens[-1]], [-1]) for s in seqs]


class Boom(NgramDrafter):
    """A drafter that raises inside every step's propose (``where="propose"``) or when
    a request begins (``where="begin"``)."""

    def __init__(self, where="propose"):
        super().__init__(name="boom" if where == "propose" else f"boom_{where}")
        self.where = where

    def begin(self, seq, prompt_hidden):
        if self.where == "begin":
            raise RuntimeError("kaboom")
        super().begin(seq, prompt_hidden)

    def propose(self, seqs, budgets):
        if self.where == "propose":
            raise RuntimeError("kaboom")
        return super().propose(seqs, budgets)


def make_engine(tiny, **kw):
    kw.setdefault("cache_tokens", 4096)
    return specrt.Engine.from_pretrained(str(tiny), device="cpu", block_size=4,
                                         drafters=[NgramDrafter(), Sleepy(), Boom(), Boom("begin")],
                                         **kw)


@contextmanager
def running(engine, **cfg):
    s = BackgroundServer(engine, ServeConfig(port=0, model_name=MODEL, **cfg)).start()
    try:
        yield s
    finally:
        s.stop()


def client(s, key="none", **kw):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def offline(tiny_llama):
    """The offline engine and a cache of its greedy outputs."""
    eng = make_engine(tiny_llama)
    cache = {}

    def ref(prompt, n=N, chat=True, **sp):
        key = (prompt, n, chat, repr(sorted(sp.items())))
        if key not in cache:
            sp.setdefault("temperature", 0.0)
            cache[key] = eng.generate([prompt], SamplingParams(max_tokens=n, **sp),
                                      chat=chat)[0]
        return cache[key]

    return ref


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running(make_engine(tiny_llama, max_batch=16)) as s:
        yield s


def chat(c, prompt, n=N, stream=False, **kw):
    """(text, token ids, specrt field) of one chat request."""
    extra = {"specrt": {"token_ids": True, **kw.pop("specrt", {})}, **kw.pop("extra", {})}
    kw.setdefault("temperature", 0)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                  max_tokens=n, stream=stream, extra_body=extra, **kw)
    if not stream:
        return r.choices[0].message.content, r.model_extra["specrt"]["token_ids"], \
            r.model_extra["specrt"]
    text, ids, last = "", [], None
    for ch in r:
        if ch.choices and ch.choices[0].delta.content:
            text += ch.choices[0].delta.content
        spec = (ch.model_extra or {}).get("specrt")
        if spec and ch.choices and ch.choices[0].finish_reason is None:
            ids += spec["token_ids"]
        last = ch
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.model_extra["specrt"]["token_ids"] == ids
    return text, ids, last.model_extra["specrt"]


def complete(c, prompt, n=N, stream=False, **kw):
    """(text, token ids) of one completion request."""
    kw.setdefault("temperature", 0)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stream=stream,
                             extra_body={"specrt": {"token_ids": True}}, **kw)
    if not stream:
        return r.choices[0].text, r.model_extra["specrt"]["token_ids"]
    text, last = "", None
    for ch in r:
        text += ch.choices[0].text
        last = ch
    return text, last.model_extra["specrt"]["token_ids"]


def metrics(s) -> dict:
    """The server's /metrics as {sample name with labels: value}."""
    out = {}
    for line in httpx.get(s.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            out[name] = float(v)
    return out


def wait_all_free(s, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(s)
        if (m["specrt_kv_blocks_free"] == m["specrt_kv_blocks_total"]
                and m["specrt_running_requests"] == 0 and m["specrt_queue_depth"] == 0):
            return m
        assert time.monotonic() < deadline, f"KV blocks still held: {m}"
        time.sleep(0.02)


def post(s, body=None, path="/v1/chat/completions", **kw):
    return httpx.post(s.url + path, json=body, timeout=30, **kw) if body is not None \
        else httpx.post(s.url + path, timeout=30, **kw)


def assert_error(r, status, param=None, fragment=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    if fragment:
        assert fragment in err["message"], err
    assert "Traceback" not in r.text and 'File "' not in r.text
    return err


PROMPTS = ["hello hello hello", "abcabcabc", "The quick brown fox", "zz top", "tiny tim"]


# ------------------------------------------------------------------ correctness
def test_chat_and_completions_equal_offline_engine(server, offline):
    c = client(server)
    for p in PROMPTS:
        ref = offline(p)
        text, ids, spec = chat(c, p)
        assert ids == ref.token_ids and text == ref.text
        stext, sids, _ = chat(c, p, stream=True)
        assert stext == text and sids == ids
        for key in ("drafter", "cluster", "acceptance_rate", "mean_accepted_length",
                    "drafted_tokens", "accepted_tokens"):
            assert key in spec
        assert spec["drafter"] == "ngram" and spec["completion_tokens"] == len(ids)
        cref = offline(p, chat=False)
        ctext, cids = complete(c, p)
        assert cids == cref.token_ids and ctext == cref.text
        assert complete(c, p, stream=True) == (ctext, cids)


def test_usage_models_health_and_metrics(server):
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "be"},
                                                         {"role": "user", "content": "hi"}],
                                  max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                    "content": "hi"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 5
    assert [m.id for m in c.models.list()] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    raw = httpx.get(server.url + "/metrics")
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/plain")
    m = metrics(server)
    for name in ("specrt_queue_depth", "specrt_running_requests", "specrt_kv_blocks_used",
                 "specrt_kv_blocks_free", "specrt_prompt_tokens_total",
                 "specrt_completion_tokens_total", "specrt_step_seconds_count"):
        assert name in m, name
    assert m['specrt_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 2
    assert m['specrt_drafted_tokens_total{drafter="ngram"}'] >= 0
    assert m['specrt_mean_accepted_length{drafter="ngram"}'] >= 1.0


def test_specrt_extension_forces_drafter_or_plain_and_seeded_sampling(server, offline):
    c = client(server)
    p = PROMPTS[0]
    ref = offline(p)
    _, ids, spec = chat(c, p, specrt={"speculative": False})
    assert ids == ref.token_ids and spec["drafter"] is None and spec["drafted_tokens"] == 0
    _, ids, spec = chat(c, p, specrt={"drafter": "slow"})
    assert ids == ref.token_ids and spec["drafter"] == "slow"
    r = post(server, {"model": MODEL, "messages": [{"role": "user", "content": p}],
                      "specrt": {"drafter": "nope"}})
    assert_error(r, 400, "specrt.drafter", "unknown drafter")
    # seeded sampling (top_k is an extension) reproduces the offline engine's draw
    kw = dict(temperature=0.9, top_p=0.95, seed=7, extra={"top_k": 20})
    sref = offline(p, temperature=0.9, top_p=0.95, seed=7, top_k=20)
    assert chat(c, p, **kw)[1] == sref.token_ids
    assert chat(c, p, stream=True, **kw)[1] == sref.token_ids


def test_stop_strings(server, offline):
    c = client(server)
    p = PROMPTS[2]
    full = offline(p, n=16).text
    stop = full[5:7]
    ref = offline(p, n=16, stop=[stop])
    assert ref.finish_reason == "stop" and stop not in ref.text
    for stream in (False, True):
        text, ids, _ = chat(c, p, n=16, stream=stream, stop=stop)
        assert (text, ids) == (ref.text, ref.token_ids)
    assert complete(c, p, n=16, stop=[stop, "\x7f"])[0] == offline(p, n=16, chat=False,
                                                                   stop=[stop, "\x7f"]).text


def test_requests_join_the_running_batch(server, offline):
    """A request sent while a long one runs is admitted at the next step and finishes
    first (continuous batching across requests, not per call)."""
    c = client(server)
    long_p, short_p = "long one: ", PROMPTS[1]
    got = {}

    def long_request():
        got["long"] = chat(c, long_p, n=120, specrt={"drafter": "slow"}, stream=True)
        got["long_done"] = time.monotonic()

    t = threading.Thread(target=long_request)
    before = metrics(server)
    t.start()
    time.sleep(0.15)
    assert "long" not in got, "the long request finished too early to overlap"
    got["short"] = chat(c, short_p)
    short_done = time.monotonic()
    t.join(30)
    assert short_done < got["long_done"]
    assert got["short"][1] == offline(short_p).token_ids
    assert got["long"][1] == offline(long_p, n=120).token_ids
    after = metrics(server)
    multi = [m["specrt_batch_size_count"] - m['specrt_batch_size_bucket{le="1.0"}']
             for m in (before, after)]
    assert multi[1] - multi[0] >= 2          # steps that ran both requests


# ------------------------------------------------------------------------ load
def _load_prompt(i):
    return f"req {i}: " + "ab" * (i % 5) + "xyz"[: i % 3]


def _one(c, i, deadline):
    """One request of the load run: ('ok', i, ids) or ('429', i, retry-after)."""
    kind = i % 4
    try:
        if kind in (0, 1):
            return "ok", i, chat(c, _load_prompt(i), stream=kind == 1)[1]
        return "ok", i, complete(c, _load_prompt(i), stream=kind == 3)[1]
    except openai.RateLimitError as e:
        assert e.response.json()["error"]["code"] == "queue_full"
        return "429", i, e.response.headers.get("retry-after")
    finally:
        assert time.monotonic() < deadline, f"request {i} missed its deadline"


def test_bounded_load(tiny_llama, offline):
    """48 requests at concurrency 12 against a batch of 4 and a queue of 4: every
    request answered once, 200 (equal to the offline engine) or 429 with Retry-After;
    the server's counts agree; every KV block is free afterwards."""
    eng = make_engine(tiny_llama, max_batch=4)
    with running(eng, max_queue=4) as s:
        c = client(s)
        deadline = time.monotonic() + 45
        with ThreadPoolExecutor(12) as ex:
            res = list(ex.map(lambda i: _one(c, i, deadline), range(48)))
        assert sorted(r[1] for r in res) == list(range(48))       # none lost or twice
        ok = [r for r in res if r[0] == "ok"]
        rejected = [r for r in res if r[0] == "429"]
        assert len(ok) + len(rejected) == 48 and len(ok) >= 8
        assert all(r[2] == "1" for r in rejected)
        for _, i, ids in ok:
            assert ids == offline(_load_prompt(i), chat=i % 4 < 2).token_ids, i
        m = wait_all_free(s)
        served = sum(v for k, v in m.items() if k.startswith("specrt_requests_total")
                     and 'status="200"' in k)
        limited = sum(v for k, v in m.items() if k.startswith("specrt_requests_total")
                      and 'status="429"' in k)
        assert (served, limited) == (len(ok), len(rejected))


def test_malformed_request_in_a_load_run_fails_alone(server, offline):
    c = client(server)
    bad = {}

    def send_bad():
        time.sleep(0.02)
        bad["r"] = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                 "max_tokens": "ten"})

    t = threading.Thread(target=send_bad)
    t.start()
    with ThreadPoolExecutor(6) as ex:
        res = list(ex.map(lambda i: chat(c, _load_prompt(i), specrt={"drafter": "slow"}),
                          range(12)))
    t.join(30)
    assert_error(bad["r"], 400, "max_tokens")
    for i, (_, ids, _) in enumerate(res):
        assert ids == offline(_load_prompt(i)).token_ids
    wait_all_free(server)


# ---------------------------------------------------------------------- faults
def test_cancelled_streams_free_their_blocks(server, offline):
    """20 streams closed mid-way (the connection dropped) are aborted in the engine:
    every KV block is free again and later outputs are unchanged."""
    c = client(server)
    before = metrics(server)
    key = 'specrt_requests_total{endpoint="/v1/chat/completions",status="499"}'

    def cancel(i):
        stream = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": _load_prompt(i)}],
            max_tokens=200, temperature=0, stream=True, extra_body={"specrt":
                                                                    {"drafter": "slow"}})
        it = iter(stream)
        for _ in range(1 + i % 3):
            next(it)
        stream.close()

    with ThreadPoolExecutor(10) as ex:
        list(ex.map(cancel, range(20)))
    m = wait_all_free(server)
    assert m.get(key, 0) - before.get(key, 0) == 20
    for p in PROMPTS[:3]:
        assert chat(client(server), p)[1] == offline(p).token_ids


def test_failing_drafter_fails_only_its_requests(server, offline):
    c = client(server)
    out = {}

    def good(i):
        out[i] = chat(c, _load_prompt(i), specrt={"drafter": "slow"})[1]

    threads = [threading.Thread(target=good, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    with pytest.raises(openai.InternalServerError) as e:
        chat(c, PROMPTS[0], specrt={"drafter": "boom"})
    err = e.value.response.json()["error"]
    assert e.value.status_code == 500 and err["code"] == "drafter_error"
    assert "drafter 'boom' failed in propose" in err["message"] and "kaboom" in err["message"]
    with pytest.raises(openai.APIError, match="drafter 'boom' failed in propose"):
        chat(c, PROMPTS[1], stream=True, specrt={"drafter": "boom"})   # an error event
    with pytest.raises(openai.InternalServerError, match="'boom_begin' failed in begin"):
        chat(c, PROMPTS[1], stream=True, specrt={"drafter": "boom_begin"})  # before headers
    for t in threads:
        t.join(30)
    assert [out[i] for i in range(4)] == [offline(_load_prompt(i)).token_ids
                                          for i in range(4)]
    assert chat(c, PROMPTS[0])[1] == offline(PROMPTS[0]).token_ids   # still serving
    wait_all_free(server)


def test_internal_error_is_a_clean_500(tiny_llama, monkeypatch):
    with running(make_engine(tiny_llama)) as s:
        def broken(job):
            raise KeyError("secret internals")

        monkeypatch.setattr(s.loop, "submit", broken)
        r = post(s, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        err = assert_error(r, 500, None)
        assert err["type"] == "server_error" and "secret" not in r.text


# ------------------------------------------------------------------- bad input
def _msgs(content="hello"):
    return [{"role": "user", "content": content}]


BAD_CHAT = {
    "prompt_over_context": ({"messages": _msgs("x" * 400)}, "messages", "limit is"),
    "max_tokens_over_cap": ({"messages": _msgs(), "max_tokens": 5000}, "max_tokens", "cap"),
    "max_completion_tokens_over_cap": ({"messages": _msgs(), "max_completion_tokens": 5000},
                                       "max_completion_tokens", "cap"),
    "n_above_1": ({"messages": _msgs(), "n": 2}, "n", "n = 1"),
    "wrong_type_max_tokens": ({"messages": _msgs(), "max_tokens": "ten"}, "max_tokens",
                              "integer"),
    "wrong_type_stream": ({"messages": _msgs(), "stream": "yes"}, "stream", "boolean"),
    "wrong_type_content": ({"messages": [{"role": "user", "content": 5}]},
                           "messages[0].content", None),
    "temperature_too_high": ({"messages": _msgs(), "temperature": 2.5}, "temperature", None),
    "temperature_negative": ({"messages": _msgs(), "temperature": -0.1}, "temperature", None),
    "temperature_wrong_type": ({"messages": _msgs(), "temperature": "hot"}, "temperature",
                               "number"),
    "top_p_zero": ({"messages": _msgs(), "top_p": 0}, "top_p", None),
    "top_p_above_1": ({"messages": _msgs(), "top_p": 1.5}, "top_p", None),
    "top_k_negative": ({"messages": _msgs(), "top_k": -1}, "top_k", None),
    "logprobs": ({"messages": _msgs(), "logprobs": True}, "logprobs", "not supported"),
    "empty_messages": ({"messages": []}, "messages", "non-empty"),
    "missing_messages": ({}, "messages", "Missing"),
    "role_tool": ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
                  "system, user, assistant"),
    "unknown_field": ({"messages": _msgs(), "temprature": 0}, "temprature", "Unrecognized"),
    "empty_stop": ({"messages": _msgs(), "stop": [""]}, "stop", None),
    "seed_negative": ({"messages": _msgs(), "seed": -1}, "seed", None),
    "bad_extension": ({"messages": _msgs(), "specrt": {"drafter": 3}}, "specrt.drafter", None),
}


@pytest.mark.parametrize("case", sorted(BAD_CHAT))
def test_bad_chat_request(server, case):
    body, param, fragment = BAD_CHAT[case]
    assert_error(post(server, {"model": MODEL, **body}), 400, param, fragment)


BAD_COMPLETION = {
    "prompt_over_context": ({"prompt": "y" * 400}, "prompt", "limit is"),
    "empty_prompt": ({"prompt": ""}, "prompt", "empty"),
    "logprobs": ({"prompt": "a", "logprobs": 2}, "logprobs", "not supported"),
    "several_prompts": ({"prompt": ["a", "b"]}, "prompt", "one prompt"),
    "token_id_out_of_range": ({"prompt": [1, 5000]}, "prompt", "token ids"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMPLETION))
def test_bad_completion_request(server, case):
    body, param, fragment = BAD_COMPLETION[case]
    assert_error(post(server, {"model": MODEL, **body}, "/v1/completions"), 400, param,
                 fragment)


def test_request_larger_than_the_kv_cache(tiny_llama):
    """prompt + max_tokens beyond the whole cache (here 128 tokens, the context 256):
    a 400 naming max_tokens, not a failed engine step."""
    with running(make_engine(tiny_llama, cache_tokens=128)) as s:
        err = assert_error(post(s, {"model": MODEL, "messages": _msgs(), "max_tokens": 200}),
                           400, "max_tokens", "KV cache")
        assert "at most" in err["message"]
        assert chat(client(s), "hi", n=50)[0]


def test_unknown_model_is_404(server):
    err = assert_error(post(server, {"model": "gpt-9", "messages": _msgs()}), 404, "model")
    assert err["code"] == "model_not_found"


def test_non_json_body(server):
    r = post(server, content=b"{not json", headers={"content-type": "application/json"})
    assert assert_error(r, 400)["code"] == "invalid_json"
    r = post(server, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert assert_error(r, 400)["code"] == "invalid_json"
    r = post(server, content=b'{"messages": NaN}', headers={"content-type": "application/json"})
    assert assert_error(r, 400)["code"] == "invalid_json"


def test_wrong_content_type(server):
    r = post(server, content=b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}]}',
             headers={"content-type": "text/plain"})
    assert assert_error(r, 400, None, "application/json")["code"] == "unsupported_content_type"


def test_ten_megabyte_body_is_413(server):
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}'
    r = post(server, content=body, headers={"content-type": "application/json"})
    assert assert_error(r, 413)["code"] == "request_too_large"
    assert chat(client(server), PROMPTS[0])[0]          # the server is fine afterwards


def test_unknown_route_is_an_error_object(server):
    assert_error(httpx.get(server.url + "/v1/nope"), 404)


def test_api_key(tiny_llama):
    with running(make_engine(tiny_llama), api_key="s3cret") as s:
        r = post(s, {"model": MODEL, "messages": _msgs()})
        assert assert_error(r, 401)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        r = post(s, {"model": MODEL, "messages": _msgs()},
                 headers={"Authorization": "Bearer wrong"})
        assert_error(r, 401, None, "Incorrect API key")
        with pytest.raises(openai.AuthenticationError):
            client(s, key="nope").models.list()
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200   # probes need no key
        assert chat(client(s, key="s3cret"), "hi")[0]


def test_full_queue_is_429_with_retry_after(tiny_llama):
    with running(make_engine(tiny_llama, max_batch=1), max_queue=0, retry_after=2) as s:
        c = client(s)
        first = c.chat.completions.create(model=MODEL, messages=_msgs(), max_tokens=150,
                                          temperature=0, stream=True,
                                          extra_body={"specrt": {"drafter": "slow"}})
        it = iter(first)
        next(it)                                   # the only slot is taken
        r = post(s, {"model": MODEL, "messages": _msgs()})
        err = assert_error(r, 429, None, "capacity")
        assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "2"
        m = metrics(s)
        assert m["specrt_running_requests"] == 1
        first.close()
        wait_all_free(s)
        assert chat(c, "hi")[0]                    # a slot again


# ------------------------------------------------------------ shutdown, signals
def test_drain_lets_running_requests_finish(tiny_llama, offline):
    eng = make_engine(tiny_llama)
    s = BackgroundServer(eng, ServeConfig(port=0, model_name=MODEL, drain_timeout=20)).start()
    try:
        c = client(s)
        streams = [c.chat.completions.create(
            model=MODEL, messages=_msgs(f"drain {i}"), max_tokens=60, temperature=0,
            stream=True, extra_body={"specrt": {"drafter": "slow", "token_ids": True}})
            for i in range(3)]
        its = [iter(x) for x in streams]
        firsts = [next(it) for it in its]
        s.drain()
        texts = []
        for first, it in zip(firsts, its):
            texts.append("".join(ch.choices[0].delta.content or "" for ch in [first, *it]
                                 if ch.choices))
        assert texts == [offline(f"drain {i}", n=60).text for i in range(3)]
        assert s.join(20)
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health")
        assert eng.cache.allocator.num_free == eng.cache.allocator.num_blocks
        assert not s.loop.alive
    finally:
        s.stop()


def test_drain_deadline_aborts_what_is_left(tiny_llama):
    eng = make_engine(tiny_llama)
    eng.drafters["slow"].delay = 0.02
    s = BackgroundServer(eng, ServeConfig(port=0, model_name=MODEL, drain_timeout=0.3)).start()
    try:
        stream = client(s).chat.completions.create(
            model=MODEL, messages=_msgs(), max_tokens=200, temperature=0, stream=True,
            extra_body={"specrt": {"drafter": "slow"}})
        it = iter(stream)
        next(it)
        t0 = time.monotonic()
        s.drain()
        assert s.join(10) and time.monotonic() - t0 < 5
        assert eng.cache.allocator.num_free == eng.cache.allocator.num_blocks
        assert not eng.has_unfinished()
        stream.close()
    finally:
        eng.drafters["slow"].delay = 0.004
        s.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_specrt_serve_exits_0_on_signal(tiny_llama, sig):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECRT_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "specrt.cli", "serve", "--target",
                             str(tiny_llama), "--device", "cpu", "--port", "0",
                             "--cache-tokens", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=str(ROOT))
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "ready at" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            line = proc.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line).group(1)
        name = Path(str(tiny_llama)).name
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=30)
        r = c.completions.create(model=name, prompt="abc", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(sig)
        assert proc.wait(20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -------------------------------------------------- adaptive speculation, load
def test_adaptive_budget_turns_drafting_down_as_the_batch_grows():
    """Goodput rule (SmartSpec) with a CPU-like cost (a forward costs the same up to 5
    tokens, then grows with every token): at batch 1 a good drafter drafts 4; as the
    batch grows the per-request share of the fixed cost shrinks while each drafted token
    still costs, so the budget falls and is 0 from batch 6 on. With a GPU-like cost
    (flat up to 256 tokens) the same request keeps drafting at batch 16."""
    cpu = LengthController(max_draft=6)
    for n in range(1, 12):
        t = 0.06 if n <= 5 else 0.06 * (1 + 0.25 * (n - 5))
        cpu.observe_forward(n, t)
        cpu.observe_forward(n, t)
    for a in (0.6, 0.8):
        ks = [cpu.budget("d", cpu.track(f"{a}:{b}", hits=100 * a, trials=100), batch=b,
                         remaining=64) for b in (1, 2, 3, 4, 6, 8, 16)]
        assert ks[0] == 4 and ks == sorted(ks, reverse=True) and ks[-3:] == [0] * 3, (a, ks)
    gpu = LengthController(max_draft=6)
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        gpu.observe_forward(n, 0.01)
        gpu.observe_forward(n, 0.01)
    assert gpu.budget("d", gpu.track("g", hits=80, trials=100), batch=16, remaining=64) == 6


def test_adaptive_budget_stays_off_beyond_the_measured_costs():
    c = LengthController(max_draft=6)
    for n in range(1, 130):                 # measured up to 129 tokens: linear past 5
        t = 0.06 if n <= 5 else 0.06 * (1 + 0.25 * (n - 5))
        c.observe_forward(n, t)
        c.observe_forward(n, t)
    # batch 32 x 7 tokens = 224 > 129: the true cost per request is ~0.015 (k+1), so
    # E(k)/cost(k) falls with k and k = 0 is best; the rule picks 6
    assert c.budget("d", c.track("r", hits=90, trials=100), batch=32, remaining=64) == 0
