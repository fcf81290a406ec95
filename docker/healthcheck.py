"""Container HEALTHCHECK: exit 0 when ``GET /health/ready`` answers 200, 1 otherwise (no curl in the image)."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('SIAM_PORT', '8000')}/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"not ready: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
