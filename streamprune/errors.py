"""The one exception type the CLI turns into a single clear line on stderr."""


class StreamPruneError(Exception):
    """A problem with the user's input or environment; the message is the whole story."""

    exit_code = 2


class Interrupted(StreamPruneError):
    """SIGINT/SIGTERM arrived; the job stopped at a safe point and can be resumed. Exit 128 + signal number."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + signum


class PeerFailed(StreamPruneError):
    """A collective with the other data-parallel ranks failed: the consequence of another rank's failure, reported
    only when no rank says more (launch.py)."""
