"""API keys: constant-time comparison and the check of an ``Authorization`` header (keys are never logged)."""

from __future__ import annotations

import hmac

__all__ = ["key_is_valid", "check_authorization"]


def key_is_valid(given: str, keys: list[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``, compared in constant time against every key.

    Parameters
    ----------
    given : str
        The key the client sent.
    keys : list of bytes
        Accepted keys.

    Returns
    -------
    bool
        True when it matches one of them.
    """
    raw = given.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(raw, key)
    return ok


def check_authorization(header: str | None, keys: list[bytes]) -> str | None:
    """Check an ``Authorization`` header value against the accepted keys.

    Parameters
    ----------
    header : str or None
        The header's value (``"Bearer <key>"``).
    keys : list of bytes
        Accepted keys; empty means authentication is off.

    Returns
    -------
    str or None
        None when the request may pass, else the message of the 401 answer (it never contains the key).
    """
    if not keys:
        return None
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return "this service needs an API key: send 'Authorization: Bearer <key>'"
    if not key_is_valid(token, keys):
        return "the API key is not valid"
    return None
