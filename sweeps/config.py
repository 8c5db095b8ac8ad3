"""A sweep YAML: which base experiment, what to search, how to schedule, where results go.

Everything is checked before Ray starts: the sweep's own fields, the space, and the experiment
configs at the corners of the space (a misspelt ``train.lrr`` fails here, not in 40 trials).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedsim.config import ConfigError, apply_overrides, read_yaml_mapping
from fedsim.preflight import parse
from fedsim.storage import resolve
from sweeps.space import Distribution, SpaceError, describe, parse_space, probe_points

Mode = Literal["max", "min"]


class SweepConfigError(ValueError):
    """A sweep file that cannot run; the message names every bad field."""


class SchedulerConfig(BaseModel):
    """ASHA over FL rounds (``training_iteration`` == round); ``max_t`` defaults to the base's rounds."""

    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(1, gt=0)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, gt=0)


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    base: Path
    overrides: list[str] = Field(default_factory=list)
    num_samples: int = Field(gt=0)
    max_concurrent_trials: int = Field(1, gt=0)
    seed: int = 0
    metric: str = "map50/total"
    mode: Mode = "max"
    objectives: list[tuple[str, Mode]] | None = None  # multi-objective: no ASHA, Pareto front
    scheduler: SchedulerConfig | None = Field(default_factory=SchedulerConfig)  # null: no early stopping
    n_startup_trials: int | None = Field(None, gt=0)  # TPE's random trials before it models (Optuna: 10)
    storage: Path | None = None  # the Tune experiment directory; default runs/sweeps/<name>
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)  # tried first, in order
    space: dict[str, Any]

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if "/" in v or v.startswith("."):
            raise ValueError(f"must be a plain directory name, got {v!r}")
        return v

    @field_validator("objectives")
    @classmethod
    def _two_or_more(cls, v: list | None) -> list | None:
        if v is not None and len(v) < 2:
            raise ValueError("needs at least two [metric, mode] pairs (use metric/mode for one)")
        return v


@dataclass
class Sweep:
    """A loaded, validated sweep: the file's fields plus everything resolved from them."""

    spec: SweepFile
    path: Path
    base_path: Path
    base_raw: dict  # base YAML with the sweep's overrides applied
    space: dict[str, Distribution]
    storage: Path  # absolute Tune experiment dir
    rounds: int
    experiment: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metrics(self) -> list[str]:
        return [m for m, _ in self.spec.objectives] if self.spec.objectives else [self.spec.metric]

    @property
    def modes(self) -> list[str]:
        return [m for _, m in self.spec.objectives] if self.spec.objectives else [self.spec.mode]

    @property
    def multi_objective(self) -> bool:
        return self.spec.objectives is not None

    @property
    def max_t(self) -> int:
        s = self.spec.scheduler
        return s.max_t if s and s.max_t else self.rounds

    def trial_raw(self, params: dict[str, Any]) -> dict:
        """The raw experiment config of a trial: base + overrides + the trial's parameters."""
        return with_params(self.base_raw, params)

    def mlflow_params(self) -> dict[str, str]:
        s = self.spec
        out = {
            "sweep.name": s.name,
            "sweep.base": str(self.base_path),
            "sweep.overrides": json.dumps(s.overrides),
            "sweep.num_samples": str(s.num_samples),
            "sweep.max_concurrent_trials": str(s.max_concurrent_trials),
            "sweep.seed": str(s.seed),
            "sweep.objectives": json.dumps([list(p) for p in zip(self.metrics, self.modes, strict=True)]),
            "sweep.scheduler": "none" if self.multi_objective or s.scheduler is None else "asha",
        }
        if not self.multi_objective and s.scheduler is not None:
            out["sweep.grace_period"] = str(s.scheduler.grace_period)
            out["sweep.reduction_factor"] = str(s.scheduler.reduction_factor)
            out["sweep.max_t"] = str(self.max_t)
        if s.points_to_evaluate:
            out["sweep.points_to_evaluate"] = json.dumps(s.points_to_evaluate)
        out.update({f"space.{k}": describe(d) for k, d in self.space.items()})
        return out


def with_params(raw: dict, params: dict[str, Any]) -> dict:
    """A deep copy of ``raw`` with each dotted path set to its (already typed) value.

    Values are set as they are rather than through ``apply_overrides``' YAML parsing, which
    would turn a sampled ``1e-05`` into a string.
    """
    out = copy.deepcopy(raw)
    for dotted, value in params.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SweepConfigError(f"sweep: {dotted}: {part} is not a config section")
            node = child
        node[parts[-1]] = value
    return out


def _find_base(base: Path, sweep_dir: Path) -> Path:
    candidates = [base] if base.is_absolute() else [sweep_dir / base, Path.cwd() / base]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise SweepConfigError(f"sweep: base config not found: {base} (tried {tried})")


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"sweep: {where}: unknown key"
    return f"sweep: {where} {msg}"


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file (and its base config, at the corners of its space)."""

    path = Path(path).resolve()
    raw = read_yaml_mapping(path, "sweep: ", SweepConfigError, kind="file")
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as exc:
        raise SweepConfigError("\n".join(_describe(e) for e in exc.errors())) from exc
    base_path = _find_base(spec.base, path.parent)
    base_raw = yaml.safe_load(base_path.read_text()) or {}
    try:
        base_raw = apply_overrides(base_raw, list(spec.overrides))
        space = parse_space(spec.space, base_raw)
        base_cfg = parse(copy.deepcopy(base_raw))
        for i, point in enumerate(spec.points_to_evaluate):
            if set(point) != set(space):
                raise SpaceError(f"points_to_evaluate[{i}] must set exactly the space's keys {sorted(space)}")
        for point in probe_points(space) + spec.points_to_evaluate:
            parse(with_params(base_raw, point))
    except SpaceError as exc:
        raise SweepConfigError(f"sweep: {exc}") from exc
    except ConfigError as exc:
        raise SweepConfigError(f"sweep {path.name} (base {base_path.name} + overrides + space):\n{exc}") from exc
    if base_cfg.rounds < 1:
        raise SweepConfigError(f"sweep: the base config runs {base_cfg.rounds} rounds; a sweep needs at least 1")
    if base_cfg.train.eval_every != 1:
        raise SweepConfigError(
            f"sweep: train.eval_every is {base_cfg.train.eval_every}; a sweep's scheduler compares trials "
            "every round, so it needs 1"
        )
    if spec.scheduler and spec.scheduler.max_t and spec.scheduler.max_t > base_cfg.rounds:
        raise SweepConfigError(
            f"sweep: scheduler.max_t ({spec.scheduler.max_t}) exceeds the base config's rounds ({base_cfg.rounds})"
        )
    storage = resolve(spec.storage or Path("runs") / "sweeps" / spec.name)
    return Sweep(
        spec=spec,
        path=path,
        base_path=base_path,
        base_raw=base_raw,
        space=space,
        storage=storage,
        rounds=base_cfg.rounds,
        experiment=base_cfg.tracking.experiment,
    )
