"""Per-class pseudo-label thresholds that follow how sure the teacher is of each class.

One confidence threshold for every class serves the classes a detector finds easily (large cars)
and starves the ones it finds with lower scores (at a client's low resolution: pedestrians, traffic
signs): they get few pseudo-labels, and every object of theirs the teacher missed is taught as
background, so the student learns them less each round. As FreeMatch's self-adaptive class
thresholds do for classification (Wang et al., ICLR 2023), each class's threshold here is the base
threshold scaled by the teacher's mean confidence in that class over its best class's:

    thres_c = max(floor, conf_thres * mean_c / max_k mean_k)

``mean_c`` is an EMA, over the job's batches, of the mean confidence of the teacher's detections
of class c that reach ``floor`` (the uncertain band's lower edge). The best-scored class keeps
``conf_thres``; a class not detected yet does too.
"""

from __future__ import annotations

import math

import torch


class ClassThresholds:
    def __init__(self, num_classes: int, conf_thres: float, floor: float, momentum: float = 0.9):
        if not 0 <= floor <= conf_thres:
            raise ValueError(f"floor {floor} must be in [0, conf_thres={conf_thres}]")
        self.conf_thres = conf_thres
        self.floor = floor
        self.momentum = momentum
        self.means = torch.full((num_classes,), float("nan"))

    def update(self, conf: torch.Tensor, cls: torch.Tensor) -> None:
        """Fold in one batch's teacher detections (confidence and class of each, all >= ``floor``)."""
        cls = cls.view(-1).long().cpu()
        conf = conf.view(-1).float().cpu()
        for c in cls.unique().tolist():
            batch_mean = float(conf[cls == c].mean())
            old = float(self.means[c])
            self.means[c] = batch_mean if math.isnan(old) else self.momentum * old + (1 - self.momentum) * batch_mean

    def values(self) -> torch.Tensor:
        """The current threshold of every class, ``(num_classes,)``."""
        seen = ~self.means.isnan()
        if not seen.any():
            return torch.full_like(self.means, self.conf_thres)
        ratio = torch.where(seen, self.means / self.means[seen].max(), torch.ones_like(self.means))
        return (self.conf_thres * ratio).clamp(min=self.floor)
