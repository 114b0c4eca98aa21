"""Whether the Hugging Face Hub can be reached, asked before a Hub id is loaded.

On a machine without a network the Hub client retries every request five times (about a
minute, a warning line each) before transformers falls back to the local cache or gives up.
When the Hub's host name does not even resolve and no proxy is configured, no request can
succeed, so :func:`steerkern.models.load_model` looks in the local cache only, at once: a
cached model loads without the wait, and a mistyped id fails in a second, not a minute.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

# a proxy resolves the Hub's name itself: the local resolver's answer then says nothing
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
RESOLVE_SECONDS = 2.0


def hub_host() -> str | None:
    """The host name of the Hub endpoint the client uses (``HF_ENDPOINT``, else huggingface.co)."""
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname


def hub_unreachable(timeout: float = RESOLVE_SECONDS) -> bool:
    """True when the Hub's host name does not resolve and no proxy is configured. False when
    it resolves, when a proxy is set, when the resolver has not answered within ``timeout``
    seconds (unsure: the client then tries as usual), or when offline mode is already on."""
    from huggingface_hub import constants

    host = hub_host()
    if constants.HF_HUB_OFFLINE or not host or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return False
    failed = []

    def resolve():
        try:
            socket.getaddrinfo(host, 443)
        except OSError:  # socket.gaierror: no such name, no resolver
            failed.append(True)

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(failed)
