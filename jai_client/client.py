"""A small requests-based client for JAI on TorchServe: generate, chat, stream, health, scale, describe.

Users' scripts talk to the server through :class:`JAIClient`; the seed's two helpers (:func:`chat`,
:func:`generate`) keep their signatures on top of a default client, so an old script only changes its
import. Every failure — an HTTP error, a refused token, a server that is down — is one exception type,
:class:`JAIError`, so a caller (and the command line) has one thing to catch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

MODEL = "jai"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
DEFAULT_KEY_FILE = "key_file.json"  # TorchServe writes it in the folder it was started from
DEFAULT_TIMEOUT = 120.0  # seconds per connect/read; a stream's clock restarts with every line
TOKEN_REFUSED = "InvalidKeyException"  # TorchServe's error type for a wrong or expired key


class JAIError(Exception):
    """Any failed call: ``status`` is the HTTP code, or None when no HTTP answer came (server down,
    timeout, no key file); ``message`` is the server's own message (e.g. ``top_k: must be >= 1, got 0``)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"{status} {message}" if status else message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Completion:
    """One finished generation, with the server's response fields."""

    prompt: str  # the text the model continued (chat mode: the wrapped question), as the server echoes it
    generated: str
    full_text: str  # prompt + generated
    finish_reason: str  # "stop" (stop string or end of text) or "length" (max_tokens reached)
    usage: dict[str, int]  # prompt_tokens, completion_tokens
    model_version: str = ""  # the checkpoint that answered (docs/updates.md); "" from a server before it

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Completion:
        return cls(**{name: body[name] for name in cls.__dataclass_fields__ if name in body or name != "model_version"})


class Stream:
    """Text pieces of one streamed generation, in order, as the server sends them.

    Iterate it for ``str`` pieces; once exhausted, ``result`` holds the :class:`Completion` from the
    server's last line. Closing it early (or leaving a ``with`` block) drops the connection.
    """

    def __init__(self, response: requests.Response, url: str, timeout: float):
        self._response = response
        self._url = url
        self._timeout = timeout
        self.result: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        with _transport_errors(self._url, self._timeout), self._response:
            for raw in self._response.iter_lines():
                if not raw:
                    continue
                line = json.loads(raw)
                if "text" not in line:  # the status was already sent as 200: a failure comes as a line
                    raise JAIError(line.get("code"), line.get("message", str(line)))
                if line["text"]:
                    yield line["text"]
                if "finish_reason" in line:
                    self.result = Completion.from_body(line)
        if self.result is None:
            raise JAIError(None, f"{self._url} ended the stream before its last line")

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class JAIClient:
    """Calls one TorchServe serving JAI: the inference API (``url``) and the management API.

    Tokens left as None come from ``key_file``, read only when a call needs one (so a client can be
    built before the server starts) and read again once when the server refuses a key, because
    TorchServe rewrites the file with new keys when they expire (60 minutes by default).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        management_url: str = DEFAULT_MANAGEMENT_URL,
        token: str | None = None,
        management_token: str | None = None,
        key_file: str | os.PathLike[str] = DEFAULT_KEY_FILE,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.url = url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.key_file = Path(key_file)
        self.timeout = timeout
        self._explicit = {"inference": token, "management": management_token}
        self._keys: dict[str, Any] | None = None
        self._session = requests.Session()

    # ----- inference API -----

    def generate(self, prompt: str, **params: Any) -> Completion:
        """Continue ``prompt``. ``params`` are the request fields (max_tokens, temperature, top_k,
        top_p, seed, stop) sent as given; left out, the server's defaults apply."""
        return self._complete(prompt, "generate", params)

    def chat(self, prompt: str, **params: Any) -> Completion:
        """Answer a question: the server wraps it as the seed's /chat did and stops at [/ANSWER]."""
        return self._complete(prompt, "chat", params)

    def stream(self, prompt: str, mode: str = "generate", **params: Any) -> Stream:
        """Like generate (or chat, with ``mode="chat"``), but text pieces arrive while generating.

        The request is sent now, so a refused one raises here, before any iteration.
        """
        response = self._call(
            "POST", self.url, f"/predictions/{MODEL}", "inference", json=_body(prompt, mode, True, params), stream=True
        )
        return Stream(response, self.url, self.timeout)

    def health(self) -> dict[str, Any]:
        """TorchServe's /ping, e.g. ``{"status": "Healthy"}``."""
        return self._call("GET", self.url, "/ping", "inference").json()

    # ----- management API -----

    def describe(self, customized: bool = False) -> dict[str, Any]:
        """The model's workers and status; ``customized`` adds the handler's own description
        (device, dtype, parameters, checkpoint hash, ...). A customized describe is a job for the
        worker (under continuous batching it joins the running batch and is answered between two engine
        steps); health checks should not depend on the worker: use :meth:`health` or plain describe
        (docs/operations.md, Monitoring)."""
        params = {"customized": "true"} if customized else None
        return self._call("GET", self.management_url, f"/models/{MODEL}", "management", params=params).json()[0]

    def scale(self, workers: int) -> dict[str, Any]:
        """Run exactly ``workers`` workers; returns once they are started (TorchServe's synchronous mode)."""
        params = {"min_worker": workers, "max_worker": workers, "synchronous": "true"}
        return self._call("PUT", self.management_url, f"/models/{MODEL}", "management", params=params).json()

    # ----- plumbing -----

    def _complete(self, prompt: str, mode: str, params: dict[str, Any]) -> Completion:
        response = self._call(
            "POST", self.url, f"/predictions/{MODEL}", "inference", json=_body(prompt, mode, False, params)
        )
        return Completion.from_body(response.json())

    def _call(self, method: str, base: str, path: str, kind: str, **kwargs: Any) -> requests.Response:
        """One HTTP call with the ``kind`` token; retried once with a re-read key file if the key was refused.

        Without a key file the call still goes out (tokenless), so a server that is down is reported
        as down, and one with token auth off just works.
        """
        token = self._token(kind)
        response = self._send(method, base, path, token, **kwargs)
        if _refused_token(response) and self._explicit[kind] is None:
            self._keys = None
            fresh = self._token(kind)
            if fresh is None:
                raise JAIError(
                    response.status_code,
                    f"no {kind} token: {self.key_file} not found (torchserve "
                    "writes it where it was started; point key_file at it)",
                )
            if fresh != token:
                response.close()
                response = self._send(method, base, path, fresh, **kwargs)
        if response.status_code >= 400:
            raise _http_error(response)
        return response

    def _send(self, method: str, base: str, path: str, token: str | None, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with _transport_errors(base, self.timeout):
            return self._session.request(method, base + path, headers=headers, timeout=self.timeout, **kwargs)

    def _token(self, kind: str) -> str | None:
        """The explicit token, else the key file's (None while the file does not exist)."""
        if self._explicit[kind] is not None:
            return self._explicit[kind]
        if self._keys is None:
            try:
                self._keys = json.loads(self.key_file.read_text())
            except FileNotFoundError:
                return None
            except (OSError, ValueError) as exc:
                raise JAIError(None, f"cannot read {self.key_file}: {exc}") from None
        try:
            return self._keys[kind]["key"]
        except (KeyError, TypeError):
            raise JAIError(None, f"{self.key_file} has no {kind} key") from None


def _body(prompt: str, mode: str, stream: bool, params: dict[str, Any]) -> dict[str, Any]:
    """The request body; prompt, mode and stream are set by the method called, never by ``params``."""
    if clash := {"prompt", "mode", "stream"} & params.keys():
        raise TypeError(f"{', '.join(sorted(clash))} cannot be passed as a sampling parameter")
    return {"prompt": prompt, "mode": mode, "stream": stream, **params}


def _refused_token(response: requests.Response) -> bool:
    # 401 with JAI's agent (torchserve-patch KeyPatches); 400 from an unpatched TorchServe
    return response.status_code in (400, 401) and _json_or_none(response).get("type") == TOKEN_REFUSED


def _http_error(response: requests.Response) -> JAIError:
    """Our handler and TorchServe both answer errors as JSON {"code", "type", "message"}; /ping answers
    {"status": "Unhealthy"}; anything else is shown as text."""
    body = _json_or_none(response)
    message = body.get("message") or body.get("status") or response.text.strip() or response.reason
    return JAIError(response.status_code, str(message))


def _json_or_none(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


@contextmanager
def _transport_errors(url: str, timeout: float) -> Iterator[None]:
    """Turn requests' network failures into JAIError with a line a user can act on."""
    try:
        yield
    except requests.ConnectionError as exc:  # refused, unknown host, connect timeout, dropped mid-stream
        reason = _root_cause(exc)
        raise JAIError(None, f"cannot reach {url}: {reason} (is torchserve running? try: make serve)") from exc
    except requests.Timeout as exc:
        raise JAIError(None, f"no answer from {url} within {timeout:g} s") from exc
    except requests.RequestException as exc:
        raise JAIError(None, f"request to {url} failed: {_root_cause(exc)}") from exc


def _root_cause(exc: BaseException) -> str:
    """The OS-level reason (e.g. "Connection refused") instead of urllib3's nested retry message."""
    cause: BaseException | None = exc
    for _ in range(10):  # a handful of wrappers deep at most; the bound only guards against cycles
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = next(
            (
                c
                for c in (getattr(cause, "reason", None), *cause.args[:1], cause.__cause__, cause.__context__)
                if isinstance(c, BaseException)
            ),
            None,
        )
    return str(exc)


# ----- the seed's helpers, on a default client -----

_default: JAIClient | None = None


def configure(**kwargs: Any) -> JAIClient:
    """Set the client the module-level helpers use: ``kwargs`` as for JAIClient, where left out the
    environment (JAI_URL, JAI_MANAGEMENT_URL, JAI_KEY_FILE) and then the defaults apply."""
    global _default
    _default = JAIClient(**{**client_settings_from_env(), **kwargs})
    return _default


def default_client() -> JAIClient:
    return _default or configure()


def client_settings_from_env() -> dict[str, str]:
    """JAIClient arguments set in the environment, so scripts and the CLI move to another server alike."""
    names = {"url": "JAI_URL", "management_url": "JAI_MANAGEMENT_URL", "key_file": "JAI_KEY_FILE"}
    return {arg: os.environ[var] for arg, var in names.items() if os.environ.get(var)}


def chat(prompt: str, max_tokens: int = 256) -> str:
    """The seed's helper: the answer text. Sends temperature 0.8 explicitly, as the seed did."""
    return default_client().chat(prompt, max_tokens=max_tokens, temperature=0.8).generated


def generate(prompt: str, max_tokens: int = 256) -> str:
    """The seed's helper: prompt + continuation (the seed returned ``full_text``), server defaults."""
    return default_client().generate(prompt, max_tokens=max_tokens).full_text
