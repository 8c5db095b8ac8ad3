"""Strategy names -> classes: the one place a name is resolved (imports are lazy)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig
    from strategies.base import Strategy

# name -> "module:Class"; add a method by adding one line here and one file beside this one.
STRATEGIES: dict[str, str] = {
    "fedavg": "strategies.fedavg:FedAvg",
    "fedmox": "strategies.fedmox:FedMox",
    "fedprox": "strategies.fedprox:FedProx",
    "fedsto": "strategies.fedsto:FedSTO",
    "scl_frozen": "strategies.centralized:SCLFrozen",
    "scl_full": "strategies.centralized:SCLFull",
    "server_only": "strategies.centralized:ServerOnly",
    "oracle": "strategies.centralized:Oracle",
}


class UnknownStrategyError(ValueError):
    pass


def get(name: str) -> type[Strategy]:
    """The strategy class registered under ``name``."""
    if name not in STRATEGIES:
        raise UnknownStrategyError(f"unknown strategy {name!r}; valid: {', '.join(sorted(STRATEGIES))}")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve_params(name: str, params: dict) -> list[str]:
    """Problems with a strategy name and its params, as config-error lines (empty if fine)."""
    try:
        cls = get(name)
    except UnknownStrategyError as exc:
        return [f"strategy.name: {exc}"]
    try:
        cls.Params.model_validate(params)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                out.append(f"strategy.params.{where}: unknown parameter for {name}")
            else:
                out.append(f"strategy.params.{where} {err['msg']}, got {err.get('input')!r}")
        return out
    return []


def owners_of(param: str) -> list[str]:
    """The registered strategies that take a parameter of this name."""
    return [name for name in sorted(STRATEGIES) if param in get(name).Params.model_fields]


def build(cfg: ExperimentConfig) -> Strategy:
    """Instantiate the strategy named in an ExperimentConfig."""
    cls = get(cfg.strategy.name)
    return cls(cls.Params.model_validate(cfg.strategy.params), cfg)
