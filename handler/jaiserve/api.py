"""The HTTP contract: how a request body becomes engine requests, and how their steps become a response.

Two views of one pipeline, picked by TorchServe's ``url_path`` header (routes.py):
- native, ``POST /predictions/jai`` (this module): the seed's ``prompt``, ``max_tokens``,
  ``temperature``, ``top_k``; plus ``top_p``, ``seed``, ``stop``, ``mode`` (generate | chat) and
  ``stream``. Response: the seed's ``prompt``, ``generated``, ``full_text``, plus ``finish_reason`` and
  ``usage``; streamed as NDJSON lines. The seed's own paths, which the front door on :8000
  (deploy/nginx/jai.conf) maps to ``/predictions/jai/<version>/<path>``: ``generate`` (the same),
  ``chat`` (chat mode by default) and ``health`` (the seed's health body, answered by a worker).
- OpenAI, ``/predictions/jai/<version>/v1/...`` (openai_api.py, built on this module): models,
  completions, chat/completions, streamed as server-sent events.

Either way a call is parsed into an :class:`Exchange`: its engine requests (one per choice: OpenAI's ``n``
and a list of prompts fan out) and the state that turns those requests' step outputs into stream
chunks and a final body. The handler runs every exchange through the same engine, batching, limits,
metrics and logs. Independent of TorchServe, so tests, the handler and the client share one definition.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from .sampling import ParameterError, SamplingParams

CHAT_TEMPLATE = "[QUESTION]\n{prompt}\n[/QUESTION]\n\n[ANSWER]\n"  # the seed's /chat wrapping
CHAT_STOP = "[/ANSWER]"
MODES = ("generate", "chat")
FIELDS = ("prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "mode", "stream")
JSON = "application/json"
NDJSON = "application/x-ndjson"


class InvalidRequest(ValueError):
    """A request the server refuses (400, or 404 for an unknown path). ``str()`` is
    ``"<field>: <what is wrong>"``, or just the problem when no field is at fault."""

    def __init__(self, field: str | None, problem: str, status: int = 400, code: str | None = None):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem
        self.status = status
        self.code = code  # OpenAI's machine-readable error code (e.g. "model_not_found"), if any

    @classmethod
    def from_parameter(cls, exc: ParameterError) -> InvalidRequest:
        """The engine's and SamplingParams' refusals (limits, ranges) as a 400."""
        return cls(exc.field, exc.problem)


def reason_phrase(status: int) -> str:
    return HTTPStatus(status).phrase


@dataclass(frozen=True)
class Defaults:
    """Values for fields a request leaves out (model-config.yaml ``handler:`` block)."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float = 1.0
    max_prompt_chars: int = 32_768  # refuse before tokenizing: a cheap guard against huge bodies
    max_choices: int = 8  # engine requests one call may fan out to (OpenAI n x prompts)


@dataclass(frozen=True)
class ServedModel:
    """What the OpenAI view needs to know about the model being served."""

    name: str = "jai"  # TorchServe's model name: OpenAI's ``model``
    created: int = 0  # Unix time the worker loaded it (OpenAI's model ``created``)
    context_tokens: int = 256  # block_size: chat history is cut to fit it
    count_tokens: Callable[[str], int] = len  # the tokenizer's count (len() only in tests without one)
    version: str = ""  # the checkpoint new requests go to (jaiserve/updates.py): in every answer ("" = none)
    device: str = "cpu"  # where the worker's engine runs (the seed's /health "device")


@dataclass(frozen=True)
class GenerationRequest:
    """One engine request: the text the model continues and how to sample it."""

    prompt: str  # the text the model continues (chat: wrapped), echoed as the seed did
    params: SamplingParams
    mode: str = "generate"
    stream: bool = False


@dataclass
class Choice:
    """What the engine has produced so far for one engine request of an exchange."""

    text: str = ""  # generated text; step pieces never split a character
    unsent: str = ""  # text not yet in a stream chunk
    unsent_ids: list[int] = field(default_factory=list)  # tokens not yet in a stream chunk
    steps: int = 0  # engine steps that produced a token for it
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def absorb(self, out) -> None:
        """Take one engine step's output (jaiserve.engine.StepOutput)."""
        self.steps += 1
        self.text += out.text
        self.unsent += out.text
        self.unsent_ids += out.token_ids
        self.finish_reason = out.finish_reason
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens

    def take(self) -> tuple[str, list[int]]:
        """The text and tokens not yet streamed, now marked as streamed."""
        text, ids = self.unsent, self.unsent_ids
        self.unsent, self.unsent_ids = "", []
        return text, ids


class Exchange:
    """One HTTP call in flight: its engine requests and the response built from their steps.

    The handler adds each engine request's step output with :meth:`add` (``index`` = position in
    ``requests``); while streaming it sends :meth:`chunk` whenever that is not empty, and once
    :attr:`finished` it answers :meth:`final`. A call answered without the engine (a model list) has no
    requests and is finished from the start.
    """

    content_type = JSON

    def __init__(self, requests: list[GenerationRequest], stream: bool = False):
        self.requests = tuple(requests)
        self.stream = stream
        self.choices = [Choice() for _ in self.requests]

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def add(self, index: int, out) -> None:
        self.choices[index].absorb(out)

    def chunk(self) -> str:
        """What to stream now ("" = nothing: not streaming, or a character still incomplete)."""
        return ""

    def final(self) -> str:
        """The complete body, or a stream's last chunk."""
        raise NotImplementedError

    def failure(self, status: int, message: str, streaming: bool) -> str:
        """An error for this call (``streaming``: after chunks have gone out with status 200)."""
        raise NotImplementedError


class Answer(Exchange):
    """A call answered without the engine: a model list, a health check."""

    def __init__(self, body: dict):
        super().__init__([])
        self.body = body

    def final(self) -> str:
        return dumps(self.body)


class Route:
    """How one ``url_path`` reads requests and writes refusals."""

    def parse(self, body, request_id: str, defaults: Defaults, model: ServedModel) -> Exchange:
        raise NotImplementedError

    def refusal(self, exc: InvalidRequest) -> str:
        """The body of a complete error response (status ``exc.status``) in this route's shape."""
        raise NotImplementedError


# ----- the native view -----


def decode_body(body, example: str = '{"prompt": "..."}') -> dict:
    """The request body as JSON (raw bytes, or JSON TorchServe already decoded), refused if not an object."""
    if isinstance(body, (bytes, bytearray)):  # raw: TorchServe decodes only valid JSON bodies itself
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("body", "is not UTF-8 text") from None
        try:
            body = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as exc:
            raise InvalidRequest("body", f"is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if body is None:
        raise InvalidRequest("body", f"is empty; send a JSON object like {example}")
    if not isinstance(body, dict):
        raise InvalidRequest("body", f"must be a JSON object, got {type(body).__name__}")
    return body


def check_prompt(prompt, field: str, defaults: Defaults) -> str:
    if prompt is None:
        raise InvalidRequest(field, "is required")
    if not isinstance(prompt, str):
        raise InvalidRequest(field, f"must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InvalidRequest(field, "must not be empty")
    if len(prompt) > defaults.max_prompt_chars:
        raise InvalidRequest(
            field, f"is {len(prompt)} characters, longer than the limit of {defaults.max_prompt_chars}"
        )
    return prompt


def sampling_params(**values) -> SamplingParams:
    try:
        return SamplingParams(**values)
    except ParameterError as exc:
        raise InvalidRequest.from_parameter(exc) from None


def parse_request(body, defaults: Defaults = Defaults(), path_mode: str | None = None) -> GenerationRequest:
    """Validate one native request body into a GenerationRequest.

    ``path_mode``: the mode the path sets (the seed's ``/chat``: "chat"); ``mode``, if sent, must agree.
    """
    body = decode_body(body)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"is not a known field (known: {', '.join(FIELDS)})")
    prompt = check_prompt(body.get("prompt"), "prompt", defaults)
    mode = body.get("mode", path_mode or "generate")
    if mode not in MODES:
        raise InvalidRequest("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    if path_mode is not None and mode != path_mode:
        raise InvalidRequest("mode", f"is {path_mode!r} on /{path_mode} (leave it out), got {mode!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream", f"must be true or false, got {stream!r}")

    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if mode == "chat":
        prompt = CHAT_TEMPLATE.format(prompt=prompt)
        stop = (*stop, CHAT_STOP) if isinstance(stop, (list, tuple)) else stop
    params = sampling_params(
        max_tokens=body.get("max_tokens", defaults.max_tokens),
        temperature=body.get("temperature", defaults.temperature),
        top_k=body.get("top_k", defaults.top_k),
        top_p=body.get("top_p", defaults.top_p),
        seed=body.get("seed"),
        stop=stop,
    )
    return GenerationRequest(prompt=prompt, params=params, mode=mode, stream=stream)


def completion_body(request: GenerationRequest, generated: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt": request.prompt,
        "generated": generated,
        "full_text": request.prompt + generated,
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }


ERROR_TYPES = {400: "InvalidRequest", 404: "NotFound", 500: "InternalServerError", 503: "Draining"}


def error_body(code: int, message: str, kind: str | None = None) -> dict:
    return {"code": code, "type": kind or ERROR_TYPES.get(code, reason_phrase(code)), "message": message}


class NativeExchange(Exchange):
    """``/predictions/jai``: one engine request; NDJSON lines ``{"text", "token_ids"}`` while streaming,
    then a last line (or the whole body) with the seed's fields."""

    def __init__(self, request: GenerationRequest, version: str = ""):
        super().__init__([request], request.stream)
        self.content_type = NDJSON if request.stream else JSON
        self.version = version

    def chunk(self) -> str:
        choice = self.choices[0]
        if not self.stream or not choice.unsent:
            return ""  # nothing to show yet (a split character, or a non-streamed request)
        text, ids = choice.take()
        return dumps({"text": text, "token_ids": ids}) + "\n"

    def final(self) -> str:
        choice = self.choices[0]
        body = completion_body(
            self.requests[0], choice.text, choice.finish_reason, choice.prompt_tokens, choice.completion_tokens
        )
        if self.version:  # which checkpoint answered (docs/updates.md)
            body["model_version"] = self.version
        if not self.stream:
            return dumps(body)
        text, ids = choice.take()
        return dumps({"text": text, "token_ids": ids, **body}) + "\n"

    def failure(self, status: int, message: str, streaming: bool) -> str:
        if streaming:  # a last NDJSON line: no "text", and why the stream ended (as when a worker dies)
            return dumps({**error_body(status, message), "finish_reason": "error"}) + "\n"
        return dumps(error_body(status, message))


SEED_PATHS = ("generate", "chat", "health")  # the seed's routes, as the front door passes them on


def health_body(model: ServedModel) -> dict:
    """The seed's ``GET /health`` body. A worker answers it, so the model is loaded; with no worker
    TorchServe itself answers 503, and a draining worker 503 Draining."""
    return {"status": "healthy", "model_loaded": True, "device": model.device}


class NativeRoute(Route):
    def __init__(self, path: str = ""):
        self.path = path

    def parse(self, body, request_id: str, defaults: Defaults, model: ServedModel) -> Exchange:
        if self.path == "health":  # TorchServe does not pass the method: GET or POST alike, body ignored
            return Answer(health_body(model))
        if self.path == "chat":
            return NativeExchange(parse_request(body, defaults, path_mode="chat"), model.version)
        if self.path not in ("", "generate"):
            raise InvalidRequest(
                None,
                f"no route {self.path!r} after /predictions/{model.name}/<version>/ (JAI's API is "
                f"POST /predictions/{model.name}, the seed's are .../<version>/{{{','.join(SEED_PATHS)}}}, "
                f"OpenAI's are under .../<version>/v1/)",
                status=404,
            )
        return NativeExchange(parse_request(body, defaults), model.version)

    def refusal(self, exc: InvalidRequest) -> str:
        return dumps(error_body(exc.status, str(exc)))


def dumps(body: dict) -> str:
    return json.dumps(body, ensure_ascii=False)
