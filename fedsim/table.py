"""``fedsim table``: run every (strategy, seed) MLflow does not have yet, then tabulate from MLflow.

A (strategy, seed) counts as recorded when a FINISHED run in the experiment carries the
``config_key`` of exactly that config, so changing anything else in the config reruns it; a
strategy that trains no clients (server_only, scl_*, oracle) also takes a run whose MLflow params
differ from its config only in settings the client side alone reads (``CLIENT_SIDE_SETTINGS``), so
a change of client recipe does not rerun the baselines. The
table itself is built from ``mlflow.search_runs``, never from the runs just made in memory. A pair
whose run directory exists but whose MLflow run never finished is resumed from its last
checkpoint, so an interrupted table loses no finished round.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import mlflow
import pandas as pd
import ray

from fedsim.config import CLIENT_SIDE_SETTINGS, ConfigError, ExperimentConfig, apply_overrides, settings_key
from fedsim.experiment import earlier_run_dir, init_ray, logged_elsewhere, prepare_data, prepare_weights, simulate
from fedsim.preflight import check_or_raise, parse
from fedsim.stats import format_diff, paired_difference
from fedsim.tracking import resolve_uri
from strategies import get as get_strategy

_TOP_LEVEL_COMMA = re.compile(r",(?![^\[]*\])")  # a comma outside [...]: a list value stays whole


def variant(cfg: ExperimentConfig, spec: str, seed: int) -> ExperimentConfig:
    """``spec`` is a strategy name, optionally with params: ``fedmox:alpha=0,num_experts=2``.

    A dotted key is a config override, as ``--set`` takes it, for this row only:
    ``fedavg:train.conf_thres=0.4`` (so one table can hold a threshold sweep). The base config's
    own strategy params are kept when ``spec`` names its strategy without strategy params."""
    name, _, params = spec.partition(":")
    items = [item.strip() for item in _TOP_LEVEL_COMMA.split(params) if item.strip()]
    for item in items:
        if "=" not in item:
            raise ConfigError(f"fedsim: config error: --strategies {spec!r}: expected key=value, got {item!r}")
    own = [item for item in items if "." not in item.partition("=")[0]]
    raw = cfg.model_dump(mode="json")
    if raw["strategy"]["name"] != name or own:
        raw["strategy"] = {"name": name, "params": {}}
    # Strategy params are overrides under strategy.params: values are read as --set reads them.
    raw = apply_overrides(raw, [f"strategy.params.{item}" if item in own else item for item in items])
    raw["seed"] = seed
    return parse(raw)


def variants_of(base: ExperimentConfig, strategies: str, seeds: int) -> dict[str, list[ExperimentConfig]]:
    """``--strategies`` (comma-separated, or ``;``-separated when specs carry params) x seeds 0..n-1."""
    specs = [s.strip() for s in (strategies.split(";") if ";" in strategies else _TOP_LEVEL_COMMA.split(strategies))]
    try:
        return {spec: [variant(base, spec, seed) for seed in range(seeds)] for spec in specs}
    except ConfigError:
        raise
    except ValueError as exc:  # a malformed spec
        raise ConfigError(f"fedsim: config error: --strategies: {exc}") from exc


def recorded_runs(uri: str, experiment: str) -> pd.DataFrame:

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'")
    return runs if len(runs) else pd.DataFrame(columns=["tags.config_key", "tags.strategy", "tags.seed"])


def _client_free_keys(runs: pd.DataFrame) -> pd.Series:
    """Each recorded run's ``settings_key`` of its MLflow params, client-side settings left out."""
    names = [c for c in runs.columns if c.startswith("params.")]
    keys = [
        settings_key({k.removeprefix("params."): v for k, v in row.items() if isinstance(v, str)}, CLIENT_SIDE_SETTINGS)
        for row in runs[names].to_dict("records")
    ]
    return pd.Series(keys, index=runs.index, dtype=object)


def result_run(runs: pd.DataFrame, cfg: ExperimentConfig, client_free: pd.Series | None = None) -> pd.DataFrame:
    """The recorded run (at most one row) whose results are ``cfg``'s.

    A run of exactly ``cfg`` (its ``config_key``) first; for a strategy that trains no clients, else
    a run whose params equal ``cfg``'s outside ``CLIENT_SIDE_SETTINGS``. A run logged before some
    setting existed lacks its param and so never matches a config that has it.
    """
    exact = runs[runs["tags.config_key"] == cfg.key()]
    if len(exact) or get_strategy(cfg.strategy.name).uses_clients:
        return exact.head(1)
    keys = _client_free_keys(runs) if client_free is None else client_free
    return runs[keys == settings_key(cfg.flat(), CLIENT_SIDE_SETTINGS)].head(1)


def missing(cfgs: list[ExperimentConfig], uri: str, experiment: str) -> list[ExperimentConfig]:
    runs = recorded_runs(uri, experiment)
    keys = _client_free_keys(runs)
    return [c for c in cfgs if not len(result_run(runs, c, keys))]


def run_all(cfgs: list[ExperimentConfig], parallel: int, echo=print) -> None:
    """Run simulations, ``parallel`` at a time, each on its own driver actor in one Ray cluster."""
    if not cfgs:
        return
    for cfg in cfgs:  # caches are shared: build them once, before any concurrency
        check_or_raise(cfg)
        prepare_data(cfg)
        prepare_weights(cfg)
    init_ray()

    pool = max(1, int(ray.cluster_resources().get("CPU", 1) // max(1, parallel)))
    pending = list(cfgs)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                cfg = pending.pop(0)
            tag = f"[{cfg.strategy.name} seed {cfg.seed}]"
            try:
                # A pair that was started but never finished (killed, out of time) continues from
                # its last round checkpoint, in the same MLflow run, instead of starting over.
                # A directory whose run another MLflow store holds is not this store's to continue.
                earlier = earlier_run_dir(cfg)
                resume = earlier is not None and logged_elsewhere(earlier, resolve_uri(cfg.tracking.uri)) is None
                simulate(
                    cfg, resume=resume, echo=lambda line, tag=tag: echo(f"{tag} {line}"), pool_size=pool, checked=True
                )
            except BaseException as exc:  # report every failure after the others finished
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(max(1, parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


PLATFORM_SEP = " || "  # a platform stamp holds commas and semicolons itself


def build_table(
    uri: str,
    experiment: str,
    variants: dict[str, list[ExperimentConfig]],
    domains: list[str],
    reference: str | None = None,
) -> pd.DataFrame:
    """One row per variant label (its configs differ only by seed), from the recorded runs.

    ``commit``: the short git commits of the row's runs. With ``reference`` (one of the labels),
    every other row gets a column ``Δ total vs REFERENCE (95% CI)``: its per-seed total mAP@50
    minus the reference's, paired by seed, as ``format_diff`` ("n/a" below 2 shared seeds).
    """
    if reference is not None and reference not in variants:
        raise ValueError(f"reference {reference!r} is not one of the table's rows: {', '.join(variants)}")
    runs = recorded_runs(uri, experiment)
    keys = _client_free_keys(runs)
    columns = [f"metrics.map50/{d}" for d in domains] + ["metrics.map50/total"]
    rows, totals = [], {}
    for label, cfgs in variants.items():
        group = pd.concat([result_run(runs, c, keys) for c in cfgs])
        row = {"strategy": label, "seeds": ",".join(sorted(group["tags.seed"], key=int))}
        for col, name in zip(columns, [*domains, "total"], strict=True):
            values = group[col].astype(float)
            row[name] = f"{values.mean():.3f} ± {values.std(ddof=0):.3f}" if len(values) else "n/a"
            row[f"{name}_mean"] = values.mean() if len(values) else float("nan")
        commits = group["tags.git_commit"].dropna() if "tags.git_commit" in group else []
        row["commit"] = ",".join(sorted({str(c)[:7] for c in commits}))
        weights = group["tags.weights"].dropna() if "tags.weights" in group else []
        row["weights"] = ",".join(sorted({str(w) for w in weights}))
        platforms = group["tags.platform"].dropna() if "tags.platform" in group else []
        row["platform"] = PLATFORM_SEP.join(sorted({str(p) for p in platforms}))
        scored = group[group["metrics.map50/total"].notna()]
        totals[label] = scored["metrics.map50/total"].astype(float).set_axis(scored["tags.seed"].astype(int)).to_dict()
        rows.append(row)
    if reference is not None:
        column, ref = f"Δ total vs {reference} (95% CI)", totals[reference]
        for row in rows:
            mine = totals[row["strategy"]]
            shared = sorted(set(mine) & set(ref))
            if row["strategy"] == reference:
                row[column] = "reference"
            elif len(shared) < 2:
                row[column] = "n/a"
            else:
                row[column] = format_diff(paired_difference([mine[s] for s in shared], [ref[s] for s in shared]))
    return pd.DataFrame(rows)


def write_table(table: pd.DataFrame, out: Path, domains: list[str], title: str, command: str | None = None) -> str:
    """``table.csv`` and ``table.md`` under ``out``; the markdown names the command that made it, and
    each row its runs' commits and starting weights (file name and content hash), and the table the
    platforms (CPU and numeric packages) its runs ran on."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv", index=False)
    deltas = [c for c in table.columns if c.startswith("Δ total vs ")]
    commit = [c for c in ("commit", "weights") if c in table.columns]
    shown = table[["strategy", *domains, "total", *deltas, "seeds", *commit]]
    header = "| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in shown.itertuples(index=False))
    note = "mAP@50, mean ± std over seeds (final round)"
    if deltas:
        note += "; Δ: paired difference in total mAP@50 over the seeds both rows ran, mean [95% Student-t CI]"
    made_by = f"Produced by `{command}`, from the MLflow records.\n\n" if command else ""
    stamps = table["platform"] if "platform" in table.columns else []
    platforms = sorted({p for cell in stamps if cell for p in str(cell).split(PLATFORM_SEP)})
    ran_on = "".join(f"Ran on: {p}\n\n" for p in platforms)
    markdown = f"### {title}\n\n{made_by}{ran_on}{note}\n\n{header}{body}"
    (out / "table.md").write_text(markdown)
    return markdown
