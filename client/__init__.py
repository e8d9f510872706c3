"""The farscope client: RemoteModel, tracing and proxies. Imports nothing of the server."""

from farscope.interventions.errors import (
    AuthError,
    CancelledError,
    FarscopeError,
    LimitError,
    ModelNotFoundError,
    PermissionDeniedError,
    RemoteError,
    TraceError,
    TransportError,
    UploadMissingError,
    ValidationError,
    VersionError,
)

from .compat import apply, dict, list, log, save
from .envoy import Envoy
from .model import RemoteModel
from .proxy import Proxy, SavedTensor
from .runner import Job
from .tracing import Tracer

__all__ = [
    "RemoteModel",
    "Envoy",
    "Proxy",
    "Tracer",
    "Job",
    "FarscopeError",
    "TraceError",
    "ValidationError",
    "VersionError",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "RemoteError",
    "AuthError",
    "LimitError",
    "CancelledError",
    "TransportError",
    "UploadMissingError",
    "SavedTensor",
    "save",
    "list",
    "dict",
    "apply",
    "log",
]
