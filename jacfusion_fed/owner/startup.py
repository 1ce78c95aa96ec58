"""What an owner checks before it serves: anything it would otherwise fail on later, per call.

``owner serve`` calls :func:`check_can_serve` before it binds its port: a data source that
cannot be read (no such file, missing arrays, another dataset's modality), a current model
version that cannot be loaded (damaged store, a factory that is not importable in this
process) or a model whose input shape differs from the data's is one clear error at start,
instead of a service that says "serving" and then fails every call.
"""

from __future__ import annotations

from .importing import ModelImportError
from .workspace import OwnerWorkspace

__all__ = ["FACTORY_HINT", "OwnerStartupError", "check_can_serve"]

#: Where a safetensors model's factory must be importable from (import-model and serve).
FACTORY_HINT = (
    "the factory's package must be importable by the owner's Python: install it, or put the "
    "folder that holds it on PYTHONPATH (e.g. PYTHONPATH=. when mypkg/ is in the current folder)"
)


class OwnerStartupError(ValueError):
    """The owner cannot serve; the message names what is wrong, in one line."""


def check_can_serve(workspace: OwnerWorkspace) -> str | None:
    """Load the data source and the current model now; return the current version (``None``
    before the first model). Raises :class:`OwnerStartupError` naming the problem."""
    if workspace.source is not None:
        try:
            splits = workspace.records
        except (OSError, ValueError, KeyError) as exc:
            raise OwnerStartupError(f"data source {workspace.source}: {exc}") from exc
        if "train" not in splits:
            raise OwnerStartupError(f"data source {workspace.source} has no train split")
    try:
        version = workspace.store.current_version()
    except (OSError, ValueError) as exc:
        raise OwnerStartupError(f"the model store of {workspace.root}: {exc}") from exc
    if version is None:
        return None
    try:
        workspace.load_model(version)
        spec = workspace.input_spec(version)
    except ModelImportError as exc:
        hint = f"; {FACTORY_HINT}" if "factory" in str(exc) else ""
        raise OwnerStartupError(
            f"cannot load the current model version {version}: {exc}{hint}"
        ) from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise OwnerStartupError(f"cannot load the current model version {version}: {exc}") from exc
    if workspace.source is not None:
        shape = tuple(workspace.records["train"].modalities[workspace.modality].shape[1:])
        if tuple(spec.shape) != shape:
            raise OwnerStartupError(
                f"the current model version {version} takes records of shape "
                f"{tuple(spec.shape)}, the data source {workspace.source} has {shape}"
            )
    return version
