"""OpenAI's wire format: request models (pydantic), their validation into a :class:`Job`,
the responses and stream chunks, and the error object.

Every client error is an :class:`APIError` whose body is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with ``param`` naming the field
(``messages[1].role``, ``max_tokens``, ``specrt.drafter``). Unknown fields are refused
(400, like OpenAI's "Unrecognized request argument"), so a misspelt parameter never
goes silently ignored.

Chat messages become token ids through the model's chat template when it has one;
without one the fallback is ``"<role>: <content>\\n"`` per message and then
``"assistant:"`` (after the tokenizer's BOS). A single user message renders exactly as
``Engine.generate(prompt, chat=True)`` renders ``prompt``.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specrt.sampling import SamplingParams

ROLES = ("system", "user", "assistant")

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
StrictStr = Annotated[str, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


class APIError(Exception):
    """An error for the client: HTTP ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error`` about ``param``."""
    return APIError(400, message, param=param, code=code)


# ------------------------------------------------------------------ request models
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpecrtOptions(_Model):
    """The ``specrt`` extension object of a request.

    ``drafter``: force this drafter (a name the engine has); ``speculative``: false
    decodes with the target alone; ``token_ids``: return the output token ids in the
    response's ``specrt`` field (and each stream chunk's); ``ignore_eos``: generate
    ``max_tokens`` tokens whatever the model says (benchmarks)."""

    drafter: Optional[StrictStr] = None
    speculative: StrictBool = True
    token_ids: StrictBool = False
    ignore_eos: StrictBool = False


class StreamOptions(_Model):
    include_usage: Optional[StrictBool] = None


class TextPart(_Model):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message; extra keys (``name``, ``refusal`` ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, List[TextPart], None] = None

    def text(self) -> str:
        """The message's text (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class _Common(_Model):
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[StrictFloat] = None
    top_p: Optional[StrictFloat] = None
    top_k: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    stop: Union[StrictStr, List[StrictStr], None] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[StrictInt] = 1
    presence_penalty: Optional[StrictFloat] = None
    frequency_penalty: Optional[StrictFloat] = None
    logit_bias: Optional[dict] = None
    user: Optional[StrictStr] = None
    specrt: Optional[SpecrtOptions] = None


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: List[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: Union[StrictStr, List[StrictInt], List[StrictStr]]
    logprobs: Optional[StrictInt] = None
    echo: Optional[StrictBool] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None


def _field_names(*models) -> set[str]:
    out: set[str] = set()
    for m in models:
        out |= set(m.model_fields)
    return out


_FIELDS = _field_names(ChatRequest, CompletionRequest, ChatMessage, SpecrtOptions,
                       StreamOptions, TextPart)


def _param(loc: tuple) -> str:
    """``("messages", 0, "role")`` -> ``"messages[0].role"`` (union branch tags such as
    ``str`` / ``list[str]`` dropped)."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif x in _FIELDS:
            out += f".{x}" if out else x
        else:
            break
    return out


def _validation_error(e: ValidationError) -> APIError:
    """The first error of ``e`` as a 400 naming its field."""
    errs = e.errors()
    for err in errs:  # an unknown field is the clearest thing to report
        if err["type"] == "extra_forbidden":
            name = ".".join(str(x) for x in err["loc"])
            return bad_request(f"Unrecognized request argument supplied: {name}", name,
                               "unknown_parameter")
    err = errs[0]
    param = _param(tuple(err["loc"])) or None
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param, "missing_parameter")
    if err["type"] == "literal_error" and param and param.endswith(".role"):
        return bad_request(f"{param}: role must be one of {', '.join(ROLES)}; got "
                           f"{err.get('input')!r}", param, "invalid_value")
    return bad_request(f"{param or 'body'}: {err['msg']}", param, "invalid_type"
                       if err["type"].endswith("_type") else "invalid_value")


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object (400 otherwise; NaN / Infinity refused)."""
    def _const(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_const)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}).",
                          None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    return data


# ------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """A validated request, ready for the engine loop.

    ``prompt``: text (completions) or a list of message dicts (chat) or token ids;
    ``chat``: whether ``prompt`` is a message list to render."""

    kind: str                     # "chat" | "completion"
    prompt: Any
    params: SamplingParams
    model: str
    chat: bool = False
    drafter: str | None = None
    speculative: bool = True
    stream: bool = False
    include_usage: bool = False
    token_ids: bool = False
    mt_param: str = "max_tokens"  # the field max_tokens came from
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_param(self) -> str:
        """The request field that holds the prompt."""
        return "messages" if self.kind == "chat" else "prompt"


def _sampling(req: _Common, max_tokens: int | None, cfg, mt_param: str) -> SamplingParams:
    """SamplingParams of a request, every range checked against OpenAI's and the cap."""
    if req.n not in (None, 1):
        raise bad_request("n: only n = 1 is supported", "n", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0.0):
            raise bad_request(f"{name}: only 0 is supported", name, "unsupported_value")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_value")
    cap = cfg.max_tokens_cap
    if max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, cap)
    elif max_tokens < 1:
        raise bad_request(f"{mt_param} must be >= 1, got {max_tokens}", mt_param,
                          "invalid_value")
    elif max_tokens > cap:
        raise bad_request(f"{mt_param} is {max_tokens}; this server's cap is {cap}",
                          mt_param, "invalid_value")
    t = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= t <= 2.0:
        raise bad_request(f"temperature must be in [0, 2], got {t}", "temperature",
                          "invalid_value")
    p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 < p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {p}", "top_p", "invalid_value")
    k = req.top_k or 0
    if k < 0:
        raise bad_request(f"top_k must be >= 0, got {k}", "top_k", "invalid_value")
    if req.seed is not None and not 0 <= req.seed < 2 ** 63:
        raise bad_request(f"seed must be in [0, 2^63), got {req.seed}", "seed", "invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16 or any(not s for s in stop):
        raise bad_request("stop: at most 16 non-empty strings", "stop", "invalid_value")
    return SamplingParams(max_tokens=max_tokens, temperature=t, top_k=k, top_p=p,
                          seed=req.seed, stop=stop,
                          ignore_eos=bool(req.specrt and req.specrt.ignore_eos))


def _job(kind: str, req: _Common, prompt, chat: bool, max_tokens, cfg,
         mt_param: str = "max_tokens") -> Job:
    if req.model is not None and req.model != cfg.model_name:
        raise APIError(404, f"The model '{req.model}' does not exist (this server serves "
                            f"'{cfg.model_name}')", param="model", code="model_not_found",
                       type="invalid_request_error")
    params = _sampling(req, max_tokens, cfg, mt_param)
    ext = req.specrt or SpecrtOptions()
    so = req.stream_options
    if so is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true",
                          "stream_options", "invalid_value")
    return Job(kind, prompt, params, cfg.model_name, chat=chat, drafter=ext.drafter,
               speculative=ext.speculative, stream=bool(req.stream),
               include_usage=bool(so and so.include_usage), token_ids=ext.token_ids,
               mt_param=mt_param)


def chat_job(data: dict, cfg) -> Job:
    """Validate a chat completion request (a parsed JSON object) into a :class:`Job`."""
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    if not req.messages:
        raise bad_request("messages must be a non-empty list", "messages", "invalid_value")
    if req.logprobs or req.top_logprobs:
        name = "logprobs" if req.logprobs else "top_logprobs"
        raise bad_request(f"{name} is not supported", name, "unsupported_value")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree",
                          "max_completion_tokens", "invalid_value")
    mt, mt_param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        mt, mt_param = req.max_completion_tokens, "max_completion_tokens"
    msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
    if not any(m["content"].strip() for m in msgs):
        raise bad_request("messages: every message is empty", "messages", "invalid_value")
    return _job("chat", req, msgs, True, mt, cfg, mt_param)


def completion_job(data: dict, cfg) -> Job:
    """Validate a completion request (a parsed JSON object) into a :class:`Job`."""
    try:
        req = CompletionRequest.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    if req.logprobs is not None:
        raise bad_request("logprobs is not supported", "logprobs", "unsupported_value")
    for name, ok in (("echo", not req.echo), ("best_of", req.best_of in (None, 1)),
                     ("suffix", not req.suffix)):
        if not ok:
            raise bad_request(f"{name} is not supported", name, "unsupported_value")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise bad_request("prompt: one prompt per request (a list of one string)",
                              "prompt", "unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str) and not prompt.strip():
        raise bad_request("prompt is empty", "prompt", "invalid_value")
    if isinstance(prompt, list) and not prompt:
        raise bad_request("prompt is empty", "prompt", "invalid_value")
    return _job("completion", req, prompt, False, req.max_tokens, cfg)


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a message list: the model's chat template (ending with the
    assistant's generation prompt), or the fallback ``"<role>: <content>\\n"`` per
    message then ``"assistant:"`` when the model has none."""
    if tokenizer.chat_template:
        return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer.encode(text)


def engine_error(e: ValueError, job: Job) -> APIError:
    """The engine's refusal of a request (``Engine.add_request``'s ``ValueError``) as a
    400 naming the field it is about."""
    msg = str(e)
    low = msg.lower()
    if low.startswith("unknown drafter"):
        param = "specrt.drafter"
    elif low.startswith("prompt") or "token ids" in low:
        param = job.prompt_param
        msg = msg.replace("prompt", job.prompt_param, 1) if job.kind == "chat" else msg
    else:
        param = next((f for f in ("max_tokens", "temperature", "top_k", "top_p", "stop")
                      if low.startswith(f)), None)
    return bad_request(msg, param, "invalid_value")


# -------------------------------------------------------------------- responses
def _usage(stats: dict) -> dict:
    p, c = int(stats.get("prompt_tokens", 0)), int(stats.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def spec_field(stats: dict, token_ids: list[int] | None = None) -> dict:
    """The ``specrt`` field of a response: the request's stats (drafter, cluster,
    acceptance_rate, mean_accepted_length, ...), plus ``token_ids`` when asked for."""
    out = dict(stats)
    if token_ids is not None:
        out["token_ids"] = list(token_ids)
    return out


def response(job: Job, out) -> dict:
    """The non-streamed response to ``job`` from its finished ``RequestOutput``."""
    tids = out.token_ids if job.token_ids else None
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "logprobs": None, "finish_reason": out.finish_reason}
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": out.text, "logprobs": None,
                  "finish_reason": out.finish_reason}
        obj, prefix = "text_completion", "cmpl-"
    return {"id": prefix + job.id, "object": obj, "created": job.created, "model": job.model,
            "choices": [choice], "usage": _usage(out.stats),
            "specrt": spec_field(out.stats, tids)}


def chunk(job: Job, text: str | None = None, *, role: bool = False,
          finish_reason: str | None = None, stats: dict | None = None,
          token_ids: list[int] | None = None, usage_only: bool = False) -> dict:
    """One stream chunk of ``job``: a text delta (``role`` adds the assistant role of
    the first chat chunk), or the last one (``finish_reason``, ``usage``, ``specrt``),
    or with ``usage_only`` the usage chunk of ``stream_options.include_usage``."""
    chat = job.kind == "chat"
    base = {"id": ("chatcmpl-" if chat else "cmpl-") + job.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": job.created, "model": job.model}
    if usage_only:
        return {**base, "choices": [], "usage": _usage(stats or {})}
    if chat:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
    out = {**base, "choices": [choice]}
    if stats is not None:
        out["usage"] = _usage(stats)
        out["specrt"] = spec_field(stats, token_ids)
    elif token_ids is not None:
        out["specrt"] = {"token_ids": list(token_ids)}
    return out


def sse(obj: dict | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (or ``data: [DONE]``)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
