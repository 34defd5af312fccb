"""``python -m retinagrade.cli``: the ``retinagrade`` command (what ``torchrun -m`` and the tests start)."""

from retinagrade.cli import app

if __name__ == "__main__":  # not when a spawned worker process imports the main module again
    app()
