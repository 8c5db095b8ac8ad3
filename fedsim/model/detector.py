"""The detector: an Ultralytics ``DetectionModel`` with a frozen backbone and a travelling rest.

A model comes from a packaged Ultralytics YAML (``yolov8n.yaml``, any scale letter) or from a
local ``.pt`` checkpoint. Nothing is ever downloaded: a missing path is an error.

The *trainable state* is every state-dict entry outside the backbone (neck + head, buffers
included), as ``dict[str, numpy.ndarray]``. It is what clients receive and send back; the
backbone is broadcast once and never changes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from fedsim.model.checkpoint import (
    DetectorError,  # noqa: F401  (re-exported for existing callers)
    load_detector,
    save_detector,
)

# Loss gains v8DetectionLoss reads from model.args (Ultralytics defaults).
LOSS_GAINS = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)


def _layer_index(key: str) -> int:
    # state-dict keys look like "model.12.cv1.conv.weight"
    return int(key.split(".")[1])


def backbone_size(model: nn.Module) -> int:
    """Number of leading layers that form the backbone (from the model's YAML)."""
    return len(model.yaml["backbone"])


def build_detector(arch: str, names: list[str], weights: str | None = None, trust: bool = False) -> nn.Module:
    """Build a detection model for ``names`` from a YAML name/path or a local checkpoint.

    With ``weights`` the checkpoint's architecture and weights are used; if its class count
    differs from ``names`` the Detect head's class branch is rebuilt (shape-mismatched
    entries are left at their fresh initialisation). ``trust`` allows a checkpoint that needs
    classes outside the safe-loading allow-list (see :mod:`fedsim.model.checkpoint`).
    """

    if weights:
        model = load_checkpoint(weights, trust)
        if model.yaml.get("nc") != len(names):
            fresh = DetectionModel(model.yaml, nc=len(names), verbose=False)
            own = fresh.state_dict()
            own.update({k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape})
            fresh.load_state_dict(own)
            model = fresh
    else:
        model = DetectionModel(arch, nc=len(names), verbose=False)
    model.names = dict(enumerate(names))
    model.args = LOSS_GAINS
    return model.float()


def load_checkpoint(path: str | Path, trust: bool = False) -> nn.Module:
    """Load a detection model from a local ``.pt`` (fedsim or Ultralytics format); see ``load_detector``."""
    return load_detector(path, trust)


def save_checkpoint(model: nn.Module, path: str | Path, **extra: int | float | str) -> None:
    """Save in fedsim's weights-only format; see ``save_detector``."""
    save_detector(model, path, **extra)


def is_backbone_key(model: nn.Module, key: str) -> bool:
    return _layer_index(key) < backbone_size(model)


def freeze_backbone(model: nn.Module) -> None:
    """Backbone parameters stop requiring gradients; Detect's fixed DFL conv too."""
    n = backbone_size(model)
    for name, param in model.named_parameters():
        param.requires_grad = _layer_index(name) >= n and ".dfl." not in name


def train_mode(model: nn.Module, frozen_backbone: bool = True) -> nn.Module:
    """``model.train()`` but with the frozen backbone's BatchNorm kept in eval mode."""
    model.train()
    if frozen_backbone:
        for layer in model.model[: backbone_size(model)]:
            layer.eval()
    return model


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Keep every BatchNorm's running statistics fixed (eval mode); its affine weights still train."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def trainable_keys(model: nn.Module) -> list[str]:
    """State-dict keys that travel: everything after the backbone, except the constant DFL."""
    return [k for k in model.state_dict() if not is_backbone_key(model, k) and ".dfl." not in k]


def get_state(model: nn.Module, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """Copy the given (default: trainable) state-dict entries out as numpy arrays."""
    sd = model.state_dict()
    keys = trainable_keys(model) if keys is None else keys
    return {k: sd[k].detach().cpu().numpy().copy() for k in keys}


def set_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load numpy arrays into the matching state-dict entries, keeping their dtypes."""
    sd = model.state_dict()
    unknown = [k for k in state if k not in sd]
    if unknown:
        raise KeyError(f"state has keys the model lacks: {unknown[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            sd[k].copy_(torch.from_numpy(np.array(v)).to(sd[k].dtype))


def state_nbytes(state: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in state.values()))


def model_spec(model: nn.Module) -> dict:
    """What a remote process needs to rebuild the architecture (weights travel separately)."""
    return {"yaml": model.yaml}


def build_from_spec(spec: dict, names: list[str]) -> nn.Module:

    model = DetectionModel(dict(spec["yaml"]), nc=len(names), verbose=False)
    model.names = dict(enumerate(names))
    model.args = LOSS_GAINS
    return model.float()
