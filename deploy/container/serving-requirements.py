"""Print the package's runtime requirements (pyproject.toml, pins kept) minus the training-only ones.

The image installs these, then the package itself with ``--no-deps``: pyproject.toml stays the one place
that pins versions, and the image leaves out what only training and evaluation import (scikit-learn and
SciPy: about 150 MB, a third of the image). Serving never imports them: ``tests/deploy`` checks that no
module outside ``retinagrade.training`` does, and ``make container-test`` grades a photo without them.

    python3 serving-requirements.py pyproject.toml scikit-learn scipy > requirements.txt
"""

import re
import sys
import tomllib


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def serving_requirements(pyproject: str, training_only: list[str]) -> list[str]:
    """The ``[project] dependencies`` whose names are not in ``training_only``."""
    with open(pyproject, "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    excluded = {name.lower().replace("_", "-") for name in training_only}
    return [req for req in dependencies if _name(req) not in excluded]


if __name__ == "__main__":
    print("\n".join(serving_requirements(sys.argv[1], sys.argv[2:])))
