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

# Loss gains v8DetectionLoss reads from model.args (Ultralytics defaults).
LOSS_GAINS = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)


class DetectorError(ValueError):
    """A model source that cannot be used (missing file, wrong kind of checkpoint)."""


def _layer_index(key: str) -> int:
    # state-dict keys look like "model.12.cv1.conv.weight"
    return int(key.split(".")[1])


def backbone_size(model: nn.Module) -> int:
    """Number of leading layers that form the backbone (from the model's YAML)."""
    return len(model.yaml["backbone"])


def build_detector(arch: str, names: list[str], weights: str | None = None) -> nn.Module:
    """Build a detection model for ``names`` from a YAML name/path or a local checkpoint.

    With ``weights`` the checkpoint's architecture and weights are used; if its class count
    differs from ``names`` the Detect head's class branch is rebuilt (shape-mismatched
    entries are left at their fresh initialisation).
    """
    from ultralytics.nn.tasks import DetectionModel

    if weights:
        model = load_checkpoint(weights)
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


def load_checkpoint(path: str | Path) -> nn.Module:
    """Load a detection model from a local ``.pt`` (Ultralytics or fedsim format)."""
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"model.weights: file not found: {path} (fedsim never downloads weights)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt file, pickle from another library, ...
        raise DetectorError(f"model.weights: cannot read checkpoint {path}: {exc}") from exc
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else ckpt
    if not isinstance(model, nn.Module) or not hasattr(model, "yaml"):
        raise DetectorError(f"model.weights: {path} holds no Ultralytics detection model")
    return model.float()


def save_checkpoint(model: nn.Module, path: str | Path, **extra) -> None:
    """Save in the layout Ultralytics' loaders understand (``{"model": module, ...}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model, **extra}, tmp)
    tmp.replace(path)


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
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(dict(spec["yaml"]), nc=len(names), verbose=False)
    model.names = dict(enumerate(names))
    model.args = LOSS_GAINS
    return model.float()
