"""URIs as people see them: credentials removed from every URI that is shown, logged or stored, and
whether a location is a URI at all (``s3://bucket/x``) or a local path."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def has_scheme(location: str | Path) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a local path."""
    # "C:\\x" is a Windows path, not a URI with scheme "c"
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", str(location)) is not None


# query parameters that carry a secret: bearer and API tokens, passwords, S3 / GCS / Azure signed URLs
_SECRET_PARAM = re.compile(
    r"([?&;](?:[A-Za-z0-9_.-]*token|access[_-]?key|api[_-]?key|apikey|key|password|passwd|pwd|secret|"
    r"client[_-]?secret|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"x-goog-signature|x-goog-credential|credential|auth|authorization)=)[^&;#\s'\"<>]*",
    re.IGNORECASE,
)


def redact_uri(uri: str, mask: bool = True) -> str:
    """``scheme://user:secret@host/path?token=t`` → ``scheme://***@host/path?token=***``
    (``mask=False``: ``scheme://host/path?token=***``); other strings unchanged. The one helper for
    every URI that is shown, logged or stored."""
    parts = urlsplit(uri)
    if parts.netloc and "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        uri = urlunsplit(parts._replace(netloc=f"***@{host}" if mask else host))
    return _SECRET_PARAM.sub(r"\1***", uri)


# scheme://userinfo@ inside free text (an error message, a log line); userinfo stops at the first
# character that cannot be part of it, so two URIs on one line are redacted separately
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@'\"<>]+@")


def redact_text(text: str) -> str:
    """Every ``scheme://user:secret@`` in ``text`` → ``scheme://***@``, and every secret query
    parameter's value (``?token=…``, ``&X-Amz-Signature=…``) → ``***``."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", text))

