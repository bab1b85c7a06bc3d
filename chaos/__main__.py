"""``python -m chaos run ...``: the same commands as ``mesh chaos``."""

from cli.chaos import chaos

chaos(prog_name="python -m chaos")
