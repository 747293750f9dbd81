"""OpenAI's API shapes over JAI: ``v1/models``, ``v1/completions`` and ``v1/chat/completions``.

The second view of the contract in api.py: an OpenAI body becomes engine requests (one per choice;
``n`` and a list of prompts fan out) and their steps become OpenAI's objects, or server-sent events
(``data: {chunk}\\n\\n`` per step, ``data: [DONE]\\n\\n`` last) when streaming. Fields left out take the
server's defaults (model-config.yaml ``handler.defaults``), as on the native route, not OpenAI's. A
parameter JAI cannot honour is refused with a 400 naming it, unless it carries its neutral value
(clients send some of those by default); an unknown one is refused too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .api import (
    CHAT_STOP,
    Answer,
    CHAT_TEMPLATE,
    JSON,
    Defaults,
    Exchange,
    GenerationRequest,
    InvalidRequest,
    Route,
    ServedModel,
    check_prompt,
    decode_body,
    dumps,
    sampling_params,
)

SSE = "text/event-stream; charset=utf-8"  # SSE is UTF-8 by definition; said so for generic HTTP clients
DONE = "data: [DONE]\n\n"
SEED_RANGE = 2**63  # SamplingParams' seed range: choice j of a prompt uses (seed + j) mod this

COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options",
          "n", "user")
COMPLETION_FIELDS = (*COMMON, "prompt", "echo")
CHAT_FIELDS = (*COMMON, "messages", "max_completion_tokens")


def _is_zero(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


# OpenAI parameters JAI cannot honour: (the values accepted because they ask for nothing, that test)
UNSUPPORTED: dict[str, tuple[str, Callable[[object], bool]]] = {
    "logprobs": ("null or false", lambda v: v is None or v is False),
    "top_logprobs": ("null or 0", _is_zero),
    "frequency_penalty": ("null or 0", _is_zero),
    "presence_penalty": ("null or 0", _is_zero),
    "logit_bias": ("null or {}", lambda v: v is None or v == {}),
    "suffix": ("null", lambda v: v is None),
    "best_of": ("null or 1", lambda v: v is None or (v == 1 and not isinstance(v, bool))),
    "tools": ("null or []", lambda v: v is None or v == []),
    "tool_choice": ('null or "none"', lambda v: v is None or v == "none"),
    "functions": ("null or []", lambda v: v is None or v == []),
    "function_call": ('null or "none"', lambda v: v is None or v == "none"),
    "parallel_tool_calls": ("null", lambda v: v is None),
    "response_format": ('null or {"type": "text"}', lambda v: v is None or v == {"type": "text"}),
    "store": ("null or false", lambda v: v is None or v is False),
    "metadata": ("null or {}", lambda v: v is None or v == {}),
    "modalities": ('null or ["text"]', lambda v: v is None or v == ["text"]),
    "audio": ("null", lambda v: v is None),
    "prediction": ("null", lambda v: v is None),
    "reasoning_effort": ("null", lambda v: v is None),
    "web_search_options": ("null", lambda v: v is None),
    "service_tier": ('null, "auto" or "default"', lambda v: v in (None, "auto", "default")),
}
COMPLETION_UNSUPPORTED = ("logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "suffix", "best_of")
CHAT_UNSUPPORTED = tuple(name for name in UNSUPPORTED if name not in ("suffix", "best_of"))

ROLES = ("system", "developer", "user", "assistant")


class OpenAIRoute(Route):
    def __init__(self, path: str):
        self.path = path  # "v1/..." without surrounding slashes

    def parse(self, body, request_id: str, defaults: Defaults, model: ServedModel) -> Exchange:
        if self.path == "v1/models":  # TorchServe does not pass the HTTP method: GET or POST alike
            return Answer({"object": "list", "data": [model_object(model)]})
        if self.path.startswith("v1/models/"):
            _check_model(self.path.removeprefix("v1/models/"), model)
            return Answer(model_object(model))
        if self.path == "v1/completions":
            return _completions(decode_body(body, EXAMPLES[self.path]), request_id, defaults, model)
        if self.path == "v1/chat/completions":
            return _chat(decode_body(body, EXAMPLES[self.path]), request_id, defaults, model)
        raise InvalidRequest(
            None, f"Unknown path /{self.path} (known: /v1/models, /v1/completions, /v1/chat/completions)", status=404
        )

    def refusal(self, exc: InvalidRequest) -> str:
        return dumps(error_body(exc.status, str(exc), exc.field, exc.code))


EXAMPLES = {
    "v1/completions": '{"model": "jai", "prompt": "..."}',
    "v1/chat/completions": '{"model": "jai", "messages": [{"role": "user", "content": "..."}]}',
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_object(model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "jaiserve"}


def event(body: dict) -> str:
    return f"data: {dumps(body)}\n\n"


# ----- requests -----


def _completions(body: dict, request_id: str, defaults: Defaults, model: ServedModel) -> Exchange:
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED)
    _check_model(body.get("model"), model)
    prompts = _prompts(body.get("prompt"), defaults)
    echo = _flag(body, "echo")
    n = _n(body, len(prompts), defaults)
    requests = _fan_out(body, prompts, n, defaults, stop=(), mode="generate")
    return CompletionExchange(requests, n, _stream(body), request_id, model, echo)


def _chat(body: dict, request_id: str, defaults: Defaults, model: ServedModel) -> Exchange:
    _check_fields(body, CHAT_FIELDS, CHAT_UNSUPPORTED)
    _check_model(body.get("model"), model)
    prompt = chat_prompt(body.get("messages"), defaults, model)
    n = _n(body, 1, defaults)
    requests = _fan_out(body, [prompt], n, defaults, stop=(CHAT_STOP,), mode="chat")
    return ChatExchange(requests, n, _stream(body), request_id, model)


def _check_fields(body: dict, known: tuple[str, ...], unsupported: tuple[str, ...]) -> None:
    for name in sorted(body):
        if name in unsupported:
            accepted, neutral = UNSUPPORTED[name]
            if not neutral(body[name]):
                raise InvalidRequest(
                    name, f"is not supported by JAI (accepted only as {accepted}), got {body[name]!r}",
                    code="unsupported_parameter",
                )
        elif name not in known:
            raise InvalidRequest(name, "is not a known parameter", code="unknown_parameter")
    if not isinstance(body.get("user", ""), str):  # an end-user id for the caller's own tracking; not used
        raise InvalidRequest("user", f"must be a string, got {body['user']!r}")


def _check_model(name, model: ServedModel) -> None:
    if name is None:
        raise InvalidRequest("model", f"is required (this server serves {model.name!r})")
    if name != model.name:
        raise InvalidRequest(
            "model", f"{name!r} does not exist (this server serves {model.name!r})", status=404,
            code="model_not_found",
        )


def _option(body: dict, name: str, default):
    """OpenAI treats an explicit null as left out."""
    value = body.get(name)
    return default if value is None else value


def _flag(body: dict, name: str) -> bool:
    value = _option(body, name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(name, f"must be true or false, got {value!r}")
    return value


def _n(body: dict, prompts: int, defaults: Defaults) -> int:
    n = _option(body, "n", 1)
    if not isinstance(n, int) or isinstance(n, bool):
        raise InvalidRequest("n", f"must be an integer, got {n!r}")
    if n < 1:
        raise InvalidRequest("n", f"must be >= 1, got {n}")
    if n * prompts > defaults.max_choices:
        raise InvalidRequest(
            "n", f"asks for {n * prompts} choices ({n} x {prompts} prompts), more than the limit of "
            f"{defaults.max_choices}"
        )
    return n


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise InvalidRequest("stream_options", "is only allowed when stream is true")
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options", f"must be an object, got {type(options).__name__}")
    if unknown := sorted(set(options) - {"include_usage"}):
        raise InvalidRequest(f"stream_options.{unknown[0]}", "is not supported (only include_usage is)")
    include_usage = _option(options, "include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidRequest("stream_options.include_usage", f"must be true or false, got {include_usage!r}")
    return stream, include_usage


def _prompts(prompt, defaults: Defaults) -> list[str]:
    if isinstance(prompt, list):
        if not prompt:
            raise InvalidRequest("prompt", "must not be an empty list")
        if not all(isinstance(p, str) for p in prompt):
            raise InvalidRequest("prompt", "must be a string or a list of strings (token id arrays are not supported)")
        return [check_prompt(p, f"prompt[{i}]", defaults) for i, p in enumerate(prompt)]
    return [check_prompt(prompt, "prompt", defaults)]


def _fan_out(body: dict, prompts: list[str], n: int, defaults: Defaults, stop: tuple[str, ...], mode: str):
    """One engine request per choice, prompt-major (OpenAI's choice index = prompt * n + j). With a seed,
    choice j of every prompt uses seed + j: the n choices differ, and a prompt's choices do not depend on
    the other prompts of the list."""
    if body.get("max_completion_tokens") is not None:  # chat's newer name for max_tokens
        max_tokens = body["max_completion_tokens"]
        field = "max_completion_tokens"
    else:
        max_tokens, field = _option(body, "max_tokens", defaults.max_tokens), "max_tokens"
    user_stop = _option(body, "stop", ())
    user_stop = (user_stop,) if isinstance(user_stop, str) else user_stop
    if not isinstance(user_stop, (list, tuple)):
        raise InvalidRequest("stop", f"must be a string or a list of strings, got {user_stop!r}")
    seed = body.get("seed")
    requests = []
    for prompt in prompts:
        for j in range(n):
            try:
                params = sampling_params(
                    max_tokens=max_tokens,
                    temperature=_option(body, "temperature", defaults.temperature),
                    top_k=body.get("top_k", defaults.top_k),  # JAI's field: null means all tokens, as natively
                    top_p=_option(body, "top_p", defaults.top_p),
                    seed=seed if j == 0 or seed is None else (seed + j) % SEED_RANGE,
                    stop=(*user_stop, *stop),
                )
            except InvalidRequest as exc:
                if exc.field == "max_tokens" and field != "max_tokens":
                    raise InvalidRequest(field, exc.problem) from None
                raise
            requests.append(GenerationRequest(prompt, params, mode=mode))
    return requests


# ----- chat messages -> JAI's chat format -----


def chat_prompt(messages, defaults: Defaults, model: ServedModel) -> str:
    """The prompt for a conversation, in the seed's chat format.

    The last question is wrapped as the seed's /chat did. Earlier turns come before it in the same
    format, each closed by its answer and ``[/ANSWER]``, newest kept first while the whole prompt fits
    in the model's context (``block_size`` tokens); the first turn that does not fit is dropped with
    every older one (whole turns only). System (and developer) messages are prefixed, in order, as
    plain text before everything else and never cut: the demo model never saw one, so they are shown
    to it, not silently dropped. Consecutive messages of one role are joined with a newline.
    """
    system, turns = _conversation(messages, defaults)
    head = "".join(text + "\n\n" for text in system)
    question = CHAT_TEMPLATE.format(prompt=turns[-1][0])
    kept = ""
    for asked, answered in reversed(turns[:-1]):
        candidate = _past_turn(asked, answered) + kept
        if model.count_tokens(head + candidate + question) > model.context_tokens:
            break
        kept = candidate
    return head + kept + question


def _past_turn(question: str, answer: str) -> str:
    # The seed's documents end "...\n[/ANSWER]"; an answer the model gave here already ends with its "\n".
    return CHAT_TEMPLATE.format(prompt=question) + answer + ("" if answer.endswith("\n") else "\n") + CHAT_STOP + "\n\n"


def _conversation(messages, defaults: Defaults) -> tuple[list[str], list[list]]:
    """System texts, and [question, answer] turns whose last one is the question to answer (answer None)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of {role, content} objects")
    system: list[str] = []
    turns: list[list] = []
    total = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(where, f"must be an object, got {type(message).__name__}")
        if extra := sorted(set(message) - {"role", "content"}):
            raise InvalidRequest(f"{where}.{extra[0]}", "is not supported (JAI reads role and content)")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role", f"must be one of {', '.join(ROLES)} (JAI has no tools), got {role!r}")
        text = _content(message.get("content"), f"{where}.content")
        total += len(text)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            if turns and turns[-1][1] is None:
                turns[-1][0] += "\n" + text
            else:
                turns.append([text, None])
        elif not turns:
            raise InvalidRequest(f"{where}.role", "an assistant message must follow a user message")
        else:
            turns[-1][1] = text if turns[-1][1] is None else turns[-1][1] + "\n" + text
    if not turns or turns[-1][1] is not None:
        raise InvalidRequest("messages", "must end with a user message (the question to answer)")
    if not turns[-1][0].strip():
        raise InvalidRequest("messages", "the last user message must not be empty")
    if total > defaults.max_prompt_chars:
        raise InvalidRequest(
            "messages", f"are {total} characters in all, longer than the limit of {defaults.max_prompt_chars}"
        )
    return system, turns


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}[{k}]", f"only text parts are supported, got {kind or part!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequest(where, f"must be a string or a list of text parts, got {type(content).__name__}")


# ----- responses -----


class OpenAIExchange(Exchange):
    object_name = ""  # the non-streamed object
    chunk_name = ""  # the streamed chunks' object
    id_prefix = ""

    def __init__(self, requests, n: int, stream: tuple[bool, bool], request_id: str, model: ServedModel):
        super().__init__(requests, stream[0])
        self.include_usage = stream[1]
        self.n = n
        self.id = self.id_prefix + request_id
        self.created = int(time.time())
        self.model = model.name
        self.content_type = SSE if self.stream else JSON
        self.events: list[str] = []

    def add(self, index: int, out) -> None:
        first = self.choices[index].steps == 0
        super().add(index, out)
        if self.stream:
            self._stream_step(index, first)

    def chunk(self) -> str:
        events = "".join(self.events)
        self.events.clear()
        return events

    def final(self) -> str:
        if not self.stream:
            choices = [self._choice(i) for i in range(len(self.choices))]
            return dumps({**self._head(self.object_name), "choices": choices, "usage": self.usage()})
        tail = self.chunk()
        if self.include_usage:  # OpenAI's extra last chunk: no choices, the whole call's usage
            tail += event({**self._head(self.chunk_name), "choices": [], "usage": self.usage()})
        return tail + DONE

    def failure(self, status: int, message: str, streaming: bool) -> str:
        body = error_body(status, message)
        return event(body) if streaming else dumps(body)  # the SDK raises on an event with "error"

    def usage(self) -> dict:
        """A prompt is counted once however many choices it has (as OpenAI does); completions add up."""
        prompt = sum(c.prompt_tokens for i, c in enumerate(self.choices) if i % self.n == 0)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, name: str) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model}

    def _emit(self, choice: dict) -> None:
        body = {**self._head(self.chunk_name), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # OpenAI: every chunk but the last has a null usage
        self.events.append(event(body))

    def _choice(self, index: int) -> dict:
        raise NotImplementedError

    def _stream_step(self, index: int, first: bool) -> None:
        raise NotImplementedError


class CompletionExchange(OpenAIExchange):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, requests, n, stream, request_id, model, echo: bool):
        super().__init__(requests, n, stream, request_id, model)
        self.echo = echo

    def _choice(self, index: int) -> dict:
        choice = self.choices[index]
        text = (self.requests[index].prompt if self.echo else "") + choice.text
        return {"index": index, "text": text, "logprobs": None, "finish_reason": choice.finish_reason}

    def _stream_step(self, index: int, first: bool) -> None:
        choice = self.choices[index]
        text, _ = choice.take()
        if first and self.echo:
            text = self.requests[index].prompt + text
        if text or choice.finish_reason:
            self._emit({"index": index, "text": text, "logprobs": None, "finish_reason": choice.finish_reason})


class ChatExchange(OpenAIExchange):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def _choice(self, index: int) -> dict:
        choice = self.choices[index]
        return {"index": index, "message": {"role": "assistant", "content": choice.text}, "logprobs": None,
                "finish_reason": choice.finish_reason}

    def _stream_step(self, index: int, first: bool) -> None:
        choice = self.choices[index]
        if first:  # OpenAI opens each choice with the role
            self._emit({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None})
        text, _ = choice.take()
        if text or choice.finish_reason:
            delta = {"content": text} if text else {}
            self._emit({"index": index, "delta": delta, "logprobs": None, "finish_reason": choice.finish_reason})
