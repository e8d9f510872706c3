"""farscope: look inside, and intervene on, language models served on a remote GPU box.

    import farscope
    model = farscope.RemoteModel("smollm2-135m", address="localhost:50051")
    with model.trace("The Eiffel Tower is in the city of"):
        h = model.model.layers[5].output.save()

The client's names are imported on first use, so `farscope keys ...` and other commands that never
touch a model start without importing torch.
"""

from __future__ import annotations

from typing import Any

from farscope._version import __version__

__all__ = [
    "__version__",
    "RemoteModel",
    "Envoy",
    "Proxy",
    "Tracer",
    "Job",
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
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import farscope.client as client

        return getattr(client, name)
    raise AttributeError(f"module 'farscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
