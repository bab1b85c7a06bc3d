"""Errors raised by the consensus package."""


class ConsensusError(Exception):
    """Root of every consensus error."""


class NoQuorum(ConsensusError):
    """Nothing committed in time: no leader, no majority, or an ambiguous outcome.

    The command may still commit later; retrying it with the same ``cid`` is safe.
    """


class ProposalFailed(ConsensusError):
    """pysyncobj refused the proposal outright (queue full, request denied)."""


class UnencodableCommand(ConsensusError):
    """A command msgpack cannot encode (an integer beyond 64 bits, an object
    that is not plain data). It fails its own proposal at once and never
    reaches a log entry, so the commands proposed with it are unaffected."""
