"""farscope: look inside, and intervene on, language models served on a remote GPU box.

    import farscope
    model = farscope.RemoteModel("smollm2-135m", address="localhost:50051")
    with model.trace("The Eiffel Tower is in the city of"):
        h = model.model.layers[5].output.save()
"""

from farscope._version import __version__
from farscope.client import (
    AuthError,
    CancelledError,
    Envoy,
    FarscopeError,
    LimitError,
    ModelNotFoundError,
    PermissionDeniedError,
    Proxy,
    RemoteError,
    RemoteModel,
    TraceError,
    Tracer,
    TransportError,
    UploadMissingError,
    ValidationError,
    VersionError,
)

__all__ = [
    "__version__",
    "RemoteModel",
    "Envoy",
    "Proxy",
    "Tracer",
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
]
