"""Python client for JAI served by TorchServe (see client.py); ``python -m jai_client`` is its command line."""

from .client import (
    Completion,
    JAIClient,
    JAIError,
    Stream,
    chat,
    configure,
    default_client,
    generate,
)

__all__ = ["Completion", "JAIClient", "JAIError", "Stream", "chat", "configure", "default_client", "generate"]
