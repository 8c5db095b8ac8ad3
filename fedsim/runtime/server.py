"""The server's side of a round: its labeled high-res data, its supervised epochs, evaluation.

What the epochs train on, which parts and with which extra loss comes from the strategy's
``ServerPlan``, which the engine passes in every time (warm-up and every round, new run or
resumed): the trainer keeps no setting a strategy could have changed behind its back.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from fedsim.config import ExperimentConfig
from fedsim.data.partition import Partition
from fedsim.train.evaluate import evaluate
from fedsim.train.proximal import trainable_anchor, with_proximal
from fedsim.train.supervised import (
    ResolutionGroups,
    build_dataset,
    cosine_lr,
    make_loader,
    make_optimizer,
    supervised_epoch,
)
from fedsim.types import ServerPlan


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from the root seed and a position (round, client, ...)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0] >> 1)


class ServerTrainer:
    def __init__(self, model: nn.Module, partition: Partition, cfg: ExperimentConfig):
        self.model = model
        self.partition = partition
        self.cfg = cfg
        self.train_cfg = cfg.train
        names = partition.names
        self.server_set = build_dataset(partition.server_images, partition.server_imgsz, names, cfg.train.batch)
        self._with_clients: ResolutionGroups | None = None
        self.test_loaders = {
            d: make_loader(build_dataset(path, imgsz, names, cfg.train.eval_batch), cfg.train.eval_batch, False, 0)
            for d, (path, imgsz) in partition.test.items()
        }
        # The client domains' test images again at full resolution (map50_hi/...), apart from
        # test_loaders, whose first batches strategies may initialise from (samples()).
        self.test_hi_loaders = {
            d: make_loader(build_dataset(path, imgsz, names, cfg.train.eval_batch), cfg.train.eval_batch, False, 0)
            for d, (path, imgsz) in partition.test_hi.items()
        }

    def dataset(self, plan: ServerPlan):
        """The labeled images a plan trains on (the clients' true labels only for the oracle)."""
        if plan.labeled == "server":
            return self.server_set
        if self._with_clients is None:
            part = self.partition
            views = [str(part.labeled_client_view(c.client_id)) for c in part.clients]
            labeled = build_dataset(views, part.client_imgsz, part.names, self.train_cfg.batch)
            self._with_clients = ResolutionGroups([self.server_set, labeled])
        return self._with_clients

    def samples(self) -> dict[str, torch.Tensor]:
        """One unshuffled batch per labeled set, floats in [0, 1] (for ``Strategy.init_weights``)."""
        first = next(iter(make_loader(self.server_set, self.train_cfg.batch, shuffle=False, seed=0)))
        out = {"server": first["img"].float() / 255.0}
        for domain, loader in self.test_loaders.items():
            out[f"test/{domain}"] = next(iter(loader))["img"].float() / 255.0
        return out

    @property
    def num_samples(self) -> int:
        return len(self.server_set)

    def _epoch(self, plan: ServerPlan, optimizer: torch.optim.Optimizer, seed: int) -> dict[str, float]:
        loader = make_loader(self.dataset(plan), self.train_cfg.batch, shuffle=True, seed=seed)
        return supervised_epoch(
            self.model,
            loader,
            optimizer,
            seed=seed,
            extra_loss=plan.extra_loss,
            frozen_backbone=plan.frozen_backbone,
            scale=self.train_cfg.server_scale,
        )

    def warmup(self, epochs: int, plan: ServerPlan) -> dict[str, float]:
        """Server-only supervised training before round 1 (cosine over its epochs)."""
        out: dict[str, float] = {}
        optimizer = make_optimizer(self.model, self.train_cfg.warmup_lr, self.train_cfg.weight_decay)
        for e in range(epochs):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(self.train_cfg.warmup_lr, e, epochs)
            out = self._epoch(plan, optimizer, derive_seed(self.cfg.seed, 0, e, 1))
        return out

    def train_epochs(self, epochs: int, rnd: int, plan: ServerPlan) -> dict[str, float]:
        """``epochs`` supervised epochs in round ``rnd``; lr follows a cosine over the rounds.

        A fresh optimizer each epoch keeps the server's state to the weights alone, so a
        resumed run is identical to an uninterrupted one. With ``train.server_prox`` the epochs
        are pulled towards the weights they start from (the round's aggregate).
        """
        lr = cosine_lr(self.train_cfg.lr, rnd - 1, self.cfg.rounds)
        if self.train_cfg.server_prox > 0:
            pull = with_proximal(plan.extra_loss, trainable_anchor(self.model), self.train_cfg.server_prox)
            plan = replace(plan, extra_loss=pull)
        out: dict[str, float] = {}
        for e in range(epochs):
            optimizer = make_optimizer(self.model, lr, self.train_cfg.weight_decay)
            out = self._epoch(plan, optimizer, derive_seed(self.cfg.seed, rnd, e, 2))
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.test_loaders, self.test_hi_loaders)
