"""`python evaluate.py`: prompt CSVs prompt CSVs (or a benchmark's file) -> answers saved row by row -> scores
and a report.

    rows (validated, no model; benchmarks/ reads benchmark files) -> shard rank::world -> group by length -> batches
      -> conversation.build_prompt + encode_prompt -> generation.generate (left padding)
      -> clean_answer -> predictions.jsonl (append + fsync per row) -> merge on rank 0
      -> predictions.csv, summary.json, metrics_by_category.png (report.py)

The run directory holds config.yaml (EvaluateSettings.to_dict(), with absolute prompt paths), so `resume=<run dir>` continues with the same
model, prompts and decoding, and `score_only=<run dir>` re-scores without a model. Several
processes go through Lightning Fabric: `gpu=[0,1]`, or launch.* for anything else.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from minigpt4.config import ROOT
from minigpt4.devices import resolve_device
from minigpt4.errors import UserError
from minigpt4.evaluation import store
from minigpt4.evaluation.answering import answer_rows
from minigpt4.evaluation.benchmarks.benchmark import Benchmark
from minigpt4.evaluation.metrics import DEFAULT_METRICS, check_metrics
from minigpt4.evaluation.prompts import (
    PromptFile,
    PromptRow,
    load_prompt_set,
    parse_files,
)
from minigpt4.evaluation.report import write_report
from minigpt4.extras import require_logger
from minigpt4.settings import EvaluateSettings

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# On resume everything comes from the run's saved config except how it is run:
RESUME_KEEPS_CURRENT = ("gpu", "launch", "evaluate.batch_size", "evaluate.progress", "evaluate.retry_failed",
                        "evaluate.fail_on_error", "logger")
_KEPT_OPTIONS = tuple(k.split(".", 1)[1] for k in RESUME_KEEPS_CURRENT if k.startswith("evaluate."))
# Set by launchers (Lightning, torchrun, SLURM) in the processes they start for ranks other than 0:
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "GROUP_RANK", "SLURM_PROCID")


class RowsFailed(UserError):
    """Rows failed and evaluate.fail_on_error=true: exit 1, as a failed check does."""

    exit_code = 1


@dataclass
class Plan:
    """The validated prompt set (CSV files, or one benchmark's file) and the metrics chosen for
    each of its files."""

    files: list[PromptFile]
    rows: list[PromptRow]
    metrics: dict[str, tuple[str, ...]]  # file label -> metric names
    benchmark: Benchmark | None = None  # benchmark=NAME: its file replaces evaluate.prompts

    @classmethod
    def from_settings(cls, settings: EvaluateSettings, read_rows: bool = True) -> Plan:
        run_metrics = settings.evaluate.metrics
        chosen = check_metrics(run_metrics, "evaluate.metrics") if run_metrics is not None else None
        if settings.benchmark:  # scored by its own scorer; evaluate.metrics only when asked for
            benchmark = Benchmark.from_dict(settings.benchmark, files_needed=read_rows)
            plan = cls([PromptFile(benchmark.path, None, benchmark.label)], [], {benchmark.label: chosen or ()},
                       benchmark)
        else:
            files = [PromptFile(_locate(f.path), f.metrics, f.label) for f in parse_files(settings.evaluate.prompts)]
            metrics = {f.label: check_metrics(f.metrics, f"evaluate.prompts {f.path}") if f.metrics is not None
                       else chosen or DEFAULT_METRICS for f in files}
            plan = cls(files, [], metrics)
        if read_rows:
            plan.rows = plan.read_rows()
        return plan

    def read_rows(self) -> list[PromptRow]:
        """Every row, validated in full before anything else happens."""
        return self.benchmark.read_rows() if self.benchmark else load_prompt_set(self.files)

    def saved(self, settings: EvaluateSettings) -> EvaluateSettings:
        """settings with absolute paths to the prompt files (or benchmark files), so resume works
        from any directory."""
        if self.benchmark:  # evaluate.prompts is not used: the benchmark's file is the prompt set
            return replace(settings, benchmark={**settings.benchmark, **self.benchmark.saved_paths()},
                           evaluate=replace(settings.evaluate, prompts=None))
        prompts = [{"path": str(f.path), "metrics": list(f.metrics) if f.metrics else None} for f in self.files]
        return replace(settings, evaluate=replace(settings.evaluate, prompts=prompts))

    def order(self, record: dict) -> tuple[int, int]:
        """Sort key of a saved record: file order in the config, then line in the file."""
        labels = [f.label for f in self.files]
        return (labels.index(record["csv"]) if record["csv"] in labels else len(labels), record.get("line", 0))


def _locate(path: Path) -> Path:
    """A relative path is taken from the current directory, else from the repository root
    (so the shipped examples work from anywhere)."""
    if path.is_absolute() or path.exists() or not (ROOT / path).exists():
        return path.resolve() if path.exists() else path
    return (ROOT / path).resolve()


# ---- entry --------------------------------------------------------------------------------------
def run(settings: EvaluateSettings, run_dir: str | Path) -> Path:
    """Evaluate (or resume, or re-score) and return the directory that holds the results
    (`run_dir` for a new run; resume= and score_only= use their own)."""
    require_logger(settings.logger.get("wandb"))
    if settings.score_only:
        with _log_into(Path(str(settings.score_only))):
            result = score_only(settings)
    elif settings.resume:
        with _log_into(Path(str(settings.resume))):
            result = _evaluate(*_resumed_settings(settings))
    else:
        result = _evaluate(settings, Path(run_dir))
    if settings.evaluate.fail_on_error and _first_process():
        counts = store.read_json(result / "summary.json")["counts"]
        if counts["failed"]:
            raise RowsFailed(f"{counts['failed']} of {counts['rows']} rows failed (evaluate.fail_on_error=true); "
                             f"their errors are in {result / 'predictions.csv'}")
    return result


def _first_process() -> bool:
    """True in the process that started the run; False in the other ranks of a multi-process
    run, which must not take (or refuse each other on) the run folder's lock."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def _evaluate(settings: EvaluateSettings, run_dir: Path) -> Path:
    plan = Plan.from_settings(settings)  # every CSV is validated before a model loads (the settings already are)
    settings = plan.saved(settings)
    launch = _fabric_settings(settings)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise store.cannot_write(run_dir, err) from None
    with store.run_lock(run_dir) if _first_process() else contextlib.nullcontext():
        if launch is None:
            evaluate_shard(settings, run_dir, rank=0, world_size=1, device=settings.load.hardware.device())
        else:
            from lightning_fabric import Fabric

            # as a plain dict: Fabric walks its arguments and would assign into the frozen dataclasses
            Fabric(**launch).launch(_fabric_worker, settings.to_dict(), str(run_dir))
    return run_dir


def _fabric_settings(settings: EvaluateSettings) -> dict | None:
    """Lightning Fabric arguments when more than one process is asked for, else None."""
    launch = settings.launch
    devices, accelerator = launch.devices, launch.accelerator
    if devices is None:
        gpu = settings.load.hardware.gpu
        if not isinstance(gpu, list) or len(gpu) < 2:
            return None
        resolve_device(gpu)  # a clear error if the GPUs are not there
        devices, accelerator = [int(g) for g in gpu], accelerator or "cuda"
    return {
        "accelerator": accelerator or ("cuda" if torch.cuda.is_available() else "cpu"),
        "devices": devices,
        "strategy": launch.strategy or "auto",
        "num_nodes": int(launch.num_nodes or 1),
    }


def _fabric_worker(fabric, settings: dict, run_dir: str) -> None:
    evaluate_shard(EvaluateSettings.from_dict(settings), Path(run_dir), fabric.global_rank, fabric.world_size,
                   fabric.device, fabric.barrier)


def _resumed_settings(current: EvaluateSettings) -> tuple[EvaluateSettings, Path]:
    """The run's saved settings, with this invocation's RESUME_KEEPS_CURRENT."""
    run_dir = Path(str(current.resume))
    saved = _saved_settings(run_dir, "resume", current)
    kept = {key: getattr(current.evaluate, key) for key in _KEPT_OPTIONS}
    saved = replace(saved, load=replace(saved.load, hardware=replace(saved.load.hardware, gpu=current.load.hardware.gpu)),
                    launch=current.launch, evaluate=replace(saved.evaluate, **kept), logger=current.logger,
                    resume=str(run_dir), score_only=None)
    ignored = [o for o in current.command_line or () if not _applies_on_resume(o.lstrip("+~").split("=")[0])]
    if ignored:
        log.warning("resume keeps the run's own settings: ignored %s (only %s apply when resuming)",
                    " ".join(ignored), ", ".join(RESUME_KEEPS_CURRENT))
    log.info("resuming %s", run_dir)
    return saved, run_dir


def _applies_on_resume(key: str) -> bool:
    return key == "resume" or key.startswith("hydra.") or any(
        key == k or key.startswith(k + ".") for k in RESUME_KEEPS_CURRENT)


@contextlib.contextmanager
def _log_into(run_dir: Path):
    """While resuming or re-scoring a run, its own evaluate.log gets the log too (Hydra writes
    this invocation's log into a new folder)."""
    if not run_dir.is_dir():
        yield
        return
    try:
        handler = logging.FileHandler(run_dir / "evaluate.log", encoding="utf-8")
    except OSError as err:
        raise store.cannot_write(run_dir / "evaluate.log", err) from None
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _saved_settings(run_dir: Path, key: str, current: EvaluateSettings) -> EvaluateSettings:
    """The run's config.yaml (EvaluateSettings.to_dict(), or the composed config older runs saved).
    A setting added since the run was made takes this invocation's value."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{key}={run_dir}: no {CONFIG_FILE} there; give the run directory of an evaluate run")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{key}={run_dir}: cannot read {path} ({type(err).__name__}); start a new run") from None
    if not isinstance(saved, dict):
        raise UserError(f"{key}={run_dir}: {path} is not an evaluate run's config; start a new run")
    try:
        return EvaluateSettings.from_dict(_merged(current.to_dict(), saved))
    except UserError as err:
        raise UserError(f"{key}={run_dir}: its {CONFIG_FILE} does not fit this version ({err}); fix that "
                        f"key in {path}, or start a new run") from None


def _merged(current: dict, saved: dict) -> dict:
    """`saved` over `current`: a key or an option an older run did not save takes the current
    value; model, checkpoint and benchmark come whole from the run."""
    out = {**current, **saved}
    for group in ("evaluate", "generation", "launch"):
        if isinstance(saved.get(group), dict):
            out[group] = {**current[group], **saved[group]}
    return out


# ---- one process ----------------------------------------------------------------------------------
def evaluate_shard(settings: EvaluateSettings, run_dir: Path, rank: int, world_size: int, device: torch.device,
                   barrier: Callable[[], None] = lambda: None) -> None:
    """Answer this process's share of the rows that have no saved answer yet; rank 0 then
    merges every share and writes the report."""
    plan = Plan.from_settings(settings)
    if rank == 0 and not (run_dir / CONFIG_FILE).is_file():
        saved = {**settings.to_dict(), "resume": None, "score_only": None}
        store.write_atomically(run_dir / CONFIG_FILE, lambda f: yaml.safe_dump(saved, f, sort_keys=False))
    barrier()
    done = store.collect(run_dir)
    retry = settings.evaluate.retry_failed  # failed rows are answered again
    pending = [row for row in plan.rows if row.key not in done or (retry and done[row.key].get("error") is not None)]
    barrier()  # nobody appends before every process has read what is already done
    shard = pending[rank::world_size]
    stats = {"rows": 0, "generated_tokens": 0, "seconds": 0.0, "model": None}
    if rank == 0:
        log.info("%d rows, %d already done, %d to run on %d process(es)", len(plan.rows), len(done), len(pending), world_size)
    if shard:
        from minigpt4.build import load_model

        torch.manual_seed(int(settings.seed))
        lm = load_model(settings.load, device)
        stats["model"] = lm.label
        options = settings.evaluate
        with store.RecordWriter(store.rank_file(run_dir, rank, world_size)) as writer:
            stats.update(answer_rows(lm, shard, settings.generation, options.batch_size, writer.write,
                                     max_context=options.max_context, progress=bool(options.progress) and rank == 0,
                                     engine=bool(options.engine)))
    if world_size > 1:
        store.write_json(run_dir / store.SHARDS / f"stats.rank{rank}.json", stats)
    barrier()
    if rank == 0:
        all_stats = [stats] if world_size == 1 else [
            store.read_json(run_dir / store.SHARDS / f"stats.rank{r}.json") for r in range(world_size)]
        records = store.merge(run_dir, [row.key for row in plan.rows])  # also removes the shards
        throughput = _throughput(all_stats, settings.evaluate.batch_size)
        throughput["rows_done_before"] = len(plan.rows) - len(pending)  # by earlier invocations
        if not throughput["rows"] and (run_dir / "summary.json").is_file():  # resumed a finished run
            throughput = store.read_json(run_dir / "summary.json").get("throughput") or throughput
        write_report(run_dir, settings.to_dict(), plan, list(records.values()), throughput)


def _throughput(all_stats: list[dict], batch_size: int) -> dict:
    seconds = max(s["seconds"] for s in all_stats)
    rows = sum(s["rows"] for s in all_stats)
    tokens = sum(s["generated_tokens"] for s in all_stats)
    return {
        "rows": rows,
        "generated_tokens": tokens,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 3) if seconds else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "processes": len(all_stats),
        "batch_size": batch_size,
        "model": next((s["model"] for s in all_stats if s["model"]), None),
    }


# ---- the generation loop -----------------------------------------------------------------------
# ---- re-scoring ----------------------------------------------------------------------------------
def score_only(current: EvaluateSettings) -> Path:
    """Re-score a run's saved predictions with no model: the run's own metric choices, or
    evaluate.metrics when given on this command line."""
    run_dir = Path(str(current.score_only))
    saved = _saved_settings(run_dir, "score_only", current)
    if current.evaluate.metrics is not None:  # this command line's choice, for every file
        prompts = saved.evaluate.prompts
        if isinstance(prompts, list):
            prompts = [{**entry, "metrics": None} if isinstance(entry, dict) else entry for entry in prompts]
        saved = replace(saved, evaluate=replace(saved.evaluate, metrics=current.evaluate.metrics, prompts=prompts))
    saved = replace(saved, logger=current.logger)
    plan = Plan.from_settings(saved, read_rows=False)
    with store.run_lock(run_dir):  # not while a run is writing it
        saved_records = store.collect(run_dir)
        records = sorted(saved_records.values(), key=plan.order)
        if not records:
            raise UserError(f"score_only={run_dir}: no saved predictions ({store.PREDICTIONS}) to score")
        pending = _pending_rows(plan, saved_records)
        if pending:
            log.warning("score_only=%s: %d row(s) of the prompt set have no saved answer yet (resume=%s "
                        "answers them); the scores cover the %d saved", run_dir, pending, run_dir, len(records))
        previous = store.read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
        write_report(run_dir, saved.to_dict(), plan, records, previous.get("throughput"), score_only=True, pending=pending)
    return run_dir


def _pending_rows(plan: Plan, saved: dict) -> int | None:
    """Rows of the run's prompt files with no saved record; None when the files cannot be read
    any more (re-scoring needs only the saved predictions)."""
    try:
        rows = plan.read_rows()
    except (UserError, OSError):
        return None
    return sum(row.key not in saved for row in rows)
