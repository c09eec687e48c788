"""Is the Hugging Face hub usable right now? A quick answer, so that offline use fails fast.

Without it, a name that only looks like a hub id (``someorg/somemodel``, a mistyped relative path)
makes ``huggingface_hub`` retry for ~25 s and print a line per retry before it gives up. ``offline()``
reads the documented switches (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``); ``reachable()`` opens one
TCP connection to the hub (or to the HTTPS proxy, when one is set) with a short timeout.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def offline() -> bool:
    """True when the user switched the hub off (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _target() -> tuple[str, int]:
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), "")
    url = urlparse(proxy if "://" in proxy else f"http://{proxy}") if proxy else urlparse(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.lru_cache(maxsize=1)
def reachable(timeout: float = TIMEOUT_S) -> bool:
    """One TCP connection to the hub within ``timeout`` seconds (name lookup included)."""
    host, port = _target()
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)  # a slow name lookup ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return bool(ok)


def unavailable_reason() -> str | None:
    """Why the hub cannot be used now (for an error message), or None when it can."""
    if offline():
        return "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    if not reachable():
        host, port = _target()
        return f"the hub is unreachable ({host}:{port} could not be reached within {TIMEOUT_S:.0f} s)"
    return None


def cached(repo_id: str, filename: str = "config.json") -> bool:
    """Whether ``filename`` of ``repo_id`` is already in the local hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False
