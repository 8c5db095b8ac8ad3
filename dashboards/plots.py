"""The report's figures as PNG bytes: matplotlib's Agg backend and its bundled DejaVu Sans only.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so nothing depends on a
display, global figure state, or fonts installed on the machine.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import cm, colors, ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}
MAX_BARS = 12  # runs in the per-domain bar chart (best first)
MAX_LEGEND = 10


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _label(value: object, fallback: str = "-") -> str:
    return fallback if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def band_by_round(curves: pd.DataFrame, key: str = "map50/total") -> pd.DataFrame:
    """Per strategy and round, over its runs (seeds): ``mean``, ``low``/``high`` (min/max) and ``n`` runs.

    Columns ``strategy, round, mean, low, high, n``, sorted by strategy then round; a strategy-less
    run counts as strategy ``-``. A round only some runs reached averages those runs (``n`` says how many).
    """
    data = curves[curves["key"] == key]
    columns = ["strategy", "round", "mean", "low", "high", "n"]
    if data.empty:
        return pd.DataFrame(columns=columns)
    data = data.assign(strategy=data["strategy"].map(_label))
    grouped = data.groupby(["strategy", "round"])["value"]
    out = grouped.agg(mean="mean", low="min", high="max", n="count").reset_index()
    return out[columns].sort_values(["strategy", "round"], ignore_index=True)


def curves_overlay(curves: pd.DataFrame, key: str = "map50/total") -> bytes:
    """Every strategy on one axis: the mean of its runs per round, shaded from the lowest to the highest run."""
    band = band_by_round(curves, key)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(7.5, 4.4))
        ax = fig.subplots()
        for strategy, rows in band.groupby("strategy", sort=True):
            runs = int(rows["n"].max())
            (line,) = ax.plot(rows["round"], rows["mean"], marker="o", ms=3, lw=1.5, label=f"{strategy} (n={runs})")
            if runs > 1:
                ax.fill_between(rows["round"], rows["low"], rows["high"], color=line.get_color(), alpha=0.2, lw=0)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(key)
        ax.set_title(f"{key} per round: mean over seeds, band = min-max over seeds")
        if not band.empty:
            ax.legend(fontsize=7, loc="best", title="strategy (runs)", title_fontsize=7)
        return _png(fig)


def curves_by_strategy(curves: pd.DataFrame, key: str = "map50/total") -> bytes:
    """One panel per strategy, one line per run: ``key`` against the round (0 = warm-up)."""
    data = curves[curves["key"] == key]
    strategies = sorted({_label(s) for s in data["strategy"]}) or ["-"]
    cols = min(3, len(strategies))
    rows = math.ceil(len(strategies) / cols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(4.6 * cols, 3.4 * rows))
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for ax, strategy in zip(axes, strategies, strict=False):
            runs = data[data["strategy"].map(_label) == strategy]
            for run_id, line in runs.groupby("run_id", sort=False):
                ax.plot(
                    line["round"], line["value"], marker="o", ms=3, lw=1.2, label=_label(line["run"].iloc[0], run_id)
                )
            ax.set_title(f"{strategy} ({runs['run_id'].nunique()} runs)")
            ax.set_xlabel("round")
            ax.set_ylabel(key)
            if 0 < runs["run_id"].nunique() <= MAX_LEGEND:
                ax.legend(fontsize=7)
        for ax in axes[len(strategies) :]:
            ax.set_visible(False)
        return _png(fig)


def domain_bars(table: pd.DataFrame, domains: list[str]) -> bytes:
    """Final mAP@50 per domain (and total) for the best ``MAX_BARS`` runs."""
    keys = [f"map50/{d}" for d in domains] + ["map50/total"]
    top = table.sort_values("map50/total", ascending=False, na_position="last").head(MAX_BARS)
    width = 0.8 / max(1, len(top))
    x = np.arange(len(keys))
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(6.0, 1.4 * len(keys) + 0.25 * len(top)), 3.8))
        ax = fig.subplots()
        for i, (_, row) in enumerate(top.iterrows()):
            values = [row[k] if pd.notna(row[k]) else 0.0 for k in keys]
            ax.bar(x + (i - (len(top) - 1) / 2) * width, values, width, label=_label(row["run"], row["run_id"]))
        ax.set_xticks(x, [k.removeprefix("map50/") for k in keys])
        ax.set_ylabel("final mAP@50")
        title = "final mAP@50 per test domain"
        ax.set_title(title + (f" (best {MAX_BARS} of {len(table)} runs)" if len(table) > MAX_BARS else ""))
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _png(fig)


def accuracy_vs_memory(table: pd.DataFrame) -> bytes:
    """Final mAP@50 (total) against the clients' peak memory, one colour per strategy."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(6.0, 4.2))
        ax = fig.subplots()
        for strategy, group in table.groupby(table["strategy"].map(_label)):
            ax.scatter(group["client/peak_mem_mib"], group["map50/total"], s=28, label=strategy)
            if len(table) <= 15:
                for _, row in group.iterrows():
                    ax.annotate(_label(row["run"]), (row["client/peak_mem_mib"], row["map50/total"]), fontsize=6)
        ax.set_xlabel("client peak memory (MiB)")
        ax.set_ylabel("final mAP@50 (total)")
        ax.set_title("accuracy vs device memory")
        ax.legend(fontsize=7)
        return _png(fig)


def _axis_values(values: pd.Series) -> tuple[np.ndarray, str, str]:
    """A parameter mapped to [0, 1] (log if positive and spread over 20x), with its end labels."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        v = numeric.to_numpy(dtype=float)
        lo, hi = float(v.min()), float(v.max())
        if lo > 0 and hi / lo > 20:
            v, lo_t, hi_t = np.log10(v), np.log10(lo), np.log10(hi)
        else:
            lo_t, hi_t = lo, hi
        scaled = (v - lo_t) / (hi_t - lo_t) if hi_t > lo_t else np.full_like(v, 0.5)
        return scaled, f"{lo:.3g}", f"{hi:.3g}"
    cats = sorted(values.astype(str).unique())
    codes = values.astype(str).map({c: i for i, c in enumerate(cats)}).to_numpy(dtype=float)
    scaled = codes / (len(cats) - 1) if len(cats) > 1 else np.full_like(codes, 0.5)
    return scaled, cats[0], cats[-1]


def parallel_coordinates(trials: pd.DataFrame, params: list[str], metric: str, mode: str) -> bytes:
    """One line per trial through its parameters and the objective, coloured by the objective."""
    data = trials.dropna(subset=[metric])
    axes_names = params + [metric]
    scaled = [_axis_values(data[p]) for p in axes_names]
    y = np.vstack([s[0] for s in scaled]).T if len(data) else np.zeros((0, len(axes_names)))
    score = data[metric].to_numpy(dtype=float)
    norm = colors.Normalize(vmin=np.nanmin(score) if len(score) else 0, vmax=np.nanmax(score) if len(score) else 1)
    cmap = matplotlib.colormaps["viridis" if mode == "max" else "viridis_r"]
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        fig = Figure(figsize=(max(6.0, 1.9 * len(axes_names)), 4.0))
        ax = fig.subplots()
        x = np.arange(len(axes_names))
        for row, s in zip(y, score, strict=True):
            ax.plot(x, row, color=cmap(norm(s)), lw=1.4, alpha=0.85)
        for i, (_, lo, hi) in enumerate(scaled):
            ax.axvline(i, color="0.6", lw=0.8)
            ax.annotate(lo, (i, -0.04), ha="center", va="top", fontsize=7)
            ax.annotate(hi, (i, 1.04), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, axes_names, rotation=15)
        ax.set_yticks([])
        ax.set_ylim(-0.12, 1.12)
        ax.set_title(f"{len(data)} trials: parameters vs {metric} ({mode})")
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
        return _png(fig)


def importance(trials: pd.DataFrame, params: list[str], metric: str) -> bytes:
    """|Spearman rank correlation| of each parameter with the objective (a quick importance proxy)."""
    data = trials.dropna(subset=[metric])
    scores = []
    for p in params:
        ranked = pd.to_numeric(data[p], errors="coerce")
        if ranked.isna().any():
            ranked = data[p].astype(str).astype("category").cat.codes.astype(float)
        # Spearman = Pearson on ranks (pandas' method="spearman" on a Series needs scipy).
        r = ranked.rank().corr(data[metric].astype(float).rank()) if len(data) > 2 else float("nan")
        scores.append(0.0 if pd.isna(r) else abs(float(r)))
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(6.0, 0.5 * len(params) + 1.4))
        ax = fig.subplots()
        ax.barh(params, scores, color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"|Spearman correlation| with {metric}")
        ax.set_title("parameter importance (rank correlation)")
        return _png(fig)
