"""The leader's view of which peers are alive.

Peers report to the leader every heartbeat interval; a peer not heard from for
the TTL is proposed down. This view is a cache, not replicated: a new leader
starts it fresh and grants every peer a full TTL before judging it, so a leader
change never takes down healthy peers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Liveness:
    ttl_s: float
    last_heard: dict[str, tuple[str, float]] = field(default_factory=dict)
    grace_until: float = 0.0

    def reset(self, now: float) -> None:
        """Called when this peer becomes leader."""
        self.last_heard.clear()
        self.grace_until = now + self.ttl_s

    def heard(self, peer_id: str, incarnation: str, now: float) -> None:
        self.last_heard[peer_id] = (incarnation, now)

    def suspects(self, up_peers: dict[str, str], now: float) -> list[tuple[str, str]]:
        """``up_peers``: peer id → incarnation the state believes is up.
        Returns (peer id, incarnation) pairs silent for longer than the TTL."""
        if now < self.grace_until:
            return []
        out = []
        for peer_id, incarnation in up_peers.items():
            heard = self.last_heard.get(peer_id)
            if heard is None or heard[0] != incarnation:
                # Never heard this incarnation under this leader: it gets one
                # TTL from its first appearance in the state.
                heard = self.last_heard[peer_id] = (incarnation, now)
            if now - heard[1] > self.ttl_s:
                out.append((peer_id, incarnation))
        return out
