"""Training: the loop, checkpoints, distributed set-up, evaluation helpers and the CLI.

* :mod:`tutorial_lib.training.loop`: ``train`` with pluggable loss steps, accumulation,
  clipping, schedules, mixed precision and JSONL metrics;
* :mod:`tutorial_lib.training.checkpoint`: atomic, exactly resumable checkpoints;
* :mod:`tutorial_lib.training.distributed`: DDP set-up and teardown;
* :mod:`tutorial_lib.training.evaluation`: fixed evaluation batches and metrics;
* :mod:`tutorial_lib.training.cli`: the command line, run as ``python -m tutorial_lib.train``.
"""
