"""Bring your own model: import an externally trained network as a new model version.

Formats that load without running arbitrary pickled code:

* ``torchscript``: a ``torch.jit.save`` archive;
* ``export``: a ``torch.export.save`` archive (``.pt2``); a static batch size is served by
  padding to it;
* ``safetensors``: weights plus a ``package.module:factory`` entry point that builds the module
  (the factory must stay importable wherever the owner serves);
* a ``torch.save`` checkpoint only when ``torch.load(weights_only=True)`` reads it as a state
  dict (then with a factory, like safetensors); anything else is refused with the commands that
  convert it.

The head is the final linear layer ``z = W f + b`` (W: K x H) that produces the K logits,
named (``fc``, ``classifier.2``) or found when exactly one parameter pair has the shape of one.
On import :func:`check_head` recovers the features f of a probe batch by driving the head with
unit rows (H / K forward passes) and checks ``logits == W f + b``: only then does the Gram
matrix W W^T the coordinator fuses with belong to these logits.

A version is stored like a trained one (content-hashed, atomic, verified): archives as a uint8
tensor ``archive``, factory models as their state dict; the spec records the format, head,
K, H and the :class:`~jacfusion_fed.owner.input_spec.InputSpec`.
"""

from __future__ import annotations

import importlib
import io
import threading
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .input_spec import InputSpec

__all__ = [
    "IMPORT_FORMATS",
    "ImportedModel",
    "LoadedModel",
    "ModelImportError",
    "check_head",
    "detect_format",
    "find_head",
    "imported_model",
    "load_model_file",
    "probe_features",
    "rebuild",
]

IMPORT_FORMATS = ("torchscript", "export", "safetensors")
_PROBE = 16
_RTOL, _ATOL = 1e-4, 1e-5

_CONVERT = (
    "convert it where you trust the file: torch.jit.save(torch.jit.script(model), 'model.pt'), "
    "or torch.export.save(torch.export.export(model, (example,)), 'model.pt2'), or "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') and import it with "
    "--factory package.module:function"
)


class ModelImportError(ValueError):
    """A model file cannot be imported; the message names the file or layer and the problem."""


@dataclass
class LoadedModel:
    """A model file read into memory, before head detection."""

    format: str
    module: nn.Module
    state: dict[str, torch.Tensor]  # what the store keeps: {"archive": uint8} or the weights
    factory: str | None = None
    static_batch: int | None = None
    sample_shape: tuple[int, ...] | None = None  # known for export archives


class ImportedModel(nn.Module):
    """An imported network with the interface of :class:`~jacfusion_fed.models.UnimodalNet`.

    ``forward(x) = module(normalise(x))``; ``head`` is a detached copy of the final layer
    (what the owner publishes); ``spec`` is what the store records.
    """

    def __init__(
        self, loaded: LoadedModel, head_name: str, input_spec: InputSpec, head: nn.Linear
    ) -> None:
        super().__init__()
        self.module = loaded.module
        self.loaded = loaded
        self.head_name = head_name
        self.input_spec = input_spec
        self.head = head
        if loaded.format != "export":  # an exported program has no train/eval mode
            self.module.eval()
        # the head's input (the features) of the calling thread's forward pass, for the
        # owner's detector (issue 20): a permanent hook that stores only when that thread
        # asked, so concurrent forward passes never see each other's features
        self._capture = threading.local()
        self._hooked = False
        # archives (no hooks): the head probe on a private copy of the module, loaded from the
        # stored archive, so the serving module's weights are never touched; one at a time
        self._probe_lock = threading.Lock()
        self._probe_module: nn.Module | None = None
        # (an export's graph calls the head's op, not the submodule: hooks would not fire)
        if loaded.format not in ("torchscript", "export"):
            try:
                target = self.module.get_submodule(head_name)
            except AttributeError:
                target = None
            if isinstance(target, nn.Module) and not isinstance(target, torch.jit.ScriptModule):
                target.register_forward_pre_hook(self._store_features)
                self._hooked = True

    @property
    def num_classes(self) -> int:
        return int(self.head.out_features)

    @property
    def feature_dim(self) -> int:
        return int(self.head.in_features)

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "format": self.loaded.format,
            "factory": self.loaded.factory,
            "head": self.head_name,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "static_batch": self.loaded.static_batch,
            "input_spec": self.input_spec.to_dict(),
        }

    def train(self, mode: bool = True) -> ImportedModel:
        """Imported models only ever run in eval mode (an export has no train mode)."""
        self.training = False
        return self

    def _store_features(self, _module: nn.Module, inputs: tuple[Any, ...]) -> None:
        rows = getattr(self._capture, "rows", None)
        if rows is not None and inputs and isinstance(inputs[0], torch.Tensor):
            rows.append(inputs[0].detach())

    def recover_features(self, x: torch.Tensor) -> torch.Tensor | None:
        """The head's input (N, H) for inputs ``x``, or None when it cannot be read.

        Factory-built modules: one forward pass, the head's input read by a per-thread forward
        pre-hook. TorchScript and export archives (no hooks): the import's head probe
        (:func:`probe_features`, ceil(H / K) forward passes with unit rows as the head's
        weights) on a private copy of the module loaded from the stored archive, so the
        serving module is never modified; probes run one at a time."""
        if not self._hooked:
            return self._probe_archive(x)
        self._capture.rows = []
        try:
            with torch.no_grad():
                self.forward(x)
            rows: list[torch.Tensor] = self._capture.rows
        finally:
            self._capture.rows = None
        if not rows:
            return None
        feats = torch.cat(rows).flatten(1)
        return feats if feats.shape == (x.shape[0], self.feature_dim) else None

    def _probe_archive(self, x: torch.Tensor) -> torch.Tensor | None:
        data = self.loaded.state.get("archive")
        if self.loaded.format not in ("torchscript", "export") or data is None:
            return None
        with self._probe_lock, torch.no_grad():
            if self._probe_module is None:
                copy = _from_archive(self.loaded.format, data.numpy().tobytes(), "stored")
                if copy.format != "export":
                    copy.module.eval()
                self._probe_module = copy.module
            module = self._probe_module
            feats = probe_features(
                module,
                self.head_name,
                lambda z: self._run_module(module, z),
                self.input_spec.normalise(x),
            )
        return feats.to(torch.float32) if feats.shape == (x.shape[0], self.feature_dim) else None

    def _run_module(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b = self.loaded.static_batch
        if b is None:
            out: torch.Tensor = module(x)
            return out
        n = x.shape[0]  # an export with a static batch size: pad to a multiple of it
        pad = (-n) % b
        if pad:
            x = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
        return torch.cat([module(x[i : i + b]) for i in range(0, len(x), b)])[:n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_module(self.module, self.input_spec.normalise(x))


# --- reading files ---------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    """``torchscript``, ``export``, ``safetensors`` or ``pickle`` (a ``torch.save`` file)."""
    if path.suffix == ".safetensors":
        return "safetensors"
    if not zipfile.is_zipfile(path):
        with path.open("rb") as fh:
            head = fh.read(16)
        if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
            return "safetensors"
        return "pickle"
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if any("serialized_exported_program" in n or n.endswith("archive_format") for n in names):
        return "export"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    return "pickle"


def _factory(entry: str) -> Callable[[], nn.Module]:
    mod_name, sep, attr = entry.partition(":")
    if not sep or not mod_name or not attr:
        raise ModelImportError(f"factory {entry!r} must look like package.module:function")
    try:
        fn = importlib.import_module(mod_name)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as exc:
        raise ModelImportError(f"factory {entry!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise ModelImportError(f"factory {entry!r} is not callable")
    return fn


def _build_from_factory(entry: str, weights: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    module = _factory(entry)()
    if not isinstance(module, nn.Module):
        raise ModelImportError(f"factory {entry!r} returned {type(module).__name__}, not nn.Module")
    try:
        module.load_state_dict(dict(weights), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise ModelImportError(
            f"{source}: the weights do not fit the module built by {entry!r}: "
            + " ".join(s.strip() for s in first[:3])
        ) from exc
    return module.eval()


def _export_info(ep: Any) -> tuple[int | None, tuple[int, ...] | None]:
    """(static batch size or None, one sample's shape) of an exported program's first input."""
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in ep.graph_signature.user_inputs:
            continue
        val = node.meta.get("val")
        if val is None:
            break
        dims = list(val.shape)
        batch = dims[0] if isinstance(dims[0], int) else None
        rest = (
            tuple(int(d) for d in dims[1:]) if all(isinstance(d, int) for d in dims[1:]) else None
        )
        return batch, rest
    return None, None


def _from_archive(fmt: str, data: bytes, source: str) -> LoadedModel:
    state = {"archive": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    try:
        if fmt == "torchscript":
            with warnings.catch_warnings():  # "deprecated": still the format owners have
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call]
            return LoadedModel(fmt, module.eval(), state)
        ep = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise ModelImportError(f"{source}: not a readable {fmt} archive ({exc})") from exc
    batch, shape = _export_info(ep)
    return LoadedModel(fmt, ep.module(), state, static_batch=batch, sample_shape=shape)


def load_model_file(path: str | Path, *, factory: str | None = None) -> LoadedModel:
    """Read a model file (see the module docstring for the formats); never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise ModelImportError(f"model file {path} does not exist")
    fmt = detect_format(path)
    if fmt in ("torchscript", "export"):
        if factory is not None:
            raise ModelImportError(f"{path} is a {fmt} archive; --factory is only for weights")
        return _from_archive(fmt, path.read_bytes(), str(path))
    if fmt == "safetensors":
        try:
            weights = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelImportError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelImportError(
                f"{path} is a pickle checkpoint that torch.load(weights_only=True) cannot read "
                f"(loading it could run arbitrary code), so it is refused; {_CONVERT}"
            ) from exc
        if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise ModelImportError(
                f"{path} is a torch.save checkpoint but not a state dict of tensors; {_CONVERT}"
            )
        weights = dict(obj)
        fmt = "safetensors"  # stored the same way: weights + factory
    if factory is None:
        raise ModelImportError(
            f"{path} holds only weights: pass --factory package.module:function that builds the "
            "module they fill"
        )
    weights = {k: v.detach().contiguous() for k, v in weights.items()}
    return LoadedModel(fmt, _build_from_factory(factory, weights, str(path)), weights, factory)


# --- the head --------------------------------------------------------------------------------


def _parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = dict(module.named_parameters())
    params.update({k: v for k, v in module.named_buffers() if k not in params})
    return params


def find_head(module: nn.Module, num_classes: int, head: str | None = None) -> str:
    """The name of the final linear layer: ``head`` when given (checked), else the one
    parameter pair ``<name>.weight`` (K x H) / ``<name>.bias`` (K) of the module.

    Raises :class:`ModelImportError` naming the candidates when there are none or several.
    """
    params = _parameters(module)

    def fits(name: str) -> str | None:
        w = params.get(f"{name}.weight")
        if w is None:
            return f"has no parameter {name}.weight"
        if w.ndim != 2 or w.shape[0] != num_classes:
            return f"weight has shape {tuple(w.shape)}, expected ({num_classes}, H)"
        b = params.get(f"{name}.bias")
        if b is not None and tuple(b.shape) != (num_classes,):
            return f"bias has shape {tuple(b.shape)}, expected ({num_classes},)"
        if isinstance(module, nn.Module) and not isinstance(module, torch.jit.ScriptModule):
            try:
                sub = module.get_submodule(name)
            except AttributeError:
                sub = None
            if sub is not None and type(sub) is not nn.Module and not isinstance(sub, nn.Linear):
                return f"is a {type(sub).__name__}, not an nn.Linear"
        return None

    if head is not None:
        problem = fits(head)
        if problem:
            raise ModelImportError(f"head {head!r} {problem}")
        return head
    names = [k[: -len(".weight")] for k in params if k.endswith(".weight")]
    candidates = [n for n in names if fits(n) is None]
    if not candidates:
        raise ModelImportError(
            f"no linear layer with K={num_classes} outputs found; name the head with --head"
        )
    if len(candidates) > 1:
        raise ModelImportError(
            f"the head is ambiguous: {len(candidates)} layers produce K={num_classes} outputs "
            f"({', '.join(candidates)}); name it with --head"
        )
    return candidates[0]


def _head_params(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    params = _parameters(module)
    return params[f"{name}.weight"], params.get(f"{name}.bias")


def probe_features(
    module: nn.Module,
    name: str,
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
) -> torch.Tensor:
    """The head's input f (N, H) float64 of ``x``, read through the outputs: W is set to unit
    rows e_j (j = s .. s+K-1) and b to 0, so ``run(x)`` = f[s .. s+K-1], for s = 0, K, 2K, ...
    (ceil(H / K) passes). ``run`` calls ``module``; W and b are restored afterwards. It changes
    the module's weights while it runs: never on a module that serves other requests."""
    weight, bias = _head_params(module, name)
    k, h = weight.shape
    w0 = weight.detach().clone()
    b0 = None if bias is None else bias.detach().clone()
    feats = torch.zeros((x.shape[0], h), dtype=torch.float64)
    with torch.no_grad():
        try:
            for start in range(0, h, k):
                rows = min(k, h - start)
                unit = torch.zeros_like(w0)
                unit[torch.arange(rows), start + torch.arange(rows)] = 1
                weight.copy_(unit)
                if bias is not None:
                    bias.zero_()
                feats[:, start : start + rows] = run(x)[:, :rows].to(torch.float64)
        finally:
            weight.copy_(w0)
            if bias is not None and b0 is not None:
                bias.copy_(b0)
    return feats


def check_head(module: nn.Module, name: str, probe: torch.Tensor) -> tuple[nn.Linear, float]:
    """Check ``module(probe) == W f + b`` for the head ``name``; return (head copy, max error).

    The features f are recovered by :func:`probe_features` (unit rows as the head's weights).
    """
    weight, bias = _head_params(module, name)
    k, h = weight.shape
    w0 = weight.detach().clone()
    b0 = None if bias is None else bias.detach().clone()
    with torch.no_grad():
        logits = module(probe).to(torch.float64)
        if logits.shape != (probe.shape[0], k) or not torch.isfinite(logits).all():
            raise ModelImportError(f"the model's logits are not finite (N, K={k}) on a probe")
    feats = probe_features(module, name, module, probe)
    w64 = w0.to(torch.float64)
    b64 = torch.zeros(k, dtype=torch.float64) if b0 is None else b0.to(torch.float64)
    expected = feats @ w64.T + b64
    err = float((logits - expected).abs().max())
    scale = float(logits.abs().max())
    if not np.isfinite(err) or err > _ATOL + _RTOL * max(scale, 1.0):
        raise ModelImportError(
            f"layer {name!r} does not produce the model's logits: max |logits - head(features)| "
            f"= {err:.3g} on a probe batch of {probe.shape[0]} (is something applied after it, "
            "such as a softmax, a temperature or another layer?); its Gram matrix would not "
            "belong to these logits"
        )
    copy = nn.Linear(h, k, dtype=torch.float32)
    with torch.no_grad():
        copy.weight.copy_(w0.to(torch.float32))
        copy.bias.copy_(b64.to(torch.float32))
    return copy.requires_grad_(False), err


def imported_model(
    loaded: LoadedModel,
    input_spec: InputSpec,
    *,
    head: str | None = None,
    probe: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[ImportedModel, float]:
    """Find and check the head of ``loaded``; return the model and the probe's max error."""
    if loaded.sample_shape is not None and loaded.sample_shape != input_spec.shape:
        raise ModelImportError(
            f"the export archive takes records of shape {loaded.sample_shape}, the input spec "
            f"says {input_spec.shape}"
        )
    x = input_spec.probe(_PROBE) if probe is None else probe
    x = input_spec.normalise(x)
    with torch.no_grad():
        try:
            out = loaded.module(x[: loaded.static_batch] if loaded.static_batch else x)
        except Exception as exc:
            raise ModelImportError(
                f"the model fails on a probe batch of shape {tuple(x.shape)}: {exc}"
            ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelImportError(f"the model must return logits (N, K >= 2), got {got}")
    name = find_head(loaded.module, int(out.shape[1]), head)
    if check:
        lin, err = check_head(loaded.module, name, x[: loaded.static_batch or len(x)])
    else:
        w, b = _head_params(loaded.module, name)
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(torch.zeros(w.shape[0]) if b is None else b)
        lin.requires_grad_(False)
        err = 0.0
    return ImportedModel(loaded, name, input_spec, lin), err


def rebuild(spec: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> ImportedModel:
    """The :class:`ImportedModel` of a stored version (``spec`` and state from the store)."""
    fmt = spec.get("format")
    if fmt in ("torchscript", "export"):
        data = state["archive"].numpy().tobytes()
        loaded = _from_archive(str(fmt), data, f"stored {fmt} archive")
    elif fmt == "safetensors":
        entry = str(spec["factory"])
        loaded = LoadedModel(
            "safetensors", _build_from_factory(entry, state, "stored weights"), dict(state), entry
        )
    else:
        raise ModelImportError(f"unknown stored model format {fmt!r}")
    loaded.static_batch = spec.get("static_batch")
    model, _ = imported_model(
        loaded, InputSpec.from_dict(spec["input_spec"]), head=str(spec["head"]), check=False
    )
    return model
