"""The "foundation" detector: a YOLO pretrained on a separate synthetic source corpus.

A stand-in for COCO weights, which cannot be downloaded here. The corpus is the ``source``
domain of the synthetic generator: clear, saturated daylight scenes with all five classes in
balance and a wide range of object sizes, half at full and half at half resolution, and no
weather at all. So the backbone knows what vehicles, people and signs look like, but has never
seen fog, rain, snow or darkness: the federated stage must adapt to those from unlabeled data.

The checkpoint is cached by a hash of everything that determines it and reused by every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from fedsim.data.synthetic import CLASSES, SynthSpec, generate
from fedsim.model.detector import build_detector, load_checkpoint, save_checkpoint
from fedsim.train.supervised import build_dataset, cosine_lr, make_loader, make_optimizer, supervised_epoch

log = logging.getLogger(__name__)


def foundation_path(cache_root: Path, arch: str, images: int, epochs: int, seed: int, width: int, height: int) -> Path:
    spec = SynthSpec(images_per_domain={"source": images}, width=width, height=height, seed=seed)
    blob = json.dumps(dict(arch=arch, classes=CLASSES, epochs=epochs, data=spec.key()), sort_keys=True)
    return Path(cache_root) / f"foundation-{hashlib.sha1(blob.encode()).hexdigest()[:12]}.pt"


def pretrain(
    cache_root: Path,
    arch: str = "yolov8n.yaml",
    images: int = 1200,
    epochs: int = 12,
    seed: int = 0,
    width: int = 320,
    height: int = 192,
    batch: int = 16,
    lr: float = 2e-3,
    threads: int = 2,
    progress=print,
) -> Path:
    """Train (or find cached) the foundation checkpoint and return its path."""
    path = foundation_path(cache_root, arch, images, epochs, seed, width, height)
    if path.exists():
        return path
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    # Half the corpus at full and half at half resolution, so the backbone has seen both scales.
    hi_spec = SynthSpec(images_per_domain={"source": images // 2}, width=width, height=height, seed=seed + 1000)
    lo_spec = SynthSpec(
        images_per_domain={"source": images - images // 2}, width=width // 2, height=height // 2, seed=seed + 2000
    )
    hi = build_dataset(generate(hi_spec, cache_root) / "source" / "images", max(width, height), CLASSES, batch)
    lo = build_dataset(generate(lo_spec, cache_root) / "source" / "images", max(width, height) // 2, CLASSES, batch)
    model = build_detector(arch, CLASSES)
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = make_optimizer(model, lr, 5e-4)
    start = time.time()
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, epoch, epochs)
        losses = {}
        for j, dataset in enumerate((hi, lo)):
            losses = supervised_epoch(
                model,
                make_loader(dataset, batch, True, seed * 1000 + epoch * 2 + j),
                optimizer,
                seed=epoch * 2 + j,
                frozen_backbone=False,
            )
        progress(
            f"pretrain epoch {epoch + 1}/{epochs}  box {losses['box_loss']:.3f}  cls {losses['cls_loss']:.3f}"
            f"  {time.time() - start:.0f}s"
        )
    model.criterion = None
    save_checkpoint(model.eval(), path, source_images=images, epochs=epochs)
    return path


def load_foundation(path: Path):
    """Load the foundation checkpoint (fedsim's weights-only format; older full-pickle caches still load)."""
    return load_checkpoint(path)
