"""Saved predictions -> predictions.csv, summary.json and a chart of the metrics per category
(and, when logger=wandb, the same to Weights & Biases). Needs no model: score_only uses it too.
A benchmark run (benchmark=NAME) adds its scorer's numbers: a `benchmark` block in summary.json,
`extracted` and `score` columns in predictions.csv, and its panels in the chart.
"""

from __future__ import annotations

import csv
import logging
import platform
import subprocess
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from minigpt4.config import ROOT
from minigpt4.evaluation import store
from minigpt4.evaluation.benchmarks.scorers import Panel
from minigpt4.evaluation.metrics import ALL_METRICS, DEFAULT_METRICS, aggregate, score_row
from minigpt4.evaluation.prompts import row_from_record

log = logging.getLogger(__name__)

NO_CATEGORY = "(none)"
PACKAGES = ("torch", "transformers", "pytorch-lightning", "sentencepiece", "sacrebleu", "hydra-core", "minigpt4")


def write_report(run_dir: Path, config: dict, plan, records: list[dict], throughput: dict | None,
                 score_only: bool = False, pending: int | None = 0) -> dict:
    """Score every record with its file's metrics, write the three result files, return the summary.
    config: the run's settings as a plain dict (recorded in summary.json; its logger.wandb block
    sends the results to Weights & Biases too).
    pending: rows of the prompt set not answered yet (a re-scored partial run; None: unknown)."""
    scored = []  # (record, row, scores)
    for record in records:
        row = row_from_record(record)
        metrics = plan.metrics.get(record["csv"], DEFAULT_METRICS)
        answer = record["answer"] if record.get("error") is None else None
        scored.append((record, row, score_row(answer, row.references, metrics)))
    benchmark = _benchmark(plan, records)

    _write_csv(run_dir / "predictions.csv", scored, benchmark[1] if benchmark else None)
    summary = {
        "model": (throughput or {}).get("model"),
        **({"benchmark": benchmark[0]} if benchmark else {}),
        **_group([s for s in scored]),
        "per_csv": {f.label: _group([s for s in scored if s[0]["csv"] == f.label]) for f in plan.files
                    if any(s[0]["csv"] == f.label for s in scored)},
        "per_category": {cat: _group(group) for cat, group in _by_category(scored).items()},
        "metrics_chosen": {label: list(m) for label, m in plan.metrics.items()},
        "failures": [{"key": r["key"], "error": r["error"]} for r, _, _ in scored if r.get("error") is not None],
        "pending_rows": pending,
        "throughput": throughput,
        "score_only": score_only,
        "seed": config.get("seed"),
        "git": _git(),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
    }
    store.write_json(run_dir / "summary.json", summary)
    panels = _metric_panels(summary) + (plan.benchmark.scorer.panels(benchmark[0]) if benchmark else [])
    what = plan.benchmark.name if benchmark else "metrics per category"
    _chart(run_dir / "metrics_by_category.png", panels, f"{summary.get('model') or ''} - {what}".strip(" -"))
    wandb = (config.get("logger") or {}).get("wandb")
    if wandb and wandb.get("enabled"):
        _log_wandb(run_dir, wandb, summary, run_dir / "predictions.csv")
    if benchmark:
        log.info("results in %s: %s: %s", run_dir, plan.benchmark.name, _headline(benchmark[0]))
    if summary["metrics"] or not benchmark:
        log.info("results in %s: %s", run_dir, {m: round(v, 4) for m, v in summary["metrics"].items()})
    _log_failures(summary)
    return summary


def _log_failures(summary: dict, first: int = 5) -> None:
    """How many rows failed and the first errors, one line each: a run that mostly failed must
    not look like a quiet success."""
    failures = summary["failures"]
    if not failures:
        return
    log.warning("%d of %d rows failed (every error: the error column of predictions.csv, or summary.json)%s",
                len(failures), summary["counts"]["rows"], f"; the first {first}:" if len(failures) > first else ":")
    for failure in failures[:first]:
        log.warning("  %s: %s", failure["key"], failure["error"][:200])


def _benchmark(plan, records: list[dict]) -> tuple[dict, list[dict]] | None:
    """(summary block, per-record {extracted, score}) from the benchmark's own scorer."""
    if plan.benchmark is None:
        return None
    scorer = plan.benchmark.scorer
    rows = [scorer.score(r["input"], r.get("answer") if r.get("error") is None else None) for r in records]
    block = {"name": plan.benchmark.name, "scorer": scorer.name, **scorer.summary(rows)}
    return block, [{"extracted": r.extracted, "score": None if r.score is None else round(r.score, 4)} for r in rows]


def _headline(block: dict) -> str:
    """The numbers papers report, one line."""
    keys = [k for k, v in block.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k} {block[k]}" for k in keys)


def _group(scored: list[tuple]) -> dict:
    metrics, n_scored = aggregate([(r["answer"] if r.get("error") is None else None, row.references, s)
                                   for r, row, s in scored])
    return {
        "metrics": metrics,
        "n_scored": n_scored,
        "counts": {
            "rows": len(scored),
            "answered": sum(r.get("error") is None for r, _, _ in scored),
            "failed": sum(r.get("error") is not None for r, _, _ in scored),
            "with_reference": sum(bool(row.references) for _, row, _ in scored),
        },
    }


def _by_category(scored: list[tuple]) -> dict[str, list[tuple]]:
    groups: dict[str, list[tuple]] = defaultdict(list)
    for item in scored:
        groups[item[1].category or NO_CATEGORY].append(item)
    return dict(sorted(groups.items()))


def _write_csv(path: Path, scored: list[tuple], benchmark: list[dict] | None = None) -> None:
    """csv, id, the input columns (union, first-seen order), answer, finish_reason, n_tokens,
    one column per metric used, the benchmark's extracted and score, error."""
    inputs: list[str] = []
    for record, _, _ in scored:
        inputs += [c for c in record["input"] if c not in inputs and c != "id"]
    metric_cols = [m for m in ALL_METRICS if any(m in s for _, _, s in scored)]
    bench_cols = ["extracted", "score"] if benchmark is not None else []
    columns = ["csv", "id", *inputs, "answer", "finish_reason", "n_tokens", *metric_cols, *bench_cols, "error"]

    def write(f) -> None:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, (record, _, scores) in enumerate(scored):
            values = {**record["input"], "csv": record["csv"], "id": record["id"], "answer": record.get("answer"),
                      "finish_reason": record.get("finish_reason"), "n_tokens": record.get("n_tokens"),
                      "error": record.get("error"), **{m: round(v, 4) for m, v in scores.items()},
                      **(benchmark[i] if benchmark is not None else {})}
            writer.writerow(["" if values.get(c) is None else values.get(c) for c in columns])

    store.write_atomically(path, write)


def _metric_panels(summary: dict) -> list[Panel]:
    """One panel per metric: a bar per category, plus 'all'."""
    panels = []
    for metric in summary["metrics"]:
        cats = [c for c, g in summary["per_category"].items() if metric in g["metrics"]]
        values = [summary["per_category"][c]["metrics"][metric] for c in cats] + [summary["metrics"][metric]]
        panels.append(Panel(metric, cats + ["all"], values, 100 if metric == "bleu" else 1))
    return panels


def _chart(path: Path, panels: list[Panel], title: str) -> None:
    """The panels side by side, each a bar per label (the last, 'all' or 'mean', in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        return
    widths = [max(3.2, 0.35 * len(p.labels) + 1.2) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 1, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, panel in zip(axes[0], panels):
        total = panel.labels[-1] in ("all", "mean")
        colours = ["tab:blue"] * (len(panel.values) - total) + ["tab:gray"] * total
        bars = ax.bar(range(len(panel.values)), panel.values, color=colours)
        ax.bar_label(bars, fmt="%.2f" if panel.top == 1 else "%.0f" if panel.top > 100 else "%.1f", fontsize=6)
        ax.set_xticks(range(len(panel.values)), panel.labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, panel.top * 1.12)  # room for the value labels
        ax.set_yticks([panel.top * k / 5 for k in range(6)])
        ax.set_title(panel.title, fontsize=9 if len(panel.title) < 40 else 7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        store.write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    finally:
        plt.close(fig)


def _log_wandb(run_dir: Path, w: dict, summary: dict, predictions_csv: Path) -> None:
    """Summary metrics and the predictions table; offline unless logger.wandb.mode says otherwise."""
    import wandb

    run = wandb.init(project=w.get("project") or "minigpt4", entity=w.get("entity"), name=w.get("name"),
                     mode=w.get("mode") or "offline", dir=str(run_dir), config=summary["config"], reinit="finish_previous")
    flat = {f"metrics/{m}": v for m, v in summary["metrics"].items()}
    for group in ("per_csv", "per_category"):
        for name, g in summary[group].items():
            flat.update({f"{group}/{name}/{m}": v for m, v in g["metrics"].items()})
    flat.update({f"counts/{k}": v for k, v in summary["counts"].items()})
    flat.update(_flatten(summary.get("benchmark", {}), "benchmark"))
    run.summary.update(flat)
    with open(predictions_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    numeric = [c in ("n_tokens", "score", *ALL_METRICS) for c in rows[0]]  # numbers, so the table sorts and plots
    data = [[(float(v) if v else None) if is_number else v for v, is_number in zip(row, numeric)] for row in rows[1:]]
    run.log({"predictions": wandb.Table(columns=rows[0], data=data)})
    run.finish()


def _flatten(block: dict, prefix: str) -> dict:
    """{"per_split": {"random": {"f1": 80}}} -> {"prefix/per_split/random/f1": 80}: the numbers only."""
    flat = {}
    for key, value in block.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = value
    return flat


def _git() -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
