"""The one exception tree of farscope, shared by client and server.

    FarscopeError                  base: catch this to catch everything farscope raises
    ├── TraceError                 client side: something cannot be recorded (bool() of a proxy, ...)
    ├── ValidationError            the request was rejected before it touched a model
    │   ├── VersionError           the server cannot read this client's graph IR / protocol version
    │   └── UploadMissingError     a tensor sent by digest is not held by the server (client resends)
    ├── ModelNotFoundError         no model of that name is served
    ├── RemoteError                the graph failed while it ran on the server (shape errors, ...)
    ├── AuthError                  missing or wrong credentials
    │   └── PermissionDeniedError  the credentials do not allow this model
    ├── LimitError                 a size, rate or time limit was exceeded
    ├── CancelledError             the job was cancelled
    └── TransportError             the server could not be reached or the connection broke

Each error carries what is known of its context: the job id, the node (`%5 = add(%3, %4)`) and the
user's line that recorded it. `STATUS_OF` is the one table mapping classes to gRPC status names:
`status_of` reads it for the server's aborts, `class_of_status` reads it backwards for the client.
"""

from __future__ import annotations

__all__ = [
    "FarscopeError",
    "TraceError",
    "ValidationError",
    "VersionError",
    "UploadMissingError",
    "ModelNotFoundError",
    "RemoteError",
    "AuthError",
    "PermissionDeniedError",
    "LimitError",
    "CancelledError",
    "TransportError",
    "STATUS_OF",
    "ERROR_CLASSES",
    "status_of",
    "class_of_status",
]


class FarscopeError(Exception):
    """Base of every farscope error.

    `node` is the graph node's printed form and `where` the user's `file:line` that recorded it,
    when the error concerns one node; `job_id` names the server job when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        node_id: int | None = None,
        where: str | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.node = node
        self.node_id = node_id
        self.where = where
        self.job_id = job_id

    def __str__(self) -> str:
        parts = [self.message]
        if self.node:
            parts.append(f"  while executing: {self.node}")
        if self.where:
            parts.append(f"  recorded at: {self.where}")
        if self.job_id:
            parts.append(f"  job: {self.job_id}")
        return "\n".join(parts)


class TraceError(FarscopeError):
    """Raised on the client while recording: the operation has no deferred meaning."""


class ValidationError(FarscopeError):
    """The request was malformed or broke a rule; nothing ran."""


class VersionError(ValidationError):
    """Client and server speak different graph IR or protocol versions."""


class UploadMissingError(ValidationError):
    """The request names an upload by digest that this server does not hold (any more)."""


class ModelNotFoundError(FarscopeError):
    """The server serves no model of that name."""


class RemoteError(FarscopeError):
    """A node raised while the graph ran on the server."""


class AuthError(FarscopeError):
    """Credentials were missing or wrong, or do not allow this model."""


class PermissionDeniedError(AuthError):
    """The credentials are valid but do not allow this model."""


class LimitError(FarscopeError):
    """A request, rate or time limit was exceeded. `retry_after` (seconds) when waiting helps."""

    retry_after: float | None = None


class CancelledError(FarscopeError):
    """The job was cancelled before it finished."""


class TransportError(FarscopeError):
    """The server could not be reached, or the connection broke."""


# Class -> gRPC status code name (names, so this module needs no grpc import).
STATUS_OF: dict[type[FarscopeError], str] = {
    ValidationError: "INVALID_ARGUMENT",
    VersionError: "FAILED_PRECONDITION",
    UploadMissingError: "FAILED_PRECONDITION",
    ModelNotFoundError: "NOT_FOUND",
    RemoteError: "ABORTED",
    AuthError: "UNAUTHENTICATED",
    PermissionDeniedError: "PERMISSION_DENIED",
    LimitError: "RESOURCE_EXHAUSTED",
    CancelledError: "CANCELLED",
    TransportError: "UNAVAILABLE",
    FarscopeError: "INTERNAL",
}

ERROR_CLASSES: dict[str, type[FarscopeError]] = {
    cls.__name__: cls
    for cls in (
        FarscopeError,
        TraceError,
        ValidationError,
        VersionError,
        UploadMissingError,
        ModelNotFoundError,
        RemoteError,
        AuthError,
        PermissionDeniedError,
        LimitError,
        CancelledError,
        TransportError,
    )
}


# Statuses a server never aborts with but grpc itself reports (a deadline, the connection): what they
# mean to a user.
_TRANSPORT_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def status_of(error: FarscopeError) -> str:
    """The gRPC status name an error travels as: its nearest class in `STATUS_OF`."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return STATUS_OF[FarscopeError]


def class_of_status(status: str) -> type[FarscopeError]:
    """The first class `STATUS_OF` lists for `status` (the error's own class name travels beside the
    status, in the trailing metadata, and wins where it is known)."""
    if status in _TRANSPORT_STATUSES:
        return TransportError
    return next((cls for cls, name in STATUS_OF.items() if name == status), FarscopeError)
