"""Labeled training: Ultralytics' dataset and ``v8DetectionLoss`` in a loop of our own.

``YOLO.train()`` is not used: it reloads FP16 EMA weights after training and resets hand-set
``requires_grad`` flags, which would undo the frozen backbone and change what travels.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Sampler
from ultralytics.cfg import get_cfg
from ultralytics.data.dataset import YOLODataset

from fedsim.model.detector import freeze_batchnorm_stats, train_mode
from fedsim.train.augment import StrongAugment, photometric_batch, scale_jitter

CPU = torch.device("cpu")
# Labeled images get colour, blur and noise jitter, but no cutouts (they would hide labeled objects).
SERVER_PHOTOMETRIC = StrongAugment(geometric=False, jitter_prob=0.8, grayscale_prob=0.1, blur_prob=0.3, erase_prob=0.0)
ExtraLoss = Callable[[nn.Module], torch.Tensor | None]


def build_dataset(images: str | Path | list[str], imgsz: int, names: list[str], batch: int):
    """An Ultralytics ``YOLODataset`` without augmentation, letterboxed to one rectangle shape.

    ``rect=True`` keeps wide driving images wide instead of padding them square. Every batch
    gets the same (largest) shape so shuffled batches still collate.
    """

    hyp = get_cfg(overrides={"imgsz": imgsz, "rect": True, "task": "detect"})
    dataset = YOLODataset(
        img_path=[str(p) for p in images] if isinstance(images, list) else str(images),
        imgsz=imgsz,
        batch_size=batch,
        augment=False,
        hyp=hyp,
        rect=True,
        cache=False,
        stride=32,
        pad=0.0,
        prefix="",
        task="detect",
        data={"names": dict(enumerate(names)), "nc": len(names), "channels": 3},
    )
    dataset.batch_shapes[:] = dataset.batch_shapes.max(0)
    return dataset


class ResolutionGroups(ConcatDataset):
    """Labeled sets trained together, each at its own resolution (e.g. the server's high-res set
    and the clients' low-res ones): ``make_loader`` draws every batch from a single set, so no
    image is rescaled to another holder's size.

    Only the first set's batches update BatchNorm running statistics (``supervised_epoch`` reads
    each batch's ``group``): the others keep them as they are, as FL clients keep the statistics
    they receive. Otherwise the many low-res client batches set the statistics the first set's
    high-res images are tested with, and the last few batches of an epoch decide them.
    """

    def __getitem__(self, idx: int) -> dict:
        group = bisect.bisect_right(self.cumulative_sizes, idx)
        return {**super().__getitem__(idx), "group": group}

    def collate_fn(self, batch: list[dict]) -> dict:
        return self.datasets[0].collate_fn(batch)


class GroupedBatches(Sampler[list[int]]):
    """Shuffled batches that never mix groups; the batch order is shuffled across groups."""

    def __init__(self, sizes: list[int], batch: int, shuffle: bool, generator: torch.Generator):
        self.sizes, self.batch, self.shuffle, self.generator = sizes, batch, shuffle, generator

    def __iter__(self):
        batches, offset = [], 0
        for n in self.sizes:
            order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            idx = (order + offset).tolist()
            batches += [idx[i : i + self.batch] for i in range(0, n, self.batch)]
            offset += n
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]
        return iter(batches)

    def __len__(self) -> int:
        return sum(math.ceil(n / self.batch) for n in self.sizes)


def make_loader(dataset, batch: int, shuffle: bool, seed: int) -> DataLoader:
    """In-process loader (``num_workers=0``) with its own seeded generator: the order depends on
    ``seed`` only, whatever else the process has drawn from torch's global RNG."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, ResolutionGroups):
        sizes = [len(d) for d in dataset.datasets]
        return DataLoader(
            dataset,
            batch_sampler=GroupedBatches(sizes, batch, shuffle, generator),
            num_workers=0,
            collate_fn=dataset.collate_fn,
        )
    return DataLoader(
        dataset,
        batch_size=min(batch, len(dataset)),
        shuffle=shuffle,
        num_workers=0,
        collate_fn=dataset.collate_fn,
        generator=generator,
    )


def to_float(batch: dict, device: torch.device) -> dict:
    batch["img"] = batch["img"].to(device).float() / 255.0
    for key in ("batch_idx", "cls", "bboxes"):
        batch[key] = batch[key].to(device)
    return batch


def random_hflip(batch: dict, generator: torch.Generator) -> dict:
    """Flip a random half of the images left-right, labels with them (cheap, label-safe)."""
    n = batch["img"].shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    if flip.any():
        batch["img"][flip] = batch["img"][flip].flip(-1)
        rows = flip[batch["batch_idx"].long().cpu()]
        batch["bboxes"][rows, 0] = 1.0 - batch["bboxes"][rows, 0]
    return batch


def loss_items(items: dict | torch.Tensor) -> list[float]:
    """box/cls/dfl from the criterion's detached items (a dict in Ultralytics 8.4, a tensor in 8.3)."""
    values = list(items.values()) if isinstance(items, dict) else list(items)
    return [float(v) for v in values[:3]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def cosine_lr(base: float, step: int, total: int, floor: float = 0.05) -> float:
    """Cosine decay from ``base`` to ``floor * base`` over ``total`` steps (rounds or epochs)."""
    if total <= 1:
        return base
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def supervised_epoch(
    model: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    seed: int,
    extra_loss: ExtraLoss | None = None,
    frozen_backbone: bool = True,
    device: torch.device = CPU,
    scale: tuple[float, float] | None = None,
) -> dict[str, float]:
    """One pass over labeled data; returns mean box/cls/dfl (and extra) losses.

    Every batch is flipped at random; with ``scale`` it is also resized by a random factor in that
    range (so the server's high-res labels also teach the clients' low resolution) and each image's
    colours, sharpness and noise are jittered (``SERVER_PHOTOMETRIC``). A batch from a
    ``ResolutionGroups`` set other than the first leaves BatchNorm statistics unchanged.
    """
    generator = torch.Generator().manual_seed(seed)
    sums = np.zeros(4)
    steps = 0
    for batch in loader:
        train_mode(model, frozen_backbone)
        if any(batch.get("group", ())):
            freeze_batchnorm_stats(model)
        batch = random_hflip(to_float(batch, device), generator)
        if scale is not None:
            batch = scale_jitter(batch, generator, *scale)
            batch["img"] = photometric_batch(batch["img"], generator, SERVER_PHOTOMETRIC)
        loss, items = model.loss(batch)
        total = loss.sum() / len(batch["img"])  # per image, as the extra term's coefficient assumes
        extra = extra_loss(model) if extra_loss else None
        if extra is not None:
            total = total + extra
            sums[3] += float(extra.detach())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        sums[:3] += loss_items(items)
        steps += 1
    mean = sums / max(steps, 1)
    return {"box_loss": mean[0], "cls_loss": mean[1], "dfl_loss": mean[2], "extra_loss": mean[3], "steps": steps}
