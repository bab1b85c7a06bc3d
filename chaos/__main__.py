"""``python -m raftmesh.chaos run ...``: the same commands as ``mesh chaos``."""

from raftmesh.chaos.commands import chaos

chaos(prog_name="python -m raftmesh.chaos")
