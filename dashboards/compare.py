"""``build_report``: the runs of one MLflow experiment as a static, self-contained HTML page.

Everything the page shows comes from MLflow (params, tags, latest metrics, metric histories),
so the report of a finished study can be rebuilt at any time from the tracking store alone.
Plots are PNGs embedded as base64 data URIs: the file opens offline, from any directory, and
can be attached to a mail or an issue as it is. ``runs.csv`` and ``curves.csv`` beside it hold
the same numbers for further analysis.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import pandas as pd

from dashboards import plots, records
from dashboards.ui import launch_ui
from fedsim.tracking import resolve_uri

__all__ = ["build_report", "launch_ui"]

CSS = """
body { font-family: 'DejaVu Sans', Verdana, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #eef2f7; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #ddd; margin: 6px 0; }
.meta { color: #555; font-size: 12px; } .scroll { overflow-x: auto; }
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(df: pd.DataFrame) -> str:
    """HTML for a table: numbers (params arrive as strings) to 4 significant digits, run ids shortened."""
    shown = df.copy()
    for c in shown.columns:
        if not pd.api.types.is_numeric_dtype(shown[c]):
            numeric = pd.to_numeric(shown[c], errors="coerce")
            if numeric.notna().sum() == shown[c].notna().sum() and shown[c].notna().any():
                shown[c] = numeric
    if "run_id" in shown:
        shown["run_id"] = shown["run_id"].str[:8]
    body = shown.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0, escape=True)
    return f"<div class='scroll'>{body}</div>"


def _sweep_section(name: str, children: pd.DataFrame, parents: pd.DataFrame) -> list[str]:
    metric, mode = records.sweep_objective(parents, name)
    col = f"metrics.{metric}"
    params = records.key_params(children)
    trials = pd.DataFrame(
        {"trial_id": records.column(children, "tags.trial_id"), "run": records.column(children, "tags.mlflow.runName")}
    )
    for p in params:
        trials[p] = children[f"params.{p}"]
    trials[metric] = pd.to_numeric(records.column(children, col), errors="coerce")
    trials["outcome"] = records.column(children, "tags.sweep.outcome")
    trials = trials.sort_values(metric, ascending=mode == "min", na_position="last")
    out = [f"<h2>Sweep {html.escape(name)}: {len(trials)} trials, objective {html.escape(metric)} ({mode})</h2>"]
    if not params:
        out.append("<p class='meta'>The trials' params do not differ; nothing to plot.</p>")
    elif trials[metric].notna().any():
        out.append(_img(plots.parallel_coordinates(trials, params, metric, mode), f"sweep {name} parameters"))
        out.append(_img(plots.importance(trials, params, metric), f"sweep {name} parameter importance"))
    out.append(_table(trials))
    return out


def build_report(experiment: str, out_dir: Path, tracking_uri: str | None = None, filter_string: str = "") -> Path:
    """Write ``report.html``, ``runs.csv`` and ``curves.csv`` under ``out_dir``; returns the HTML path."""

    uri = resolve_uri(tracking_uri)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, parents = records.split_parents(records.search(experiment, uri, filter_string))
    if runs.empty:
        raise ValueError(f"compare: experiment {experiment!r} holds only sweep parent runs")
    domains = records.domains(runs)
    table = records.run_table(runs)
    curves = records.curves(runs, uri, [f"map50/{d}" for d in domains] + ["map50/total", "bytes_up"])
    total = curves[curves["key"] == "map50/total"]
    table.insert(6, "last_round", table["run_id"].map(total.groupby("run_id")["round"].max()))
    table["bytes_up_total"] = table["run_id"].map(curves[curves["key"] == "bytes_up"].groupby("run_id")["value"].sum())
    table.to_csv(out_dir / "runs.csv", index=False)
    curves.to_csv(out_dir / "curves.csv", index=False)

    meta = (
        f"tracking store {html.escape(uri)} &middot; {len(table)} runs"
        + (f" &middot; filter <code>{html.escape(filter_string)}</code>" if filter_string else "")
        + f" &middot; generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    body = [
        f"<h1>fedsim: experiment {html.escape(experiment)}</h1>",
        f"<p class='meta'>{meta}</p>",
        "<h2>mAP@50 per round, all strategies</h2>",
        "<p class='meta'>The mean over each strategy's runs (its seeds) per round, shaded from the lowest "
        "to the highest of them (min-max); n: its runs. Every run of each strategy: further down.</p>",
        _img(plots.curves_overlay(curves), "mAP@50 per round, all strategies"),
        "<h2>Runs</h2>",
        "<p class='meta'>Final values (last logged round). peak memory: the largest client in that round; "
        "bytes_up: that round's uploads; bytes_up_total: all rounds.</p>",
        _table(table),
        "<h2>mAP@50 per round, per strategy</h2>",
        _img(plots.curves_by_strategy(curves), "mAP@50 per round"),
        "<h2>Final mAP@50 per domain</h2>",
        _img(plots.domain_bars(table, domains), "final mAP@50 per domain"),
        "<h2>Accuracy vs client memory</h2>",
        _img(plots.accuracy_vs_memory(table), "mAP@50 vs client peak memory"),
    ]
    sweep_tag = runs.get("tags.sweep")
    if sweep_tag is not None:
        for name in sorted(sweep_tag.dropna().unique()):
            body += _sweep_section(name, runs[sweep_tag == name].reset_index(drop=True), parents)
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>fedsim compare: {html.escape(experiment)}</title><style>{CSS}</style></head>"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
