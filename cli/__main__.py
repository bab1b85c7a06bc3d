"""``python -m raftmesh.cli``: how `mesh dev` starts its peers without relying on PATH."""

from raftmesh.cli.main import main

main(prog_name="mesh")
