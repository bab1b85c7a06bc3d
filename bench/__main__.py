"""``python -m raftmesh.bench``: the same commands as ``mesh bench``."""

from raftmesh.bench.commands import bench

bench(prog_name="python -m raftmesh.bench")
