"""Container health check: exit 0 when the service's /health answers 200 on this host, 1 otherwise.

Used by the Dockerfiles' HEALTHCHECK and by docker-compose.yml; reads ``LOCUS_PORT``
(default 8000). Standard library only, so the images need no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    """Probe ``http://127.0.0.1:$LOCUS_PORT/health``.

    Returns
    -------
    int
        0 when it answered 200 within the timeout, 1 otherwise.
    """
    port = os.environ.get("LOCUS_PORT", "8000")
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("LOCUS_HEALTHCHECK_TIMEOUT", "4"))) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        sys.stderr.write(f"healthcheck: {url}: {exc}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
