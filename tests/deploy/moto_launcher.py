"""Run moto's server on 127.0.0.1 with the one call the AWS provider needs that moto 5.2 lacks.

The Terraform AWS provider (5.x) reads an Application Auto Scaling target's tags back with
``ListTagsForResource`` after creating it; moto 5.2.5 answers that with HTTP 500 (not implemented) and the
provider retries for minutes. This launcher adds in-memory ``TagResource`` / ``UntagResource`` /
``ListTagsForResource`` for that service only, then serves as ``moto_server`` would.

    python moto_launcher.py PORT
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from moto.applicationautoscaling.responses import ApplicationAutoScalingResponse
from moto.server import ThreadedMotoServer

_TAGS: dict[str, dict[str, str]] = defaultdict(dict)


def _tag_resource(self: ApplicationAutoScalingResponse) -> str:
    _TAGS[self._get_param("ResourceARN")].update(self._get_param("Tags") or {})
    return "{}"


def _untag_resource(self: ApplicationAutoScalingResponse) -> str:
    tags = _TAGS[self._get_param("ResourceARN")]
    for key in self._get_param("TagKeys") or []:
        tags.pop(key, None)
    return "{}"


def _list_tags_for_resource(self: ApplicationAutoScalingResponse) -> str:
    return json.dumps({"Tags": _TAGS.get(self._get_param("ResourceARN"), {})})


def main() -> None:
    ApplicationAutoScalingResponse.tag_resource = _tag_resource  # type: ignore[attr-defined]
    ApplicationAutoScalingResponse.untag_resource = _untag_resource  # type: ignore[attr-defined]
    ApplicationAutoScalingResponse.list_tags_for_resource = _list_tags_for_resource  # type: ignore[attr-defined]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
    server.start()
    print("ready", flush=True)
    try:
        server._thread.join()  # type: ignore[union-attr]
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
