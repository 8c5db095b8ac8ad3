"""The ``space:`` section of a sweep YAML -> a dict of ``optuna.distributions`` for ``OptunaSearch``.

Keys are dotted config paths (``train.lr``, ``strategy.params.alpha``), so a trial's parameters
apply to the experiment config exactly like ``--set`` overrides::

    space:
      train.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      train.batch: {type: int, low: 4, high: 16, step: 4}
      train.client_lr: {type: categorical, choices: [null, 0.001]}
      strategy.params.num_experts: {type: int, low: 2, high: 6, when: {strategy.name: fedmox}}

``when`` keeps an entry only if the base config matches (a value or a list of allowed values),
so one space file can name method parameters that exist for only some strategies. A dict of
distributions (rather than a define-by-run function) is what Optuna needs to warm-start and
what Tune can restore from its searcher state.
"""

from __future__ import annotations

import math
from typing import Any

import optuna.distributions as od

Distribution = od.BaseDistribution

_KEYS = {
    "int": {"type", "low", "high", "step", "log", "when"},
    "float": {"type", "low", "high", "step", "log", "when"},
    "categorical": {"type", "choices", "when"},
}
_MISSING = object()


class SpaceError(ValueError):
    """A search-space entry that cannot become an Optuna distribution; the message names it."""


def lookup(raw: dict, dotted: str, default: Any = _MISSING) -> Any:
    """``raw["a"]["b"]`` for ``"a.b"``; ``default`` (or KeyError) when a part is missing."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise KeyError(dotted)
            return default
        node = node[part]
    return node


def _number(name: str, field: str, value: Any, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a finite number"
        raise SpaceError(f"space.{name}: {field} must be {kind}, got {value!r}")
    return value


def _distribution(name: str, spec: dict) -> Distribution:
    kind = spec.get("type")
    if kind not in _KEYS:
        raise SpaceError(f"space.{name}: type must be one of {sorted(_KEYS)}, got {kind!r}")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise SpaceError(f"space.{name}: unknown key(s) {unknown} for type {kind}; allowed: {sorted(_KEYS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"space.{name}: categorical needs a non-empty list 'choices', got {choices!r}")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise SpaceError(f"space.{name}: choices must be null, bool, int, float or str, got {bad!r}")
        return od.CategoricalDistribution(choices)
    integer = kind == "int"
    for field in ("low", "high"):
        if field not in spec:
            raise SpaceError(f"space.{name}: {kind} needs '{field}'")
    low = _number(name, "low", spec["low"], integer)
    high = _number(name, "high", spec["high"], integer)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"space.{name}: log must be true or false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(name, "step", step, integer)
        if step <= 0:
            raise SpaceError(f"space.{name}: step must be positive, got {step!r}")
    if low > high:
        raise SpaceError(f"space.{name}: low must be <= high, got low={low!r} high={high!r}")
    if log and low <= 0:
        raise SpaceError(f"space.{name}: log scale needs low > 0, got low={low!r}")
    if log and step not in (None, 1):
        raise SpaceError(f"space.{name}: log scale cannot be combined with step={step!r}")
    if integer:
        return od.IntDistribution(low, high, log=log, step=step or 1)
    return od.FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def _applies(name: str, when: Any, base: dict | None) -> bool:
    if when is None:
        return True
    if not isinstance(when, dict) or not when:
        raise SpaceError(f"space.{name}: when must map config paths to a value or a list of values, got {when!r}")
    if base is None:
        return True
    for path, wanted in when.items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if lookup(base, str(path), None) not in allowed:
            return False
    return True


def parse_space(raw: Any, base: dict | None = None) -> dict[str, Distribution]:
    """Distributions by dotted config path; ``base`` (the raw base config) decides ``when`` entries."""
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"space must map dotted config paths to distributions, got {raw!r}")
    out: dict[str, Distribution] = {}
    for name, spec in raw.items():
        name = str(name)
        if not name or any(not part for part in name.split(".")):
            raise SpaceError(f"space.{name}: key must be a dotted config path such as train.lr")
        if not isinstance(spec, dict):
            raise SpaceError(f"space.{name}: expected a mapping with 'type', got {spec!r}")
        dist = _distribution(name, spec)
        if _applies(name, spec.get("when"), base):
            out[name] = dist
    if not out:
        raise SpaceError("space: no entry applies to the base config (check the 'when' conditions)")
    return out


def probe_points(space: dict[str, Distribution]) -> list[dict[str, Any]]:
    """The corners of the space (all lows, all highs), to validate configs before any trial starts."""
    lows: dict[str, Any] = {}
    highs: dict[str, Any] = {}
    for name, dist in space.items():
        if isinstance(dist, od.CategoricalDistribution):
            lows[name], highs[name] = dist.choices[0], dist.choices[-1]
        else:
            lows[name], highs[name] = dist.low, dist.high
    return [lows, highs]


def describe(dist: Distribution) -> str:
    """A short human/MLflow-param form: ``float[0.0001, 0.003] log``."""
    if isinstance(dist, od.CategoricalDistribution):
        return f"categorical{list(dist.choices)}"
    kind = "int" if isinstance(dist, od.IntDistribution) else "float"
    text = f"{kind}[{dist.low}, {dist.high}]"
    if dist.log:
        text += " log"
    if dist.step not in (None, 1):
        text += f" step {dist.step}"
    return text
