"""The Raft port's guard against whoever can reach it without the secret.

pysyncobj's wire format is pickle: each frame is a 4-byte length, then a Fernet
token of a zlib-compressed pickle. The Fernet check is the only thing between
the port and ``pickle.loads``, so a frame that passes it runs code in the peer.
That is why the cluster secret must be secret, and why raftmesh never uses a
constant one (see mesh/credentials.py).

What pysyncobj leaves open before that check, this module closes:

* It buffers a frame of any announced length (up to 2 GiB), appending each
  8 KiB read to a ``bytes`` object (quadratic, on the tick thread): one
  connection could stall the tick long enough to move the leadership. Here a
  connection that has not yet sent one frame that decrypts (unauthenticated)
  may announce at most ``MAX_UNAUTHENTICATED_FRAME_BYTES``, an authenticated
  one ``MAX_FRAME_BYTES``; a longer announcement closes the connection at
  once. Reads go to a ``bytearray`` (linear).
* It accepts any number of connections that never authenticate, and keeps one
  that sends nothing forever. Here at most ``MAX_UNAUTHENTICATED_CONNECTIONS``
  incoming connections may wait for their first frame, for at most the
  connection timeout each.

Every rejection is logged, at most one line per ``REJECTION_LOG_INTERVAL_S``
(with the count of those not logged), so a flood cannot flood the log too.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
import zlib
from typing import Any

from pysyncobj import pickle as syncobj_pickle
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

log = logging.getLogger("raftmesh.raft")

# The largest frame raftmesh sends is one append-entries message: entries are
# packed until they reach the batch size (32 MiB, raft.APPEND_BATCH_BYTES), so
# it holds less than 32 MiB plus one entry (8 MiB, raft.MAX_ENTRY_BYTES), and
# Fernet's base64 grows that by 4/3: under 54 MiB. 64 MiB (8 entries) leaves
# room for pickle's overhead and nothing for a 2 GiB announcement.
MAX_FRAME_BYTES = 64 * 1024 * 1024
# The first frame of a connection is a 32-byte random key (about 150 bytes
# encrypted); status/admin requests are a few hundred bytes.
MAX_UNAUTHENTICATED_FRAME_BYTES = 64 * 1024
MAX_UNAUTHENTICATED_CONNECTIONS = 32
REJECTION_LOG_INTERVAL_S = 10.0

_LENGTH = struct.Struct("i")


class _Rejections:
    """Logs rejected connections, one line per interval at most."""

    def __init__(self, interval_s: float = REJECTION_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._next_log = 0.0
        self._unlogged = 0

    def report(self, remote: str, reason: str) -> None:
        now = time.monotonic()
        if now < self._next_log:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more rejected since the last report)" if self._unlogged else ""
        log.warning("raft port: closed the connection from %s: %s%s", remote, reason, more)
        self._unlogged = 0
        self._next_log = now + self._interval_s


class _GuardedConnection(TcpConnection):
    """A TcpConnection with a bounded, linear read buffer.

    pysyncobj builds its connections itself (in its server and transport), so
    the transport below turns each into this class as soon as it sees it,
    before any byte is read. The two methods named ``_TcpConnection__...``
    replace the private ones of the same (mangled) names that the base class
    calls from its poll callback.
    """

    _frames: bytearray
    _rejections: _Rejections
    _remote: str
    authenticated: bool
    recvLastTimestamp: float  # noqa: N815 - pysyncobj's name
    opened_at: float

    @classmethod
    def adopt(cls, conn: TcpConnection, rejections: _Rejections) -> _GuardedConnection:
        conn.__class__ = cls
        assert isinstance(conn, _GuardedConnection)
        conn._frames = bytearray()
        conn._rejections = rejections
        conn.authenticated = False
        conn.opened_at = time.monotonic()
        try:
            host, port = conn._TcpConnection__socket.getpeername()[:2]
            conn._remote = f"{host}:{port}"
        except (AttributeError, OSError):  # an outgoing connection, not connected yet
            conn._remote = "a partner"
        return conn

    def connect(self, host: str, port: int) -> bool:
        self._frames = bytearray()
        self.authenticated = False
        self.opened_at = time.monotonic()
        self._remote = f"{host}:{port}"
        return bool(super().connect(host, port))

    def disconnect(self) -> None:
        self._frames = bytearray()
        self.authenticated = False
        super().disconnect()

    def reject(self, reason: str) -> None:
        self._rejections.report(self._remote, reason)
        self.disconnect()

    def _frame_too_long(self) -> bool:
        """Whether the frame at the head of the buffer announces a length over
        this connection's limit (checked as soon as its 4 bytes are in)."""
        if len(self._frames) < _LENGTH.size:
            return False
        (length,) = _LENGTH.unpack_from(self._frames)
        limit = MAX_FRAME_BYTES if self.authenticated else MAX_UNAUTHENTICATED_FRAME_BYTES
        if 0 < length <= limit:
            return False
        state = "authenticated" if self.authenticated else "unauthenticated"
        self.reject(f"{state} frame of {length} bytes announced (limit {limit})")
        return True

    def _TcpConnection__processRead(self) -> bool:  # noqa: N802 - pysyncobj's (mangled) name
        sock: socket.socket = self._TcpConnection__socket
        try:
            incoming = sock.recv(self._TcpConnection__recvBufferSize)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if not incoming or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.disconnect()
            return False
        self._frames += incoming
        return not self._frame_too_long()

    def _TcpConnection__processParseMessage(self) -> Any:  # noqa: N802
        if self._frame_too_long() or len(self._frames) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._frames)
        end = _LENGTH.size + length
        if len(self._frames) < end:
            return None
        data = bytes(self._frames[_LENGTH.size : end])
        try:
            if self.encryptor:
                stamp = self.encryptor.extract_timestamp(data)
                if stamp < self.recvLastTimestamp:
                    raise ValueError("replayed or reordered frame")
                self.recvLastTimestamp = stamp
                data = self.encryptor.decrypt(data)
            message = syncobj_pickle.loads(zlib.decompress(data))
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("wrong connection key")
        except Exception as exc:  # whatever a forged frame makes the decoder raise
            state = "authenticated" if self.authenticated else "unauthenticated"
            self.reject(f"{state} frame that does not decrypt ({type(exc).__name__})")
            return None
        del self._frames[:end]
        self.authenticated = True
        return message


class GuardedTransport(TCPTransport):
    """pysyncobj's TCP transport, with every connection guarded and a bound on
    the incoming connections that have not authenticated yet."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:  # noqa: N803
        self._rejections = _Rejections()
        super().__init__(syncObj, selfNode, otherNodes)

    def _pending(self) -> list[_GuardedConnection]:
        return [
            c
            for c in self._unknownConnections
            if isinstance(c, _GuardedConnection) and not c.authenticated
        ]

    def _onNewIncomingConnection(self, conn: TcpConnection) -> None:  # noqa: N802
        guarded = _GuardedConnection.adopt(conn, self._rejections)
        if len(self._pending()) >= MAX_UNAUTHENTICATED_CONNECTIONS:
            guarded.reject(
                f"already {MAX_UNAUTHENTICATED_CONNECTIONS} connections waiting to authenticate"
            )
            return
        super()._onNewIncomingConnection(guarded)

    def addNode(self, node: Any) -> None:  # noqa: N802
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None and not isinstance(conn, _GuardedConnection):
            _GuardedConnection.adopt(conn, self._rejections)

    def _onTick(self) -> None:  # noqa: N802
        super()._onTick()
        deadline = time.monotonic() - self._syncObj.conf.connectionTimeout
        for conn in self._pending():
            if conn.opened_at < deadline:
                conn.reject("no authenticated frame within the connection timeout")


__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_UNAUTHENTICATED_CONNECTIONS",
    "MAX_UNAUTHENTICATED_FRAME_BYTES",
    "GuardedTransport",
]
