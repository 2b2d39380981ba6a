"""``python -m tutorial_lib.train``: the training command line
(:mod:`tutorial_lib.training.cli`)."""

from tutorial_lib.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
