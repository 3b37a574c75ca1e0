"""Keep registry credentials out of messages, hints and provenance.

Shared by the transports (``hub``, ``mlflow_source``) and by whoever reports an error that may
echo a request (``models.backbone``). Pure standard library: importing or calling it never loads
``huggingface_hub`` or ``mlflow``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

MAX_DETAIL = 300  # characters of a (redacted) upstream error kept in a message
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_ID_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "DATABRICKS_TOKEN",
)
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_DATABRICKS_TOKEN = re.compile(r"\bdapi[0-9a-f]{32}(-\d+)?\b")
_SCHEME_CRED = re.compile(r"(?i)\b(bearer|basic)\s+[^\s'\",}]+")
_AUTH_VALUE = re.compile(r"(?i)\b(authorization['\"]?\s*[:=]\s*['\"]?)(?!bearer\b|basic\b)[^\s'\",}]+")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


def _hf_token_path() -> str:
    """Where huggingface_hub keeps the stored token, without importing it.

    Once huggingface_hub is loaded its own ``constants.HF_TOKEN_PATH`` is authoritative (it is what
    it reads, and tests patch it); before that, the same default it would compute from the
    environment: ``HF_TOKEN_PATH``, else ``$HF_HOME/token``, else
    ``${XDG_CACHE_HOME:-~/.cache}/huggingface/token``.
    """
    constants = sys.modules.get("huggingface_hub.constants")
    loaded = getattr(constants, "HF_TOKEN_PATH", None)
    if isinstance(loaded, str):
        return loaded
    cache = os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    home = os.path.expandvars(os.path.expanduser(os.getenv("HF_HOME", os.path.join(cache, "huggingface"))))
    return os.path.expandvars(os.path.expanduser(os.getenv("HF_TOKEN_PATH", os.path.join(home, "token"))))


def _secrets() -> list[str]:
    """Every token value a registry client might send: the environment ones and the stored Hub one (no network)."""
    values = [os.environ.get(name) for name in SECRET_ENV]
    with contextlib.suppress(OSError, UnicodeError):  # no stored token
        values.append(Path(_hf_token_path()).read_text(encoding="utf-8"))
    return sorted({v.strip() for v in values if v and len(v.strip()) >= 4}, key=len, reverse=True)


def redact(text: str) -> str:
    """Remove token values (and anything that looks like one) from ``text``.

    Args:
        text: an error string that may echo headers or URLs.

    Returns:
        ``text`` with every known token value, ``hf_...`` and ``dapi...`` token, bearer/basic
        credential, ``Authorization`` value and URL user:password replaced by ``***``.
    """
    for secret in _secrets():
        text = text.replace(secret, "***")
    text = _TOKEN_LIKE.sub("hf_***", text)
    text = _DATABRICKS_TOKEN.sub("dapi***", text)
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}***@", text)
    text = _SCHEME_CRED.sub(lambda m: f"{m.group(1)} ***", text)
    return _AUTH_VALUE.sub(lambda m: f"{m.group(1)}***", text)


def public_url(url: str) -> str:
    """``url`` without user:password and without a trailing slash, for the provenance."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)).rstrip("/")
