"""The image's HEALTHCHECK: GET /healthz on this peer's own HTTP address.

The peer binds the address it advertises (MESH_HTTP, or the container's IP
that the entrypoint picks), not 127.0.0.1, so the check dials the same one.
Exit 0 when the peer answers 200, 1 otherwise, as Docker expects.
"""

import os
import socket
import sys
import urllib.request


def main() -> int:
    addr = os.environ.get("MESH_HTTP") or f"{socket.gethostbyname(socket.gethostname())}:8001"
    host, _, port = addr.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as exc:
        print(f"healthz on {host}:{port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
