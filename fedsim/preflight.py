"""Everything verified before a run starts, and nothing else: ``fedsim check`` and the top of ``fedsim run``.

Two steps, neither of which starts Ray:

1. ``parse`` / ``load``: the config's own fields (``fedsim.config``), then the checks that need
   names defined above the config layer: synthetic domains, the data format, device profiles,
   the strategy's parameters. One ``fedsim: config error: ...`` line per bad field.
2. ``check``: the data (index and label checks, the split's sizes, no empty client shard), the
   weights (the checkpoint loads through the safe allow-list, holds a detection model, and the
   class-count change it implies), and the device profiles against this machine's resources.

Switching methods from the command line (``--set strategy.name=X`` on a config whose
``strategy.params`` belong to another method) runs X with X's defaults: ``load`` drops the other
method's parameters and says which in a note; a parameter no method knows stays an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from fedsim import privacy
from fedsim.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_error,
    field_problems,
    read_yaml_mapping,
)
from fedsim.data.formats import FORMATS, available_images, format_module
from fedsim.data.partition import split_problems
from fedsim.data.yolo_folder import DataError
from fedsim.model.checkpoint import DetectorError, describe_detector
from fedsim.runtime.resources import ProfileAssignment, known_profiles
from fedsim.storage import cache_dir, resolve
from fedsim.train.foundation import foundation_path
from strategies import STRATEGIES, get, owners_of, resolve_params


class CheckFailed(RuntimeError):
    """A run that would not start; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(f"fedsim: check: {p}" for p in problems))
        self.problems = problems


def _cross_problems(cfg: ExperimentConfig) -> list[str]:
    problems = []
    d = cfg.data
    if d.format not in FORMATS:
        problems.append(f"data.format: unknown format {d.format!r}; valid: {', '.join(sorted(FORMATS))}")
    else:
        problems += format_module(d.format).config_problems(d)
    if cfg.strategy.name in STRATEGIES:
        problems += privacy.config_problems(cfg, get(cfg.strategy.name).uses_clients)
    known = known_profiles(cfg.clients.profiles)
    unknown = [n for n in cfg.clients.profile_names if n not in known]
    if unknown:
        problems.append(
            f"clients.profile: unknown device profile(s) {unknown}; known: {sorted(known)} "
            "(add your own under clients.profiles)"
        )
    return problems


def parse(raw: dict) -> ExperimentConfig:
    """A raw dict as a config: its fields, then the cross-checks; every problem in one ConfigError."""
    cfg, problems = field_problems(raw)
    strategy = (raw.get("strategy") or {}) if isinstance(raw, dict) else {}
    if isinstance(strategy, dict):
        problems += resolve_params(strategy.get("name", "fedavg"), strategy.get("params") or {})
    if cfg is not None:
        problems += _cross_problems(cfg)
    if problems:
        raise config_error(problems)
    return cfg


def drop_foreign_params(raw: dict, notes: list[str]) -> None:
    """Leave out the params that belong to another method than ``strategy.name`` (with a note)."""
    strategy = raw.get("strategy")
    if not isinstance(strategy, dict) or not isinstance(strategy.get("params"), dict):
        return
    name = strategy.get("name", "fedavg")
    if name not in STRATEGIES:
        return  # reported as an unknown strategy

    own = get(name).Params.model_fields
    foreign = [k for k in strategy["params"] if k not in own and owners_of(k)]
    if foreign:
        for k in foreign:
            del strategy["params"][k]
        notes.append(
            f"strategy {name}: dropped parameter(s) {', '.join(foreign)} of another method; "
            f"{name} runs with its defaults"
        )


def load(path: str | Path, overrides: list[str] | None = None, notes: list[str] | None = None) -> ExperimentConfig:
    """An experiment YAML with ``--set`` overrides, fully validated (``notes`` collects what was dropped)."""
    raw = read_yaml_mapping(Path(path), "fedsim: config error: ", ConfigError)
    file_name = (raw.get("strategy") or {}).get("name") if isinstance(raw.get("strategy"), dict) else None
    raw = apply_overrides(raw, overrides or [])
    new_name = (raw.get("strategy") or {}).get("name") if isinstance(raw.get("strategy"), dict) else None
    if new_name != file_name:
        drop_foreign_params(raw, notes if notes is not None else [])
    return parse(raw)


@dataclass
class CheckReport:
    summary: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _check_data(cfg: ExperimentConfig, report: CheckReport) -> None:
    d = cfg.data
    try:
        available = available_images(d)
    except DataError as exc:
        report.problems.append(f"data: {exc}")
        return
    problems = split_problems(available, d, cfg.clients.num_clients)
    report.problems += [f"data: {p}" for p in problems]
    shard = d.client_images // max(1, -(-cfg.clients.num_clients // len(set(d.client_domains))))
    skew = [f"label skew Dir({d.dirichlet_alpha})"] if d.partition == "dirichlet" else []
    skew += [f"quantity skew Dir({d.quantity_alpha})"] if d.quantity_alpha is not None else []
    sizes = f"{', '.join(skew)}: at least 1, about {shard} images on average" if skew else f"about {shard} images each"
    report.summary.append(
        f"data: {d.format}, server {d.server_images} labeled ({', '.join(d.server_domains)}), "
        f"{cfg.clients.num_clients} clients over {', '.join(d.client_domains)} ({sizes}), "
        f"{d.test_images} test images per domain"
    )


def _check_weights(cfg: ExperimentConfig, report: CheckReport) -> None:
    m = cfg.model
    if m.weights is None:
        report.summary.append(f"model.weights: none ({m.arch} from random initialisation)")
        return
    path = resolve(m.weights)
    if m.weights == "foundation":
        path = foundation_path(
            cache_dir(), m.arch, m.pretrain_images, m.pretrain_epochs, m.pretrain_seed, cfg.data.width, cfg.data.height
        )
        if not path.exists():
            report.summary.append(f"model.weights: foundation, not built yet (the run pretrains it first: {path})")
            return
    try:
        report.summary.append(describe_detector(path, cfg.data.classes, trust=m.trust_checkpoint))
    except DetectorError as exc:
        report.problems.append(str(exc))


def _local_resources() -> dict[str, float]:

    return {
        "CPU": float(os.cpu_count() or 1),
        "GPU": float(torch.cuda.device_count()),
        "memory": float(psutil.virtual_memory().total),
    }


def _check_profiles(cfg: ExperimentConfig, report: CheckReport) -> None:
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        report.summary.append("clients: on a Ray cluster (its resources are checked when the pool starts)")
        return
    have = _local_resources()
    profiles = ProfileAssignment.from_config(cfg.clients)
    for name, p in profiles.profiles.items():
        if p.num_gpus > 0 and have["GPU"] == 0:
            report.problems.append(
                f"clients.profile: {name} needs {p.num_gpus} GPU per client; this machine has no CUDA device"
            )
        if p.num_cpus > have["CPU"]:
            report.problems.append(
                f"clients.profile: {name} needs {p.num_cpus} CPUs; this machine has {have['CPU']:.0f}"
            )
        if p.memory_gib * 2**30 > have["memory"]:
            report.problems.append(
                f"clients.profile: {name} budgets {p.memory_gib} GiB per client; "
                f"this machine has {have['memory'] / 2**30:.1f} GiB"
            )
    report.summary.append(
        f"clients: {cfg.clients.per_round} of {cfg.clients.num_clients} per round, profile(s) "
        f"{', '.join(cfg.clients.profile_names)}; this machine: {have['CPU']:.0f} CPUs, {have['GPU']:.0f} GPUs"
    )


def _summarise_uplink(cfg: ExperimentConfig, report: CheckReport) -> None:
    c, p = cfg.compression, cfg.privacy
    if c.uplink != "none":
        how = {"int8": f"per {c.int8_granularity}", "topk": f"fraction {c.topk_fraction}, error feedback"}
        report.summary.append(f"compression: uplink {c.uplink} {how.get(c.uplink, '')}".rstrip())
    if cfg.model.client_backbone != "fp32":
        report.summary.append(f"model.client_backbone: {cfg.model.client_backbone} on client actors")
    if privacy.enabled(p):
        q = privacy.sampling_rate(cfg.clients.per_round, cfg.clients.num_clients)
        eps = privacy.epsilon(q, p.noise_multiplier, cfg.rounds, p.delta, p.accountant)
        report.summary.append(
            f"privacy: clip {p.clip_norm}, noise multiplier {p.noise_multiplier}, q {q:.3g}: "
            f"epsilon {eps:.3g} at delta {p.delta:g} after {cfg.rounds} rounds ({p.accountant})"
        )


def check(cfg: ExperimentConfig) -> CheckReport:
    """What would stop ``cfg`` from running, without starting Ray or writing anything."""
    report = CheckReport(summary=[f"config: {cfg.name}, {cfg.strategy.name}, {cfg.rounds} rounds, seed {cfg.seed}"])
    _check_data(cfg, report)
    _check_weights(cfg, report)
    _check_profiles(cfg, report)
    _summarise_uplink(cfg, report)
    return report


def check_or_raise(cfg: ExperimentConfig, echo: Callable[[str], None] | None = None) -> CheckReport:
    report = check(cfg)
    if report.problems:
        raise CheckFailed(report.problems)
    if echo:
        for line in report.summary:
            echo(line)
    return report
