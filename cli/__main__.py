"""``python -m cli``: how `mesh dev` starts its peers without relying on PATH."""

from cli.main import main

main(prog_name="mesh")
