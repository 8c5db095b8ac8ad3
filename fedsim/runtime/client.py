"""ClientActor: a simulated edge device that runs one ``(client_id, round)`` job at a time.

An actor keeps nothing about any client between jobs: a job brings the client's shard path,
the round's global state and a seed, so any actor can serve any client and a restarted actor
loses nothing. What it does keep is the model skeleton with the frozen backbone, received once.
"""

from __future__ import annotations

import time
import traceback
from functools import partial

import numpy as np
import ray
import torch

from fedsim.model.detector import build_from_spec, get_state, set_state
from fedsim.runtime.memory import PeakMemory
from fedsim.runtime.messages import ClientFailure, ClientJob, ClientResult
from fedsim.train.pseudo import EMATeacher, unsupervised_epoch
from fedsim.train.supervised import build_dataset, make_loader, make_optimizer


class ClientWorker:
    """The work itself, separate from Ray so tests can run it in-process."""

    def __init__(
        self,
        cfg_dict: dict,
        model_spec: dict,
        full_state: dict[str, np.ndarray],
        threads: int,
        budget_mib: float | None = None,
    ):
        from fedsim.config import ExperimentConfig
        from strategies import build as build_strategy

        torch.set_num_threads(threads)
        self.cfg = ExperimentConfig.model_validate(cfg_dict)
        self.strategy = build_strategy(self.cfg)
        self.model = self.strategy.build_model(build_from_spec(model_spec, self.cfg.data.classes))
        set_state(self.model, full_state)
        self.budget_mib = budget_mib

    def run(self, job: ClientJob, global_state: dict[str, np.ndarray]) -> ClientResult | ClientFailure:
        try:
            return self._run(job, global_state)
        except Exception as exc:  # a failing client must not take the round down
            return ClientFailure(job.client_id, job.round, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    def _run(self, job: ClientJob, global_state: dict[str, np.ndarray]) -> ClientResult | ClientFailure:
        start = time.perf_counter()
        s = job.settings
        torch.manual_seed(job.seed)
        model = self.model
        set_state(model, global_state)
        keys = self.strategy.travelling_keys(model, job.round)
        trainable = set(keys)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable and ".dfl." not in name)
        received = {k: torch.from_numpy(np.array(v)) for k, v in global_state.items()}
        dataset = build_dataset(job.images, job.imgsz, self.cfg.data.classes, s["batch"])
        self.strategy.client_begin(model)
        with PeakMemory() as mem:
            teacher = EMATeacher(model, s["ema_momentum"], keys)
            optimizer = make_optimizer(model, s["lr"], s["weight_decay"])
            metrics: dict[str, float] = {}
            for epoch in range(s["epochs"]):
                loader = make_loader(dataset, s["batch"], shuffle=True, seed=job.seed + epoch)
                metrics = unsupervised_epoch(
                    model,
                    teacher,
                    loader,
                    optimizer,
                    s["conf_thres"],
                    s["nms_iou"],
                    seed=job.seed + 7919 * epoch,
                    unsup_weight=s["unsup_weight"],
                    ignore_thres=s.get("ignore_thres"),
                    freeze_bn=s.get("freeze_bn", True),
                    extra_loss=partial(self.strategy.client_loss_terms, received=received, rnd=job.round),
                )
            del teacher, optimizer
        metrics.update(self.strategy.client_metrics(model))
        update = get_state(model, keys)
        bytes_down = sum(v.nbytes for v in global_state.values())
        metrics.update(
            peak_mem_mib=mem.peak_mib,
            seconds=time.perf_counter() - start,
            bytes_up=float(sum(v.nbytes for v in update.values())),
            bytes_down=float(bytes_down),
        )
        if self.budget_mib is not None and mem.peak_mib > self.budget_mib:
            return ClientFailure(
                job.client_id, job.round, f"device budget exceeded: {mem.peak_mib:.0f} MiB > {self.budget_mib:.0f} MiB"
            )
        return ClientResult(job.client_id, job.round, update, len(dataset), metrics)


@ray.remote
class ClientActor:
    def __init__(
        self, cfg_dict: dict, model_spec: dict, full_state: dict, threads: int, budget_mib: float | None = None
    ):
        self.worker = ClientWorker(cfg_dict, model_spec, full_state, threads, budget_mib)

    def run(self, job: ClientJob, global_state: dict) -> ClientResult | ClientFailure:
        return self.worker.run(job, global_state)

    def ready(self) -> bool:
        return True
