"""ClientActor: a simulated edge device that runs one ``(client_id, round)`` job at a time.

An actor keeps nothing about any client between jobs: a job brings the client's shard path,
its device profile's threads and memory budget, and a seed; the round's global state comes
beside it. So any actor can serve any client and a restarted actor loses nothing. What it does
keep is the model skeleton with the frozen backbone, received once.

The memory budget is enforced twice. On CUDA, ``torch.cuda.set_per_process_memory_fraction``
caps the allocator at the job's budget, so an over-budget job raises an OOM (reported as a
failure) instead of taking memory from its neighbours. Always, the job's peak is measured
(``PeakMemory``: CUDA allocator peak, else sampled RSS above the worker's post-build baseline) and a job whose
peak exceeds the budget is reported as ``device budget exceeded: <peak> MiB > <budget> MiB``: a
real device with that much memory would not have finished it. On CPU the check is after the
fact (a thread cannot stop a training step halfway), so a job may briefly use more than its
budget; the round just never sees its update.

``clients.work: noop`` skips all of it but the transfers: the client returns the state it
received, with ``num_samples = 1``, and touches no data. That is how the driver, the pool and the
aggregation are measured and tested at scale without paying for training.

With ``compression.uplink`` set, the update travels encoded (``fedsim/compression.py``): the result
carries the payload instead of the state, ``bytes_up`` counts the payload's arrays, and a top-k
client returns its new residual beside it (device memory, which the driver keeps between jobs).
``model.client_backbone`` lowers the frozen backbone's precision once, when the actor is built.
"""

from __future__ import annotations

import time
import traceback
from functools import partial

import numpy as np
import ray
import torch

from fedsim.compression import encode
from fedsim.config import ExperimentConfig
from fedsim.model.detector import build_from_spec, get_state, set_state
from fedsim.model.precision import lower_backbone
from fedsim.runtime.memory import PeakMemory, rss_bytes
from fedsim.train.augment import StrongAugment
from fedsim.train.pseudo import EMATeacher, unsupervised_epoch
from fedsim.train.supervised import build_dataset, make_loader, make_optimizer
from fedsim.train.thresholds import ClassThresholds
from fedsim.types import ClientFailure, ClientJob, ClientResult, ClientTelemetry, Payload, State
from strategies import build as build_strategy


def budget_message(peak_mib: float, budget_mib: float) -> str:
    return f"device budget exceeded: {peak_mib:.0f} MiB > {budget_mib:.0f} MiB"


def cap_cuda_memory(budget_mib: float | None) -> None:
    """Cap this process's CUDA allocator at the budget (a no-op without CUDA)."""
    if budget_mib is None or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_mib * 2**20 / total))


class ClientWorker:
    """The work itself, separate from Ray so tests can run it in-process."""

    def __init__(
        self,
        cfg_dict: dict,
        model_spec: dict | None,
        full_state: dict[str, np.ndarray] | None,
        threads: int,
        budget_mib: float | None = None,
    ):
        torch.set_num_threads(threads)
        self.threads = threads
        self.cfg = ExperimentConfig.model_validate(cfg_dict)
        self.budget_mib = budget_mib
        self.noop = self.cfg.clients.work == "noop"
        if not self.noop:
            self.strategy = build_strategy(self.cfg)
            self.model = self.strategy.build_model(build_from_spec(model_spec, self.cfg.data.classes))
            set_state(self.model, full_state)
            lower_backbone(self.model, self.cfg.model.client_backbone)
        self.base_rss = rss_bytes()  # after the build: what the worker holds before any job

    def run(self, job: ClientJob, global_state: State) -> ClientResult | ClientFailure:
        try:
            budget = job.budget_mib if job.budget_mib is not None else self.budget_mib
            threads = job.threads or self.threads
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            cap_cuda_memory(budget)
            outcome = self._noop(job, global_state) if self.noop else self._train(job, global_state)
            peak = outcome.telemetry.peak_mem_mib
            if budget is not None and peak > budget:
                return ClientFailure(job.client_id, job.round, budget_message(peak, budget))
            return outcome
        except Exception as exc:  # a failing client must not take the round down
            return ClientFailure(job.client_id, job.round, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _encode(self, job: ClientJob, update: State, global_state: State) -> tuple[State, Payload | None, State | None]:
        """(the state to send, or {} with a payload instead; the new top-k residual)."""
        if self.cfg.compression.uplink == "none":
            return update, None, None
        payload, residual = encode(update, global_state, self.cfg.compression, job.residual)
        return {}, payload, residual

    def _noop(self, job: ClientJob, global_state: State) -> ClientResult:
        start = time.perf_counter()
        with PeakMemory(self.base_rss) as mem:
            update, payload, residual = self._encode(job, dict(global_state), global_state)
        telemetry = _telemetry(start, mem.peak_mib, update, payload, global_state)
        return ClientResult(job.client_id, job.round, update, 1, telemetry, payload=payload, residual=residual)

    def _train(self, job: ClientJob, global_state: State) -> ClientResult:
        start = time.perf_counter()
        plan = job.plan
        torch.manual_seed(job.seed)
        model = self.model
        set_state(model, global_state)
        keys = self.strategy.travelling_keys(model, job.round)
        trainable = set(keys)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable and ".dfl." not in name)
        received = {k: torch.from_numpy(np.array(v)) for k, v in global_state.items()}
        dataset = build_dataset(job.images, job.imgsz, self.cfg.data.classes, plan.batch)
        self.strategy.begin_training(model, job.client_id)
        strong = None
        if plan.strong_scale is not None:
            strong = StrongAugment(scale_min=plan.strong_scale[0], scale_max=plan.strong_scale[1])
        with PeakMemory(self.base_rss) as mem:
            teacher = EMATeacher(model, plan.ema_momentum, keys)
            thresholds = None
            if plan.class_thres == "adaptive":
                # the uncertain band's lower edge; a band that is empty (ignore_thres >= conf_thres) has none
                floor = plan.conf_thres / 4 if plan.ignore_thres is None else min(plan.ignore_thres, plan.conf_thres)
                thresholds = ClassThresholds(len(self.cfg.data.classes), plan.conf_thres, floor)
            optimizer = make_optimizer(model, plan.lr, plan.weight_decay)
            metrics: dict[str, float] = {}
            for epoch in range(plan.epochs):
                loader = make_loader(dataset, plan.batch, shuffle=True, seed=job.seed + epoch)
                metrics = unsupervised_epoch(
                    model,
                    teacher,
                    loader,
                    optimizer,
                    plan.conf_thres,
                    plan.nms_iou,
                    seed=job.seed + 7919 * epoch,
                    unsup_weight=plan.unsup_weight,
                    ignore_thres=plan.ignore_thres,
                    negatives=plan.negatives,
                    box_thres=plan.box_thres,
                    thresholds=thresholds,
                    teacher_scales=plan.teacher_scales,
                    freeze_bn=plan.freeze_bn,
                    strong=strong,
                    extra_loss=partial(self.strategy.client_loss_terms, received=received, rnd=job.round),
                )
            del teacher, optimizer
        metrics.update(self.strategy.client_metrics(model))
        update, payload, residual = self._encode(job, get_state(model, keys), global_state)
        # work_images: the virtual clock's compute measure
        telemetry = _telemetry(start, mem.peak_mib, update, payload, global_state, len(dataset) * plan.epochs)
        return ClientResult(
            job.client_id, job.round, update, len(dataset), telemetry, metrics, payload=payload, residual=residual
        )


def _telemetry(
    start: float, peak_mib: float, update: State, payload: Payload | None, received: State, work_images: float = 0.0
) -> ClientTelemetry:
    """What a job cost its device: bytes up are the payload's when the update travels encoded."""
    up = payload.nbytes if payload is not None else sum(v.nbytes for v in update.values())
    return ClientTelemetry(
        seconds=time.perf_counter() - start,
        peak_mem_mib=peak_mib,
        bytes_up=float(up),
        bytes_down=float(sum(v.nbytes for v in received.values())),
        work_images=float(work_images),
    )


@ray.remote
class ClientActor:
    def __init__(
        self,
        cfg_dict: dict,
        model_spec: dict | None,
        full_state: dict | None,
        threads: int,
        budget_mib: float | None = None,
    ):
        self.worker = ClientWorker(cfg_dict, model_spec, full_state, threads, budget_mib)
        self.node = ray.get_runtime_context().get_node_id()

    def run(self, job: ClientJob, global_state: dict) -> ClientResult | ClientFailure:
        out = self.worker.run(job, global_state)
        if isinstance(out, ClientResult):
            out.telemetry.node = self.node
        else:
            out.node = self.node
        return out

    def ready(self) -> bool:
        return True
