"""`python evaluate.py`: prompt CSVs prompt CSVs (or a benchmark's file) -> answers saved row by row -> scores
and a report.

    rows (validated, no model; benchmarks/ reads benchmark files) -> shard rank::world -> group by length -> batches
      -> conversation.build_prompt + encode_prompt -> generation.generate (left padding)
      -> clean_answer -> predictions.jsonl (append + fsync per row) -> merge on rank 0
      -> predictions.csv, summary.json, metrics_by_category.png (report.py)

The run directory holds config.yaml (resolved), so `resume=<run dir>` continues with the same
model, prompts and decoding, and `score_only=<run dir>` re-scores without a model. Several
processes go through Lightning Fabric: `gpu=[0,1]`, or launch.* for anything else.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from minigpt4.config import (
    ROOT,
    evaluate_options,
    generation_settings,
    load_spec,
    to_container,
)
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
from minigpt4.settings import Launch

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# On resume everything comes from the run's saved config except how it is run:
RESUME_KEEPS_CURRENT = ("gpu", "launch", "evaluate.batch_size", "evaluate.progress", "evaluate.retry_failed",
                        "evaluate.fail_on_error", "logger")
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
    def from_cfg(cls, cfg: DictConfig, read_rows: bool = True) -> Plan:
        run_metrics = _plain(cfg.evaluate.get("metrics"))
        chosen = check_metrics(run_metrics, "evaluate.metrics") if run_metrics is not None else None
        if cfg.get("benchmark"):  # scored by its own scorer; evaluate.metrics only when asked for
            benchmark = Benchmark.from_dict(_plain(cfg.benchmark), files_needed=read_rows)
            plan = cls([PromptFile(benchmark.path, None, benchmark.label)], [], {benchmark.label: chosen or ()},
                       benchmark)
        else:
            files = [PromptFile(_locate(f.path), f.metrics, f.label) for f in parse_files(_plain(cfg.evaluate.prompts))]
            metrics = {f.label: check_metrics(f.metrics, f"evaluate.prompts {f.path}") if f.metrics is not None
                       else chosen or DEFAULT_METRICS for f in files}
            plan = cls(files, [], metrics)
        if read_rows:
            plan.rows = plan.read_rows()
        return plan

    def read_rows(self) -> list[PromptRow]:
        """Every row, validated in full before anything else happens."""
        return self.benchmark.read_rows() if self.benchmark else load_prompt_set(self.files)

    def saved(self, cfg: DictConfig) -> DictConfig:
        """cfg with absolute paths to the prompt files (or benchmark files), so resume works from
        any directory."""
        cfg = copy.deepcopy(cfg)
        if self.benchmark:
            for key, value in self.benchmark.saved_paths().items():
                cfg.benchmark[key] = value
            cfg.evaluate.prompts = None  # not used: the benchmark's file is the prompt set
        else:
            cfg.evaluate.prompts = [{"path": str(f.path), "metrics": list(f.metrics) if f.metrics else None}
                                    for f in self.files]
        return cfg

    def order(self, record: dict) -> tuple[int, int]:
        """Sort key of a saved record: file order in the config, then line in the file."""
        labels = [f.label for f in self.files]
        return (labels.index(record["csv"]) if record["csv"] in labels else len(labels), record.get("line", 0))


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _locate(path: Path) -> Path:
    """A relative path is taken from the current directory, else from the repository root
    (so the shipped examples work from anywhere)."""
    if path.is_absolute() or path.exists() or not (ROOT / path).exists():
        return path.resolve() if path.exists() else path
    return (ROOT / path).resolve()


# ---- entry --------------------------------------------------------------------------------------
def run(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Evaluate (or resume, or re-score) and return the directory that holds the results."""
    require_logger(_plain(cfg.logger).get("wandb"))
    if cfg.get("score_only"):
        with _log_into(Path(str(cfg.score_only))):
            result = score_only(cfg)
    elif cfg.get("resume"):
        with _log_into(Path(str(cfg.resume))):
            result = _evaluate(*_resumed_config(cfg))
    else:
        result = _evaluate(cfg, Path(run_dir))
    if cfg.evaluate.get("fail_on_error") and _first_process():
        counts = store.read_json(result / "summary.json")["counts"]
        if counts["failed"]:
            raise RowsFailed(f"{counts['failed']} of {counts['rows']} rows failed (evaluate.fail_on_error=true); "
                             f"their errors are in {result / 'predictions.csv'}")
    return result


def _first_process() -> bool:
    """True in the process that started the run; False in the other ranks of a multi-process
    run, which must not take (or refuse each other on) the run folder's lock."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def _evaluate(cfg: DictConfig, run_dir: Path) -> Path:
    plan = Plan.from_cfg(cfg)  # every CSV and setting is validated before a model loads
    evaluate_options(cfg)
    generation_settings(cfg)
    cfg = plan.saved(cfg)
    launch = _fabric_settings(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise store.cannot_write(run_dir, err) from None
    with store.run_lock(run_dir) if _first_process() else contextlib.nullcontext():
        if launch is None:
            evaluate_shard(cfg, run_dir, rank=0, world_size=1, device=resolve_device(cfg.gpu))
        else:
            from lightning_fabric import Fabric

            Fabric(**launch).launch(_fabric_worker, cfg, str(run_dir))
    return run_dir


def _fabric_settings(cfg: DictConfig) -> dict | None:
    """Lightning Fabric arguments when more than one process is asked for, else None."""
    launch = Launch(**to_container(cfg.launch))
    devices, accelerator = launch.devices, launch.accelerator
    if devices is None:
        gpu = _plain(cfg.gpu)
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


def _fabric_worker(fabric, cfg: DictConfig, run_dir: str) -> None:
    evaluate_shard(cfg, Path(run_dir), fabric.global_rank, fabric.world_size, fabric.device, fabric.barrier)


def _resumed_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    run_dir = Path(str(cfg.resume))
    saved = _saved_config(run_dir, "resume")
    for key in RESUME_KEEPS_CURRENT:
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    saved.resume = str(run_dir)
    ignored = [o for o in _command_line_overrides() if not _applies_on_resume(o.lstrip("+~").split("=")[0])]
    if ignored:
        log.warning("resume keeps the run's own settings: ignored %s (only %s apply when resuming)",
                    " ".join(ignored), ", ".join(RESUME_KEEPS_CURRENT))
    log.info("resuming %s", run_dir)
    return saved, run_dir


def _applies_on_resume(key: str) -> bool:
    return key == "resume" or key.startswith("hydra.") or any(
        key == k or key.startswith(k + ".") for k in RESUME_KEEPS_CURRENT)


def _command_line_overrides() -> list[str]:
    """What the user typed after evaluate.py (empty when composed in-process, e.g. by a test)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


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


def _saved_config(run_dir: Path, key: str) -> DictConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{key}={run_dir}: no {CONFIG_FILE} there; give the run directory of an evaluate run")
    return OmegaConf.load(path)


# ---- one process ----------------------------------------------------------------------------------
def evaluate_shard(cfg: DictConfig, run_dir: Path, rank: int, world_size: int, device: torch.device,
                   barrier: Callable[[], None] = lambda: None) -> None:
    """Answer this process's share of the rows that have no saved answer yet; rank 0 then
    merges every share and writes the report."""
    plan = Plan.from_cfg(cfg)
    if rank == 0 and not (run_dir / CONFIG_FILE).is_file():
        store.write_atomically(run_dir / CONFIG_FILE, lambda f: f.write(OmegaConf.to_yaml(cfg, resolve=True)))
    barrier()
    done = store.collect(run_dir)
    retry = bool(cfg.evaluate.get("retry_failed"))  # failed rows are answered again
    pending = [row for row in plan.rows if row.key not in done or (retry and done[row.key].get("error") is not None)]
    barrier()  # nobody appends before every process has read what is already done
    shard = pending[rank::world_size]
    stats = {"rows": 0, "generated_tokens": 0, "seconds": 0.0, "model": None}
    if rank == 0:
        log.info("%d rows, %d already done, %d to run on %d process(es)", len(plan.rows), len(done), len(pending), world_size)
    if shard:
        from minigpt4.build import load_model

        torch.manual_seed(int(cfg.seed))
        lm = load_model(load_spec(cfg), device)
        stats["model"] = lm.label
        settings = generation_settings(cfg)
        with store.RecordWriter(store.rank_file(run_dir, rank, world_size)) as writer:
            stats.update(answer_rows(lm, shard, settings, int(cfg.evaluate.batch_size), writer.write,
                                     max_context=int(cfg.evaluate.max_context),
                                     progress=bool(cfg.evaluate.progress) and rank == 0,
                                     engine=bool(cfg.evaluate.get("engine", False))))
    if world_size > 1:
        store.write_json(run_dir / store.SHARDS / f"stats.rank{rank}.json", stats)
    barrier()
    if rank == 0:
        all_stats = [stats] if world_size == 1 else [
            store.read_json(run_dir / store.SHARDS / f"stats.rank{r}.json") for r in range(world_size)]
        records = store.merge(run_dir, [row.key for row in plan.rows])  # also removes the shards
        throughput = _throughput(all_stats, cfg)
        throughput["rows_done_before"] = len(plan.rows) - len(pending)  # by earlier invocations
        if not throughput["rows"] and (run_dir / "summary.json").is_file():  # resumed a finished run
            throughput = store.read_json(run_dir / "summary.json").get("throughput") or throughput
        write_report(run_dir, _plain(cfg), plan, list(records.values()), throughput)


def _throughput(all_stats: list[dict], cfg: DictConfig) -> dict:
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
        "batch_size": int(cfg.evaluate.batch_size),
        "model": next((s["model"] for s in all_stats if s["model"]), None),
    }


# ---- the generation loop -----------------------------------------------------------------------
# ---- re-scoring ----------------------------------------------------------------------------------
def score_only(cfg: DictConfig) -> Path:
    """Re-score a run's saved predictions with no model: the run's own metric choices, or
    evaluate.metrics when given on this command line."""
    run_dir = Path(str(cfg.score_only))
    saved = _saved_config(run_dir, "score_only")
    if cfg.evaluate.get("metrics") is not None:  # this command line's choice, for every file
        saved.evaluate.metrics = cfg.evaluate.metrics
        for entry in saved.evaluate.prompts:
            if isinstance(entry, DictConfig):
                entry.metrics = None
    OmegaConf.update(saved, "logger", OmegaConf.select(cfg, "logger"), merge=False, force_add=True)
    plan = Plan.from_cfg(saved, read_rows=False)
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
        write_report(run_dir, _plain(saved), plan, records, previous.get("throughput"), score_only=True, pending=pending)
    return run_dir


def _pending_rows(plan: Plan, saved: dict) -> int | None:
    """Rows of the run's prompt files with no saved record; None when the files cannot be read
    any more (re-scoring needs only the saved predictions)."""
    try:
        rows = plan.read_rows()
    except (UserError, OSError):
        return None
    return sum(row.key not in saved for row in rows)
