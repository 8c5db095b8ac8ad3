"""mAP@50 and mAP@50-95 per test domain and pooled over domains, with Ultralytics' metrics.

Ultralytics' standalone validation wraps the model in ``AutoBackend(fuse=True)``, which fuses
conv+BN and clears ``requires_grad`` on the object it is given. So the loop here runs on a deep
copy, and uses ``DetectionValidator``'s own pre/post-processing, matching and ``DetMetrics``.

Each domain's test images are scored at their holder's resolution (``map50/<domain>``): server
domains at full resolution, client domains at the clients' (``data.client_scale``), and
``map50/total`` pools the matches of all those test sets: the deployment setting, where a client
runs the model on its own low-resolution camera. The client domains' test images are scored
again at full resolution (``map50_hi/<domain>``), and ``map50_hi/total`` pools the server
domains' test sets with the client domains' full-resolution ones: every domain at full
resolution, which separates the domain shift from the resolution shift. ``map/...`` and
``map_hi/...`` are the same for mAP@50-95. Pooling concatenates the per-box matches before
computing AP (it is not a mean of the domains' mAPs), so larger test sets weigh more.
``map50_class/<class>`` splits ``map50/total`` by class (its mean over the classes with test
boxes): which objects a method helps, e.g. large cars against small pedestrians at low resolution.
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


Stats = dict[str, list]


def _domain_stats(net: nn.Module, loader: object, save_dir: Path, conf: float, iou: float) -> Stats:
    """Ultralytics' per-batch match statistics of ``net`` on one test set."""
    v = _validator(save_dir, conf, iou)
    v.init_metrics(net)
    for batch in loader:
        batch = v.preprocess(batch)
        preds = v.postprocess(net(batch["img"]))
        v.update_metrics(preds, batch)
    return {key: list(values) for key, values in v.metrics.stats.items()}


def _pooled(stats: list[Stats], names: dict[int, str]) -> DetMetrics:
    metrics = DetMetrics()
    metrics.names = names
    for one in stats:
        for key, values in one.items():
            metrics.stats[key].extend(values)
    metrics.process()
    return metrics


def _maps(stats: list[Stats], names: dict[int, str]) -> tuple[float, float]:
    """(mAP@50, mAP@50-95) of the pooled statistics of one or more test sets."""
    metrics = _pooled(stats, names)
    return float(metrics.box.map50), float(metrics.box.map)


def _total(stats: list[Stats], names: dict[int, str]) -> dict[str, float]:
    """``map50/total``, ``map/total`` and ``map50_class/<class>``: AP@50 of each class with test
    boxes in the pool, whose mean is its mAP@50."""
    box = _pooled(stats, names).box
    out = {"map50/total": float(box.map50), "map/total": float(box.map)}
    out.update({f"map50_class/{names[int(c)]}": float(ap) for c, ap in zip(box.ap_class_index, box.ap50, strict=True)})
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loaders: dict[str, object],
    hi_loaders: dict[str, object] | None = None,
    conf: float = 0.001,
    iou: float = 0.7,
) -> dict[str, float]:
    """Scores of a copy of ``model``: ``map50/<domain>``, ``map/<domain>``, ``map50/total``, ``map/total``
    on ``loaders``; with ``hi_loaders`` (client domain -> its full-resolution test set) also
    ``map50_hi/<domain>``, ``map_hi/<domain>`` and ``map50_hi/total``, ``map_hi/total``, which
    pool ``hi_loaders`` with the ``loaders`` of the domains it lacks (module docstring)."""

    net = copy.deepcopy(model).eval()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        held = {d: _domain_stats(net, loader, Path(tmp), conf, iou) for d, loader in loaders.items()}
        high = {d: _domain_stats(net, loader, Path(tmp), conf, iou) for d, loader in (hi_loaders or {}).items()}
    for suffix, per_domain in (("", held), ("_hi", high)):
        for domain, stats in per_domain.items():
            out[f"map50{suffix}/{domain}"], out[f"map{suffix}/{domain}"] = _maps([stats], net.names)
    out.update(_total(list(held.values()), net.names))
    if high:
        out["map50_hi/total"], out["map_hi/total"] = _maps(list({**held, **high}.values()), net.names)
    return out
