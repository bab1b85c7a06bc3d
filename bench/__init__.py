"""``mesh bench``: raftmesh measured beside its peers, on one machine, in one run.

Benchmarks are not tests: every scenario prints its figures beside the
issue's targets, saves them as JSON and plots them, and asserts nothing.
raftmesh is driven only through its public API (``MeshClient``) and process
control (``DevMesh``); the comparison systems run in worker subprocesses of
their own. This package sits on top of the import layers: nothing below it
may import it.
"""
