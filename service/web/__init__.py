"""The viewer's static files: the page, its ES modules and style, and the bundled example fields.

Nothing here is generated or downloaded: the files ship in the package and the
service serves them (:mod:`locus.service.api.viewer`). The page and its code are
:data:`PAGE_PATHS` (served without an API key: they hold no data); the example
fields under ``examples/`` are data and are served, like every other answer, only
with a key when keys are on.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["ASSETS", "EXAMPLES_DIR", "PAGE_PATHS", "WEB_DIR", "asset_bytes", "examples"]

#: Folder of the static files.
WEB_DIR = Path(__file__).resolve().parent

#: Folder of the bundled example fields (``index.json`` and the channel files it names).
EXAMPLES_DIR = WEB_DIR / "examples"

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

#: The page's own files by name, with their media types (served at ``/viewer/<name>``).
ASSETS: dict[str, str] = {
    p.name: _MEDIA_TYPES[p.suffix] for p in sorted(WEB_DIR.iterdir()) if p.is_file() and p.suffix in _MEDIA_TYPES
}

#: Exact paths of the page and its code: ``/`` and ``/viewer/<asset>``.
PAGE_PATHS: frozenset[str] = frozenset({"/"} | {f"/viewer/{name}" for name in ASSETS})


@cache
def asset_bytes(name: str) -> bytes:
    """The bytes of one page file.

    Parameters
    ----------
    name : str
        A key of :data:`ASSETS`.

    Returns
    -------
    bytes
        The file's content.

    Raises
    ------
    KeyError
        ``name`` is not one of the page's files.
    """
    if name not in ASSETS:
        raise KeyError(name)
    return (WEB_DIR / name).read_bytes()


@cache
def examples() -> list[dict[str, Any]]:
    """The bundled example fields, as listed in ``examples/index.json``.

    Returns
    -------
    list of dict
        Each ``{"id", "title", "size", "truth", "files": {channel: file name}, "source"}``.
    """
    return json.loads((EXAMPLES_DIR / "index.json").read_text(encoding="utf-8"))
