"""The voter set a data dir last saw (``voters.json``).

Apart from the Raft binding so that client commands (``mesh join``) can read
it without loading pysyncobj.
"""

from __future__ import annotations

import json
import os

VOTERS_FILE = "voters.json"


def persisted_voters(data_dir: str) -> list[str] | None:
    """The voter set this data dir last saw, or None for a fresh data dir."""
    try:
        with open(os.path.join(data_dir, VOTERS_FILE)) as fh:
            voters = json.load(fh)["voters"]
    except FileNotFoundError:
        return None
    if not isinstance(voters, list) or not all(isinstance(v, str) for v in voters):
        raise ValueError(f"{VOTERS_FILE} in {data_dir} is not a list of addresses")
    return voters
