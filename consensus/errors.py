"""Errors raised by the consensus package."""


class ConsensusError(Exception):
    """Root of every consensus error."""


class NoQuorum(ConsensusError):
    """Nothing committed in time: no leader, no majority, or an ambiguous outcome.

    The command may still commit later; retrying it with the same ``cid`` is safe.
    """


class ProposalFailed(ConsensusError):
    """pysyncobj refused the proposal outright (queue full, request denied)."""
