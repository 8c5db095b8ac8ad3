"""Unlabeled client training: an EMA teacher labels each batch, the student learns from it.

Per job the teacher starts as a copy of the model the client received and follows the student
by EMA (``momentum``), as FedSTO's local EMA pseudo-labeler does. Teacher detections go through
Ultralytics' NMS, and only boxes with confidence >= ``conf_thres`` become labels.

Hard pseudo-labels miss objects; treating every unlabeled location as background then teaches
the student to see less each round, and the federation collapses. So, as FedSTO's tau1/tau2
scheme does, a class score the teacher gives in the uncertain band ``[ignore_thres, conf_thres)``
is left out of the student's classification loss (neither object nor background).

With ``train.teacher_scales`` the teacher also labels the weak view upscaled (``teacher_views``): a
client's low-resolution objects then appear at the sizes the server's images taught it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from ultralytics.utils.nms import non_max_suppression

from fedsim.model.detector import freeze_batchnorm_stats, train_mode
from fedsim.train.augment import Affine, StrongAugment, apply_geometric, draw_affine, photometric_batch
from fedsim.train.pseudo_quality import QualityCounts, match_counts
from fedsim.train.supervised import CPU, ExtraLoss, loss_items
from fedsim.train.thresholds import ClassThresholds


class EMATeacher:
    """A frozen copy of the model whose trainable tensors trail the student's by EMA."""

    def __init__(self, model: nn.Module, momentum: float, keys: list[str]):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.keys = keys

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        mine, theirs = self.model.state_dict(), student.state_dict()
        for k in self.keys:
            if mine[k].dtype.is_floating_point:
                mine[k].mul_(self.momentum).add_(theirs[k].detach(), alpha=1 - self.momentum)
            else:
                mine[k].copy_(theirs[k])


class IgnoreUncertainBCE(nn.Module):
    """``BCEWithLogits`` per element, zeroed where the teacher was unsure and assigned no target.

    ``high``: the pseudo-label threshold, one for all classes or a ``(nc,)`` tensor, one per class.
    """

    def __init__(self, teacher_scores: torch.Tensor, low: float, high: float | torch.Tensor):
        super().__init__()
        self.uncertain = (teacher_scores >= low) & (teacher_scores < high)  # (B, anchors, nc)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")
        return loss * ~(self.uncertain & (target <= 0))


class SoftNegativeBCE(nn.Module):
    """``BCEWithLogits`` per element whose target, where no pseudo-box was assigned, is the teacher's score.

    A missed object (teacher score under the threshold but well above zero) is then not taught as
    background; true background (teacher near 0) still is. Assigned locations keep their target.
    """

    def __init__(self, teacher_scores: torch.Tensor):
        super().__init__()
        self.teacher_scores = teacher_scores  # (B, anchors, nc), in [0, 1]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        soft = torch.where(target > 0, target, self.teacher_scores.to(target.dtype))
        return nn.functional.binary_cross_entropy_with_logits(pred, soft, reduction="none")


class ReliableBoxAssigner:
    """Wraps a loss's ``TaskAlignedAssigner`` so only confident pseudo-boxes teach box regression.

    The assigner's foreground mask selects the anchors the box losses (CIoU, DFL) train; the class
    loss reads its target scores instead. Dropping from that mask the anchors assigned to a pseudo-box
    whose teacher confidence is under ``box_thres`` keeps those boxes as class targets while their
    coordinates, which confidence says little about, teach no regression (Unbiased Teacher trains no
    regression on pseudo-boxes; Soft Teacher only on reliable ones). The box losses keep Ultralytics'
    normaliser (the sum of all target scores), so fewer reliable boxes also mean a lighter box loss.
    """

    def __init__(self, criterion, batch: dict[str, torch.Tensor], box_thres: float):
        self.assigner = criterion.assigner
        # The loss's own padding (``preprocess``) lays each image's confidences out in the slots the
        # assigner's ``gt_idx`` points at; the confidence rides in the class column, boxes are unused.
        conf = batch["conf"].view(-1, 1)
        rows = torch.cat([batch["batch_idx"].view(-1, 1), conf, torch.zeros(len(conf), 4, dtype=conf.dtype)], 1)
        unit = torch.ones(4, device=criterion.device)
        padded = criterion.preprocess(rows.to(criterion.device), len(batch["img"]), scale_tensor=unit)
        self.reliable = padded[..., 0] >= box_thres  # padding slots hold 0: never reliable

    def __call__(self, *args, **kwargs):
        labels, bboxes, scores, fg_mask, gt_idx = self.assigner(*args, **kwargs)
        if self.reliable.shape[1]:
            fg_mask = fg_mask & torch.gather(self.reliable, 1, gt_idx.long())
        return labels, bboxes, scores, fg_mask, gt_idx


def class_criterion(scores: torch.Tensor, negatives: str, ignore_thres: float | None, conf_thres: float | torch.Tensor):
    """The element-wise class loss for one batch (None: Ultralytics' own plain BCE)."""
    if negatives == "soft":
        return SoftNegativeBCE(scores)
    if ignore_thres is not None and bool((torch.as_tensor(conf_thres) > ignore_thres).any()):
        return IgnoreUncertainBCE(scores, ignore_thres, conf_thres)
    return None


@torch.no_grad()
def teacher_predict(teacher: nn.Module, img: torch.Tensor) -> torch.Tensor:
    """Decoded teacher output ``(B, 4 + nc, anchors)``: xywh pixels, then class scores in [0, 1]."""
    teacher.eval()
    preds = teacher(img)
    return preds[0] if isinstance(preds, (tuple, list)) else preds


def level_maps(x: torch.Tensor, height: int, width: int, strides: list[int]) -> list[torch.Tensor]:
    """Per-anchor values ``(B, C, anchors)`` of an ``height x width`` input as one ``(B, C, h, w)`` map per level.

    Anchors are each level's grid, flattened row-major, levels in stride order (Ultralytics'
    ``make_anchors``).
    """
    maps, start = [], 0
    for stride in strides:
        h, w = height // stride, width // stride
        maps.append(x[:, :, start : start + h * w].reshape(x.shape[0], x.shape[1], h, w))
        start += h * w
    return maps


@torch.no_grad()
def teacher_views(
    teacher: nn.Module, img: torch.Tensor, scales: tuple[int, ...], strides: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's detections on ``img`` at each integer upscaling in ``scales``, and its class scores.

    Returns ``preds (B, 4 + nc, anchors)``: every scale's decoded output with its boxes in ``img``'s
    pixels, concatenated along the anchors (one NMS then merges the scales), and ``scores
    (B, anchors_1x, nc)``: per anchor of ``img``'s own grid, the highest class score any scale gave
    there. At ``s``x a level's map is ``s`` times finer, so an ``s x s`` max-pool brings it back onto
    the 1x grid (``img``'s sides must be multiples of the largest stride, as every loader's are).
    """
    height, width = img.shape[2:]
    outputs, scores = [], None
    for s in scales:
        if s == 1:
            preds = teacher_predict(teacher, img)
            grid = preds[:, 4:]
        else:
            view = nn.functional.interpolate(img, scale_factor=s, mode="bilinear", align_corners=False)
            preds = teacher_predict(teacher, view)
            preds = torch.cat([preds[:, :4] / s, preds[:, 4:]], 1)
            fine = level_maps(preds[:, 4:], height * s, width * s, strides)
            grid = torch.cat([nn.functional.max_pool2d(level, s).flatten(2) for level in fine], 2)
        outputs.append(preds)
        scores = grid if scores is None else torch.maximum(scores, grid)
    assert scores is not None, "no teacher scale"
    return torch.cat(outputs, 2), scores.permute(0, 2, 1)


@torch.no_grad()
def pseudo_labels(
    teacher: nn.Module, img: torch.Tensor, conf_thres: float, iou_thres: float, max_det: int = 100
) -> dict[str, torch.Tensor]:
    """Teacher detections on ``img`` (B,3,H,W in [0,1]) as a label batch for ``v8DetectionLoss``.

    ``teacher`` is the teacher model or its already computed ``teacher_predict`` output.

    Returns ``batch_idx (N,)``, ``cls (N,1)``, ``bboxes (N,4)`` normalised xywh and ``conf (N,)``.
    """

    preds = teacher if isinstance(teacher, torch.Tensor) else teacher_predict(teacher, img)
    dets = non_max_suppression(preds, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
    h, w = img.shape[2:]
    scale = torch.tensor([w, h, w, h], dtype=img.dtype, device=img.device)
    idx, cls, boxes, conf = [], [], [], []
    for i, d in enumerate(dets):
        d = d[d[:, 4] >= conf_thres]
        xyxy = d[:, :4].clamp(min=0) / scale
        xyxy = xyxy.clamp(max=1)
        xywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        idx.append(torch.full((int(keep.sum()),), i, dtype=img.dtype, device=img.device))
        cls.append(d[keep, 5:6])
        boxes.append(xywh[keep])
        conf.append(d[keep, 4])
    return {"batch_idx": torch.cat(idx), "cls": torch.cat(cls), "bboxes": torch.cat(boxes), "conf": torch.cat(conf)}


def warp_scores(scores: torch.Tensor, params: list[Affine], hw: tuple[int, int], strides: list[int]) -> torch.Tensor:
    """Teacher class scores ``(B, anchors, nc)`` on the weak view, moved into the strong view's geometry.

    Every level map (``level_maps``) goes through the image's affine transform in its own pixel
    units (nearest neighbour); locations that come from outside the image get score 0, i.e. plain
    background, as the padding there is.
    """
    height, width = hw
    out = []
    for stride, level in zip(strides, level_maps(scores.permute(0, 2, 1), height, width, strides), strict=True):
        h, w = level.shape[2:]
        warped = torch.stack(
            [
                TF.horizontal_flip(moved) if p.flip else moved
                for p, moved in (
                    (
                        p,
                        TF.affine(
                            level[i],
                            angle=0.0,
                            translate=[p.translate[0] / stride, p.translate[1] / stride],
                            scale=p.scale,
                            shear=[0.0, 0.0],
                            interpolation=InterpolationMode.NEAREST,
                            fill=0.0,
                        ),
                    )
                    for i, p in enumerate(params)
                )
            ]
        )
        out.append(warped.permute(0, 2, 3, 1).reshape(scores.shape[0], h * w, -1))
    return torch.cat(out, 1)


def unsupervised_epoch(
    student: nn.Module,
    teacher: EMATeacher,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    conf_thres: float,
    iou_thres: float,
    seed: int,
    unsup_weight: float = 1.0,
    extra_loss: ExtraLoss | None = None,
    device: torch.device = CPU,
    ignore_thres: float | None = 0.1,
    negatives: str = "band",
    freeze_bn: bool = True,
    strong: StrongAugment | None = None,
    box_thres: float | None = None,
    thresholds: ClassThresholds | None = None,
    teacher_scales: tuple[int, ...] = (1,),
) -> dict[str, float]:
    """One local epoch on unlabeled images: the teacher labels a weak view, the student learns a strong one.

    Weak view: the image, flipped at random. Strong view (``strong``; None: the weak view itself):
    a random scale/translate/flip of the weak view with the pseudo-boxes mapped through the same
    transform, then photometric noise (``fedsim.train.augment``). The uncertain band's teacher
    scores are warped the same way, so the ignore mask lines up with the student's anchors.

    Labels the loader carries are never trained on; when present (a simulator diagnostic: the
    clients' true labels, which no real client has) they score the pseudo-labels:
    ``pseudo_precision``, ``pseudo_recall``, ``pseudo_iou`` and their counts.

    ``ignore_thres``: lower edge of the uncertain band (None: every unlabeled location is background).
    ``negatives``: ``"band"`` (that band) or ``"soft"`` (the teacher's scores as targets off the boxes).
    ``box_thres``: pseudo-boxes below this teacher confidence teach classification only, no box
    regression (None: every pseudo-box teaches both; see ``ReliableBoxAssigner``).
    ``thresholds``: per-class thresholds in place of ``conf_thres``, updated from every batch's
    teacher detections (``fedsim.train.thresholds``; None: ``conf_thres`` for every class).
    ``teacher_scales``: the integer upscalings the teacher labels the weak view at (``teacher_views``).
    ``freeze_bn``: keep BatchNorm statistics as received. Low-res, shifted client batches would
    otherwise rewrite the running statistics the server's high-res images are normalised with.
    """
    generator = torch.Generator().manual_seed(seed)
    sums = np.zeros(4)
    steps = n_pseudo = 0
    quality = QualityCounts()
    strides = [int(s) for s in student.stride]
    for raw in loader:
        img = raw["img"].to(device).float() / 255.0
        flip = torch.rand(img.shape[0], generator=generator) < 0.5
        img[flip] = img[flip].flip(-1)  # the weak view
        preds, scores = teacher_views(teacher.model, img, teacher_scales, strides)
        thres: float | torch.Tensor = conf_thres
        if thresholds is None:
            batch = {"img": img, **pseudo_labels(preds, img, conf_thres, iou_thres)}
        else:
            # NMS keeps a box whatever the lower-scored candidates are, so cutting each class at its
            # own threshold after NMS at the floor equals NMS at that threshold.
            found = pseudo_labels(preds, img, thresholds.floor, iou_thres)
            thresholds.update(found["conf"], found["cls"])
            thres = thresholds.values().to(device)
            keep = found["conf"] >= thres[found["cls"].view(-1).long()]
            batch = {"img": img, **{k: v[keep] for k, v in found.items()}}
        n_pseudo += int(batch["cls"].shape[0])
        if len(raw.get("cls", ())):
            quality = quality + match_counts(batch, _flipped_truth(raw, flip, device))
        if strong is not None:
            n, _, height, width = img.shape
            params = [draw_affine(generator, strong, height, width) for _ in range(n)] if strong.geometric else None
            if params is not None:
                batch = apply_geometric(batch, params, strong.min_visible, strong.min_size, strong.fill)
                scores = warp_scores(scores, params, (height, width), strides)
            if strong.photometric:
                batch["img"] = photometric_batch(batch["img"], generator, strong)
        train_mode(student)
        if freeze_bn:
            freeze_batchnorm_stats(student)
        criterion = student.criterion if getattr(student, "criterion", None) else student.init_criterion()
        student.criterion = criterion
        plain_bce, plain_assigner = criterion.bce, criterion.assigner
        criterion.bce = class_criterion(scores, negatives, ignore_thres, thres) or plain_bce
        if box_thres is not None:
            criterion.assigner = ReliableBoxAssigner(criterion, batch, box_thres)
        try:
            loss, items = student.loss(batch)
        finally:
            criterion.bce, criterion.assigner = plain_bce, plain_assigner
        # Ultralytics returns the loss times the batch size; per image, an extra term's coefficient
        # (FedProx mu, FedSTO's orthogonality, the MoE balance) means what it says.
        total = loss.sum() / len(batch["img"]) * unsup_weight
        extra = extra_loss(student) if extra_loss else None
        if extra is not None:
            total = total + extra
            sums[3] += float(extra.detach())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        teacher.update(student)
        sums[:3] += loss_items(items)
        steps += 1
    mean = sums / max(steps, 1)
    out = {
        "box_loss": mean[0],
        "cls_loss": mean[1],
        "dfl_loss": mean[2],
        "extra_loss": mean[3],
        "steps": steps,
        "n_pseudo": n_pseudo,
    }
    if quality.tp + quality.fp + quality.fn > 0:
        out.update({f"pseudo_{k}": v for k, v in quality.as_dict().items()})
    if thresholds is not None:
        out.update({f"class_thres_{c}": float(v) for c, v in enumerate(thresholds.values())})
    return out


def _flipped_truth(raw: dict, flip: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The loader's true labels in the weak view's geometry (the flipped images flipped too)."""
    boxes = raw["bboxes"].to(device).clone()
    owner = raw["batch_idx"].long().to(device)
    rows = flip.to(device)[owner]
    boxes[rows, 0] = 1.0 - boxes[rows, 0]
    return {"batch_idx": raw["batch_idx"].to(device), "cls": raw["cls"].to(device), "bboxes": boxes}
