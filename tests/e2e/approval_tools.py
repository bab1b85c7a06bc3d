"""A chat tool that requires approval, for test peers
(PYTHONPATH=tests/e2e, MESH_AGENT_MODULES=approval_tools).

``send_email`` sends nothing: it appends a line to the file named by
``RAFTMESH_TEST_MAIL_LOG`` (when set) and says what it would have sent, so a
test sees which calls ran, and that none ran twice or without approval.
"""

from __future__ import annotations

import os

from raftmesh.runner.agents.chat import tool

MAIL_LOG_ENV = "RAFTMESH_TEST_MAIL_LOG"


@tool(
    "send_email",
    "Send an email.",
    {
        "type": "object",
        "properties": {"to": {"type": "string"}, "subject": {"type": "string"}},
        "required": ["to", "subject"],
    },
    requires_approval=True,
)
def send_email(to: str, subject: str) -> str:
    path = os.environ.get(MAIL_LOG_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{to} {subject}\n".encode())
        finally:
            os.close(fd)
    return f"sent {subject!r} to {to}"


def read_mail_log(path: str) -> list[str]:
    try:
        with open(path) as fh:
            return fh.read().splitlines()
    except FileNotFoundError:
        return []
