"""mAP@50 and mAP@50-95 per test domain and over all domains, with Ultralytics' metrics.

Ultralytics' standalone validation wraps the model in ``AutoBackend(fuse=True)``, which fuses
conv+BN and clears ``requires_grad`` on the object it is given. So the loop here runs on a deep
copy, and uses ``DetectionValidator``'s own pre/post-processing, matching and ``DetMetrics``.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils.metrics import DetMetrics


def _validator(save_dir: Path, conf: float, iou: float):

    v = DetectionValidator(
        save_dir=save_dir,
        args={
            "conf": conf,
            "iou": iou,
            "plots": False,
            "save_json": False,
            "save_txt": False,
            "verbose": False,
            "split": "val",
        },
    )
    v.device = torch.device("cpu")
    v.training = True  # we drive the loop ourselves: no AutoBackend, no dataset YAML
    v.data = {}
    return v


@torch.no_grad()
def evaluate(model: nn.Module, loaders: dict[str, object], conf: float = 0.001, iou: float = 0.7) -> dict[str, float]:
    """``{"map50/<domain>", "map/<domain>", ..., "map50/total", "map/total"}`` on a copy of ``model``."""

    net = copy.deepcopy(model).eval()
    out: dict[str, float] = {}
    total = DetMetrics()
    total.names = net.names
    with tempfile.TemporaryDirectory() as tmp:
        for domain, loader in loaders.items():
            v = _validator(Path(tmp), conf, iou)
            v.init_metrics(net)
            for batch in loader:
                batch = v.preprocess(batch)
                preds = v.postprocess(net(batch["img"]))
                v.update_metrics(preds, batch)
            for key, values in v.metrics.stats.items():
                total.stats[key].extend(values)
            v.metrics.process()
            out[f"map50/{domain}"] = float(v.metrics.box.map50)
            out[f"map/{domain}"] = float(v.metrics.box.map)
        total.process()
        out["map50/total"] = float(total.box.map50)
        out["map/total"] = float(total.box.map)
    return out
