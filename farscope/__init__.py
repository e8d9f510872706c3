"""farscope: look inside, and intervene on, language models served on a remote GPU box.

    import farscope
    model = farscope.RemoteModel("smollm2-135m", address="localhost:50051")
    with model.trace("The Eiffel Tower is in the city of"):
        h = model.model.layers[5].output.save()

NNsight scripts run with `import farscope as nnsight` and the model line swapped: `nnsight.save`,
`nnsight.list`, `nnsight.dict`, `nnsight.apply` and `nnsight.log` are here, and `remote=True` is accepted.

The client's names are imported on first use, so `farscope keys ...` and other commands that never
touch a model start without importing torch.
"""

from __future__ import annotations

import os
from typing import Any

from farscope._version import __version__

# The layout rule: every top-level code folder `X/` of the checkout is `farscope.X`. Installed, the
# subpackages lie beside this file (a wheel, or the strict editable install's link tree). A script run
# from the checkout's root finds this folder first, not the link tree, so there the checkout's root
# itself joins the package's search path and `farscope.client` is `client/`.
_checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and _checkout not in __path__:
    __path__.append(_checkout)

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
    "SavedTensor",
    # NNsight's module-level helpers (`import farscope as nnsight`): save, list, dict, apply, log.
    "save",
    "list",
    "dict",
    "apply",
    "log",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import farscope.client as client

        return getattr(client, name)
    raise AttributeError(f"module 'farscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
