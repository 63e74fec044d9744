"""Container health probe: exit 0 when GET http://127.0.0.1:$EARLYEXIT_PORT<path> answers 200.

Used by the image's HEALTHCHECK (``/healthz``) and by compose (``/readyz``); standard library
only, so the serving image needs no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "/healthz"
    port = os.environ.get("EARLYEXIT_PORT", "8000")
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
