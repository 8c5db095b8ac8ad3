"""The server's side of a round: its labeled high-res data, its supervised epochs, evaluation."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsim.data.partition import Partition
from fedsim.train.evaluate import evaluate
from fedsim.train.supervised import ExtraLoss, build_dataset, cosine_lr, make_loader, make_optimizer, supervised_epoch


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from the root seed and a position (round, client, ...)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0] >> 1)


class ServerTrainer:
    def __init__(self, model: nn.Module, partition: Partition, cfg):
        self.model = model
        self.partition = partition
        self.cfg = cfg
        self.train_cfg = cfg.train
        names = partition.names
        self.dataset = build_dataset(partition.server_images, partition.server_imgsz, names, cfg.train.batch)
        self.test_loaders = {
            d: make_loader(build_dataset(path, imgsz, names, cfg.train.eval_batch), cfg.train.eval_batch, False, 0)
            for d, (path, imgsz) in partition.test.items()
        }
        self.extra_loss: ExtraLoss | None = None
        self.frozen_backbone = True

    def loader(self, shuffle: bool = True, seed: int = 0):
        return make_loader(self.dataset, self.train_cfg.batch, shuffle=shuffle, seed=seed)

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def _epoch(self, lr: float, seed: int) -> dict[str, float]:
        optimizer = make_optimizer(self.model, lr, self.train_cfg.weight_decay)
        loader = make_loader(self.dataset, self.train_cfg.batch, shuffle=True, seed=seed)
        return supervised_epoch(
            self.model, loader, optimizer, seed=seed, extra_loss=self.extra_loss, frozen_backbone=self.frozen_backbone
        )

    def warmup(self, epochs: int) -> dict[str, float]:
        """Server-only supervised training before round 1 (cosine over its epochs)."""
        out: dict[str, float] = {}
        optimizer = make_optimizer(self.model, self.train_cfg.warmup_lr, self.train_cfg.weight_decay)
        for e in range(epochs):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(self.train_cfg.warmup_lr, e, epochs)
            seed = derive_seed(self.cfg.seed, 0, e, 1)
            loader = make_loader(self.dataset, self.train_cfg.batch, shuffle=True, seed=seed)
            out = supervised_epoch(
                self.model,
                loader,
                optimizer,
                seed=seed,
                extra_loss=self.extra_loss,
                frozen_backbone=self.frozen_backbone,
            )
        return out

    def train_epochs(self, epochs: int, rnd: int) -> dict[str, float]:
        """``epochs`` supervised epochs in round ``rnd``; lr follows a cosine over the rounds.

        A fresh optimizer each round keeps the server's state to the weights alone, so a
        resumed run is identical to an uninterrupted one.
        """
        lr = cosine_lr(self.train_cfg.lr, rnd - 1, self.cfg.rounds)
        out: dict[str, float] = {}
        for e in range(epochs):
            out = self._epoch(lr, derive_seed(self.cfg.seed, rnd, e, 2))
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.test_loaders)
