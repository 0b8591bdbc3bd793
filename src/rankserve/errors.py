"""One exception type per user-facing failure.

Layers below the API raise these; `rankserve.api.errors` maps each to an HTTP status in one place.
"""

from __future__ import annotations


class RankserveError(Exception):
    """Base of every failure we report to a user (CLI or HTTP)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CheckpointError(RankserveError):
    """The checkpoint cannot be found, downloaded or is not the model we serve."""


class InputTooLong(RankserveError):
    """A query+passage pair exceeds the maximum sequence length and truncation is off."""

    def __init__(self, length: int, limit: int) -> None:
        # The NIM's exact wording (clients and tests match on it).
        super().__init__(f"Input length {length} exceeds maximum allowed token size {limit}")
        self.length = length
        self.limit = limit


class InvalidRequest(RankserveError):
    """A request that is well-formed JSON but asks for something we cannot do."""


class TooManyWindows(InvalidRequest):
    """Long passages split into more windows than one request may send (`max_windows_per_request`)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the passages of this request need more than {limit} windows (the limit per request, "
            "RANKSERVE_MAX_WINDOWS_PER_REQUEST): send fewer or shorter passages"
        )
        self.limit = limit


class UnknownModel(RankserveError):
    """The request names a model this server does not serve."""


class Unauthorized(RankserveError):
    """Missing or wrong API key."""


class Overloaded(RankserveError):
    """The work queue is full; the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(RankserveError):
    """The server is draining and accepts no new work."""


class NotReady(RankserveError):
    """The engine is not loaded (yet) or is broken."""


class DeadlineExceeded(RankserveError):
    """The request did not finish within its deadline."""


class ClientGone(RankserveError):
    """The client disconnected before its answer was ready; its remaining work was dropped."""


class EngineFailure(RankserveError):
    """The engine failed on a batch that contained this request's work."""
