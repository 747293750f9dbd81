"""The HTTP contract of ``POST /predictions/jai``: request parsing and response bodies.

Independent of TorchServe so that tests, the handler and the client share one definition.
Request: the seed's ``prompt``, ``max_tokens``, ``temperature``, ``top_k``; plus ``top_p``, ``seed``,
``stop``, ``mode`` (generate | chat) and ``stream``. Response: the seed's ``prompt``, ``generated``,
``full_text``, plus ``finish_reason`` and ``usage``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .sampling import ParameterError, SamplingParams

CHAT_TEMPLATE = "[QUESTION]\n{prompt}\n[/QUESTION]\n\n[ANSWER]\n"  # the seed's /chat wrapping
CHAT_STOP = "[/ANSWER]"
MODES = ("generate", "chat")
FIELDS = ("prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "mode", "stream")


class InvalidRequest(ValueError):
    """A request the server refuses with HTTP 400; ``str()`` is ``"<field>: <what is wrong>"``."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class Defaults:
    """Values for fields a request leaves out (model-config.yaml ``handler:`` block)."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float = 1.0
    max_prompt_chars: int = 32_768  # refuse before tokenizing: a cheap guard against huge bodies


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # the text the model continues (chat mode: wrapped), echoed as the seed did
    params: SamplingParams
    mode: str = "generate"
    stream: bool = False


def parse_request(body, defaults: Defaults = Defaults()) -> GenerationRequest:
    """Validate one request body (raw bytes, or JSON already decoded) into a GenerationRequest."""
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
        raise InvalidRequest("body", 'is empty; send a JSON object like {"prompt": "..."}')
    if not isinstance(body, dict):
        raise InvalidRequest("body", f"must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"is not a known field (known: {', '.join(FIELDS)})")

    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("prompt", "is required")
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt", f"must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InvalidRequest("prompt", "must not be empty")
    if len(prompt) > defaults.max_prompt_chars:
        raise InvalidRequest(
            "prompt", f"is {len(prompt)} characters, longer than the limit of {defaults.max_prompt_chars}"
        )
    mode = body.get("mode", "generate")
    if mode not in MODES:
        raise InvalidRequest("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream", f"must be true or false, got {stream!r}")

    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if mode == "chat":
        prompt = CHAT_TEMPLATE.format(prompt=prompt)
        stop = (*stop, CHAT_STOP) if isinstance(stop, (list, tuple)) else stop
    try:
        params = SamplingParams(
            max_tokens=body.get("max_tokens", defaults.max_tokens),
            temperature=body.get("temperature", defaults.temperature),
            top_k=body.get("top_k", defaults.top_k),
            top_p=body.get("top_p", defaults.top_p),
            seed=body.get("seed"),
            stop=stop,
        )
    except ParameterError as exc:
        raise InvalidRequest(exc.field, exc.problem) from None
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


def error_body(code: int, message: str, kind: str = "InvalidRequest") -> dict:
    return {"code": code, "type": kind, "message": message}
