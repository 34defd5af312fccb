"""Settings for every test that starts or configures Ray.

Ray reads these when it is first imported (any test module here may be the first), so they are set when
this folder is collected: no usage report, and every port of a test cluster bound to loopback (Ray otherwise
binds all interfaces and advertises the host's address).
"""

from __future__ import annotations

import os

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(RAY_ENV)
