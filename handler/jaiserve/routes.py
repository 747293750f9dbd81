"""Which view answers a call: the one place that knows both the native view (api.py) and OpenAI's
(openai_api.py, which builds on api.py). The handler asks :func:`route` for every request."""

from __future__ import annotations

from .api import NativeRoute, Route
from .openai_api import OpenAIRoute


def route(url_path: str | None) -> Route:
    """The view for TorchServe's ``url_path`` header: what follows ``/predictions/<model>/<version>/``.

    Empty: the native API; ``generate``, ``chat``, ``health``: the seed's paths in the native shape;
    ``v1`` and below: OpenAI's. Anything else: the native shape's 404.
    """
    path = (url_path or "").strip("/")
    if path == "v1" or path.startswith("v1/"):
        return OpenAIRoute(path)
    return NativeRoute(path)
