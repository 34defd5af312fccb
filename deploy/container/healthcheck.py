"""Container health check: exit 0 when the service answers /health/ready with 2xx, else 1.

Standard library only, so the image needs no curl. Used by the Dockerfile's HEALTHCHECK and the ECS task
definition's container health check.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("RETINAGRADE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=4) as response:
        sys.exit(0 if 200 <= response.status < 300 else 1)
except (urllib.error.URLError, OSError):
    sys.exit(1)
