"""How good are pseudo-labels? Match them to the true labels and count hits, misses and false alarms.

Both label sets are in the batch form of ``fedsim.train.pseudo.pseudo_labels``: ``batch_idx (N,)``,
``cls (N, 1)``, ``bboxes (N, 4)`` normalised centre xywh, and for predictions optionally ``conf (N,)``.

Matching is class-aware and greedy per image, as in VOC/COCO evaluation: predictions are visited
from the highest confidence down (input order without ``conf``); each takes the unmatched true box
of its class with the highest IoU, and is a true positive when that IoU >= ``iou_thres``. Every
true box is matched at most once, so a duplicate detection is a false positive.

Conventions for empty sets, chosen so that logged values are never nan:
precision = tp / (tp + fp) is 1.0 when nothing was predicted (no false alarm was made), and
recall = tp / (tp + fn) is 1.0 when there was nothing to find; so an image with neither scores 1/1.
``mean_iou`` is the mean IoU of the matched pairs, 0.0 when there are none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_convert, box_iou


@dataclass(frozen=True)
class QualityCounts:
    """Summable counts of a pseudo-label comparison; ``a + b`` pools two batches."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __add__(self, other: QualityCounts) -> QualityCounts:
        return QualityCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def mean_iou(self) -> float:
        return self.iou_sum / self.tp if self.tp else 0.0

    def as_dict(self) -> dict[str, float]:
        """Counts and ratios; ``matches`` equals ``tp``, kept for readers summing ``iou_sum / matches``."""
        return {
            "tp": float(self.tp),
            "fp": float(self.fp),
            "fn": float(self.fn),
            "matches": float(self.tp),
            "iou_sum": self.iou_sum,
            "precision": self.precision,
            "recall": self.recall,
            "mean_iou": self.mean_iou,
        }

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> QualityCounts:
        return cls(int(d["tp"]), int(d["fp"]), int(d["fn"]), float(d["iou_sum"]))


def _xyxy(labels: dict, rows: torch.Tensor) -> torch.Tensor:
    return box_convert(labels["bboxes"][rows].float(), in_fmt="cxcywh", out_fmt="xyxy")


def match_counts(pred: dict, true: dict, iou_thres: float = 0.5) -> QualityCounts:
    """Greedy class-aware matching of ``pred`` against ``true`` over all images of the batch."""
    p_img, t_img = pred["batch_idx"].long().cpu(), true["batch_idx"].long().cpu()
    p_cls, t_cls = pred["cls"].reshape(-1).long().cpu(), true["cls"].reshape(-1).long().cpu()
    conf = pred.get("conf")
    p_conf = conf.reshape(-1).float().cpu() if conf is not None else torch.zeros(len(p_img))
    total = QualityCounts()
    for image in torch.cat([p_img, t_img]).unique().tolist():
        p_rows = (p_img == image).nonzero().squeeze(1)
        t_rows = (t_img == image).nonzero().squeeze(1)
        p_rows = p_rows[torch.argsort(p_conf[p_rows], descending=True, stable=True)]
        iou = box_iou(_xyxy(pred, p_rows.to(pred["bboxes"].device)), _xyxy(true, t_rows.to(true["bboxes"].device)))
        iou = iou.cpu()
        # other classes can never match: IoU -1 keeps them below any threshold
        iou[p_cls[p_rows][:, None] != t_cls[t_rows][None, :]] = -1.0
        free = torch.ones(len(t_rows), dtype=torch.bool)
        tp = 0
        iou_sum = 0.0
        for i in range(len(p_rows)):
            if not free.any():
                break
            candidates = torch.where(free, iou[i], torch.full_like(iou[i], -1.0))
            best = int(candidates.argmax())
            if candidates[best] >= iou_thres:
                free[best] = False
                tp += 1
                iou_sum += float(candidates[best])
        total += QualityCounts(tp=tp, fp=len(p_rows) - tp, fn=len(t_rows) - tp, iou_sum=iou_sum)
    return total


def pseudo_label_quality(pred: dict, true: dict, iou_thres: float = 0.5) -> dict[str, float]:
    """``tp``, ``fp``, ``fn``, ``matches``, ``iou_sum``, ``precision``, ``recall``, ``mean_iou`` of one batch.

    Sum batches with ``merge`` (or ``QualityCounts`` and ``+``); averaging the ratios would weight batches equally.
    """
    return match_counts(pred, true, iou_thres).as_dict()


def merge(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Pool two ``pseudo_label_quality`` results: counts summed, ratios recomputed from the sums."""
    return (QualityCounts.from_dict(a) + QualityCounts.from_dict(b)).as_dict()
