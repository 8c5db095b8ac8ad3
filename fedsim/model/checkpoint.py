"""Detector checkpoints that load without running arbitrary pickled code.

fedsim writes its own format, a plain dict that ``torch.load(path, weights_only=True)`` reads
with no help::

    {"format": "fedsim-detector/1", "yaml": {...}, "names": [...], "state": {key: tensor}, **meta}

Ultralytics' own ``.pt`` files pickle whole ``nn.Module`` objects. They are read with
``weights_only=True`` too, against an allow-list of the classes such files legitimately hold
(:func:`allowed_globals`). A file that needs anything else is refused unless the caller says it
trusts the source (``model.trust_checkpoint``), in which case it is unpickled in full.

Every failure is a one-line :class:`DetectorError` that starts with ``model.weights:``.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import os
import pkgutil
import re
import threading
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
import ultralytics.nn.modules
import ultralytics.nn.tasks
from torch import nn
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import IterableSimpleNamespace

FORMAT = "fedsim-detector/1"
_RESERVED = frozenset({"format", "yaml", "names", "state"})
_MAX_LISTED = 5
# torch.serialization.safe_globals edits a process-wide set and removes its entries on exit, so two
# threads loading at once could strip each other's allow-list mid-unpickle.
_SAFE_LOAD_LOCK = threading.Lock()


class DetectorError(ValueError):
    """A model source that cannot be used (missing file, wrong kind of checkpoint)."""


def _classes_in(module: types.ModuleType, base: type) -> list[type]:
    """Subclasses of ``base`` defined in ``module`` itself (not merely imported into it)."""
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module.__name__
    ]


def _classes_in_package(package: types.ModuleType, base: type) -> list[type]:
    """Subclasses of ``base`` defined in ``package`` or any of its direct submodules."""
    found = _classes_in(package, base)
    for info in pkgutil.iter_modules(package.__path__):
        found += _classes_in(importlib.import_module(f"{package.__name__}.{info.name}"), base)
    return found


@functools.cache
def allowed_globals() -> tuple:
    """The globals an Ultralytics detector checkpoint may reference under ``weights_only=True``.

    Entries are classes, or ``(object, "pickled.name")`` pairs where the pickled name differs.
    """

    # The layers: every nn.Module defined by torch.nn.modules and ultralytics.nn.modules (block, conv,
    # head, transformer, ...), and the model classes of ultralytics.nn.tasks. Classification,
    # segmentation, ... models are allowed too so that such a file can be named and refused.
    modules = _classes_in_package(torch.nn.modules, nn.Module)
    modules += _classes_in_package(ultralytics.nn.modules, nn.Module)
    modules += _classes_in(ultralytics.nn.tasks, nn.Module)
    # What else a checkpoint written by Ultralytics' trainer holds, as
    # torch.serialization.get_unsafe_globals_in_checkpoint reports it:
    #  - model.args is an IterableSimpleNamespace (fedsim's own older files: a types.SimpleNamespace);
    #  - best_fitness / train_metrics are numpy float64 scalars: numpy's scalar reconstructor (numpy 2
    #    pickles it as numpy._core..., files written under numpy 1 as numpy.core...), np.dtype, and
    #    np.dtypes.Float64DType, which the unpickler builds at run time and the scan therefore misses.
    scalar = np.float64(0).__reduce__()[0]
    extras = [
        IterableSimpleNamespace,
        types.SimpleNamespace,
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        np.dtype,
        type(np.dtype(np.float64)),
    ]
    return tuple(dict.fromkeys(modules)) + tuple(extras)


@functools.cache
def _allowed_names() -> frozenset[str]:
    return frozenset(e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}" for e in allowed_globals())


def _one_line(exc: BaseException, limit: int = 120) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unreadable(path: Path, exc: BaseException) -> DetectorError:
    """The one-line error for a file torch cannot read, with a short reason."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        reason = "empty file"
    elif head.startswith(b"PK") and not zipfile.is_zipfile(path):
        reason = "truncated or damaged zip archive"
    elif not head.startswith((b"PK", b"\x80")):  # 0x80 = pickle's PROTO opcode (torch's legacy format)
        reason = "neither a zip archive nor a pickle"
    elif str(exc).startswith("Weights only load failed") and exc.__context__ is not None:
        reason = _one_line(exc.__context__)  # the unpickler's own complaint, without torch's long preamble
    else:
        reason = _one_line(exc)
    return DetectorError(f"model.weights: {path} is not a readable PyTorch checkpoint ({reason})")


def _foreign_globals(path: Path, exc: BaseException) -> list[str]:
    """Globals the file needs beyond the allow-list; empty when that is not why loading failed."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive (legacy format or not torch at all): fall back on the message
        needed = re.findall(r"GLOBAL ([\w.]+)", str(exc)) if "Unsupported global" in str(exc) else []
    allowed = _allowed_names()
    return sorted({name for name in needed if name not in allowed})


def save_detector(model: nn.Module, path: str | Path, **meta: int | float | str) -> None:
    """Write ``model`` in fedsim's weights-only format (atomically, parent folders created)."""
    bad = [k for k, v in meta.items() if k in _RESERVED or not isinstance(v, (int, float, str))]
    if bad:
        raise TypeError(f"checkpoint metadata must be plain int/float/str under new keys: {bad}")
    names = getattr(model, "names", None) or {}
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else names
    nc = model.model[-1].nc
    ckpt = {
        "format": FORMAT,
        "yaml": copy.deepcopy(dict(model.yaml)),
        "names": [str(names.get(i, i)) for i in range(nc)],
        "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **meta,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(ckpt, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path, trust: bool):
    """``torch.load`` the file: weights-only with the allow-list, or in full when trusted and needed."""
    try:
        with _SAFE_LOAD_LOCK, torch.serialization.safe_globals(list(allowed_globals())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        foreign = _foreign_globals(path, exc)
        if not foreign:
            raise _unreadable(path, exc) from exc
        if not trust:
            listed = ", ".join(foreign[:_MAX_LISTED]) + (", ..." if len(foreign) > _MAX_LISTED else "")
            raise DetectorError(
                f"model.weights: {path} needs classes outside fedsim's allow-list ({listed}); load it only if "
                "you trust its source, with model.trust_checkpoint: true"
            ) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def _check_activation(spec: object) -> bool:
    """True for the only shape Ultralytics documents: ``[torch.]nn.Name(literal args)``."""
    try:
        call = ast.parse(str(spec).strip(), mode="eval").body
        func = call.func
        assert isinstance(call, ast.Call) and isinstance(func, ast.Attribute)
        assert ast.unparse(func.value) in ("nn", "torch.nn")
        klass = getattr(nn, func.attr)
        assert isinstance(klass, type) and issubclass(klass, nn.Module)
        for arg in [*call.args, *(kw.value for kw in call.keywords)]:
            ast.literal_eval(arg)
    except Exception:
        return False
    return True


def _check_yaml(path: Path, yaml: object) -> None:
    """Refuse an architecture that Ultralytics' parse_model would ``eval`` or call into unsafely.

    A rebuild (fedsim format, or a class-count change) runs parse_model on this dict, which
    ``eval``s the ``activation`` entry and looks layer names up among its module's globals.
    """

    def layer_ok(layer: object) -> bool:
        if not (isinstance(layer, (list, tuple)) and len(layer) == 4 and isinstance(layer[2], str)):
            return False
        name = layer[2]
        if name.startswith("nn."):
            obj = getattr(nn, name[3:], None)
        elif name.startswith("torchvision.ops."):
            obj = getattr(importlib.import_module("torchvision.ops"), name[16:], None)
        else:
            obj = vars(ultralytics.nn.tasks).get(name)
        return isinstance(obj, type) and issubclass(obj, nn.Module)

    if not isinstance(yaml, dict):
        raise DetectorError(f"model.weights: {path} holds no Ultralytics detection model (no architecture dict)")
    layers = [*yaml.get("backbone", []), *yaml.get("head", [])]
    unsafe = [str(layer)[:60] for layer in layers if not layer_ok(layer)]
    if yaml.get("activation") and not _check_activation(yaml["activation"]):
        unsafe.append(f"activation {str(yaml['activation'])[:60]!r}")
    if not layers or unsafe:
        raise DetectorError(
            f"model.weights: {path} has an architecture fedsim will not build ({'; '.join(unsafe) or 'no layers'})"
        )


def _from_fedsim(path: Path, ckpt: dict) -> nn.Module:

    if ckpt["format"] != FORMAT:
        raise DetectorError(f"model.weights: {path} has unsupported format {str(ckpt['format'])[:40]!r}")
    yaml, names, state = ckpt.get("yaml"), ckpt.get("names"), ckpt.get("state")
    _check_yaml(path, yaml)
    if not isinstance(names, list) or not isinstance(state, dict):
        raise DetectorError(f"model.weights: {path} is a malformed fedsim checkpoint (names or state missing)")
    try:
        model = DetectionModel(copy.deepcopy(yaml), nc=len(names), verbose=False)
        model.load_state_dict(state)
    except Exception as exc:
        raise DetectorError(f"model.weights: {path} is a malformed fedsim checkpoint ({_one_line(exc)})") from exc
    model.names = dict(enumerate(names))
    return model


def load_detector(path: str | Path, trust: bool = False) -> nn.Module:
    """Load a float32 Ultralytics ``DetectionModel`` in eval mode from a local fedsim or Ultralytics ``.pt``.

    Only exactly ``DetectionModel`` is accepted: its subclasses (segmentation, pose, OBB, RT-DETR,
    world, ...) carry other heads and losses that fedsim's trainable state and training do not handle.
    """

    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"model.weights: file not found: {path} (fedsim never downloads weights)")
    ckpt = _read(path, trust)
    if isinstance(ckpt, dict) and "format" in ckpt:
        model = _from_fedsim(path, ckpt)
    else:
        model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
        if not isinstance(model, nn.Module):
            raise DetectorError(f"model.weights: {path} holds no Ultralytics detection model")
        if type(model) is not DetectionModel:
            raise DetectorError(f"model.weights: {path} holds a {type(model).__name__}, not a detection model")
        _check_yaml(path, getattr(model, "yaml", None))
    return model.float().eval()


def describe_detector(path: str | Path, names: list[str], trust: bool = False) -> str:
    """One line for ``fedsim check``: what the checkpoint holds and what happens to its class branch."""
    model = load_detector(path, trust)
    yaml = model.yaml
    arch = Path(str(yaml.get("yaml_file") or "")).stem or f"scale {yaml.get('scale', '?')}"
    nc = model.model[-1].nc
    head = f"model.weights: {path}: DetectionModel {arch} ({nc} classes)"
    if nc == len(names):
        return f"{head}, class count unchanged"
    return f"{head} -> {len(names)} classes: the Detect class branch is re-initialised"
