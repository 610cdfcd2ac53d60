"""Hydra/OmegaConf glue: config composition for scripts and notebooks, devices and precision."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from minigpt4.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
ASSETS = Path(__file__).resolve().parent / "assets"


def _if_new_run(for_a_new_run, otherwise, *, _root_):
    """evaluate.yaml's Hydra settings: resume=RUN and score_only=RUN act on an existing run (its
    evaluate.log gets their log), so they must not create a new run folder."""
    return otherwise if _root_.get("resume") or _root_.get("score_only") else for_a_new_run


def _run_folder(new_folder, *, _root_):
    """finetune.yaml's hydra.run.dir: resume=RUN continues in RUN and output_dir=DIR writes to
    DIR, so Hydra's log goes there too instead of into a new folder of its own."""
    resume = _root_.get("resume")
    if resume and Path(str(resume)).is_dir():
        return str(resume)
    return str(_root_.get("output_dir") or new_folder)


for _name, _resolver in (("asset", lambda name: str(ASSETS / name)),  # a file shipped in minigpt4/assets
                         ("repo", lambda path: str(ROOT / path)),  # a file of this repository (--help names docs)
                         ("if_new_run", _if_new_run),
                         ("run_folder", _run_folder)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)

# Keys whose value is a sentence a user types: taken exactly as typed, never as Hydra syntax.
FREE_TEXT_KEYS = ("chat.prompt", "chat.system", "chat.system_text_only", "benchmark.prompt")
_FREE_TEXT = re.compile(r"(\+{0,2})(" + "|".join(re.escape(k) for k in FREE_TEXT_KEYS) + r")=(.*)", re.S)


def _hydra_quoted(text: str) -> str:
    """`text` as a single-quoted Hydra value that Hydra's parser returns unchanged (it unescapes
    only backslashes before a quote or at the end)."""
    return "'" + re.sub(r"(\\*)('|\Z)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text) + "'"


def as_typed(override: str) -> str:
    """A free-text override (chat.prompt=What's this?) quoted for Hydra, whose grammar would
    otherwise reject ' ! , ( and the like, with ${ escaped so that OmegaConf does not resolve it;
    any other override is returned unchanged."""
    match = _FREE_TEXT.fullmatch(override)
    if not match:
        return override
    prefix, key, text = match.groups()
    text = re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", text)  # OmegaConf: \${ is a literal ${
    return f"{prefix}{key}={_hydra_quoted(text)}"


def _shell_word(text: str) -> str:
    """`text` in double quotes as a shell would take it back (for suggestions in messages)."""
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


def check_syntax(overrides: list[str], config_name: str) -> None:
    """Each override as Hydra's parser reads it; the first it cannot read is a UserError that
    names it and shows how to write it (Hydra's own message names neither)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException:
            key, equals, value = override.partition("=")
            if not equals:
                raise UserError(f"'{override}' is not KEY=VALUE: write e.g. model=7b or gpu=cpu "
                                f"(python {config_name}.py --help lists the keys)") from None
            if value.lstrip().startswith(("[", "{")):
                example = f"{key}=[plain,'an (odd) one!']"
                fix = f"quote each item that holds special characters: {_shell_word(example)}"
            else:
                fix = f"quote it: {_shell_word(f'{key}={_hydra_quoted(value)}')}"
            raise UserError(f"{override}: Hydra cannot read this value; {fix}") from None


def _one_line(message: str, config_name: str) -> str:
    """Hydra's multi-line composition error as one line that says what to do."""
    if match := re.match(r"Could not override '(.+?)'\.\s+To append to your config use (\S+)", message):
        return (f"{match[1]}: no such key in this config; check its spelling (python {config_name}.py --help "
                f"lists the main keys; {match[2]} would add it)")
    if match := re.search(r"Could not (?:find|load) '(.+?)/(.+?)'", message):
        options = re.findall(r"^\t(\S+)$", message.split("Config search path")[0], flags=re.M)
        choose = f"; choose {match[1]}={'|'.join(options)}" if options else ""
        return f"{match[1]}={match[2]}: no such option{choose}"
    if match := re.match(r"Ambiguous value for argument '(.*?)=(.*)'$", message, flags=re.M):
        key, value = match.groups()
        return (f"{key}={value}: a comma makes a list or a sweep; write {key}=[{value}] for a list, "
                f"or quote it for one value: {_shell_word(f'{key}={_hydra_quoted(value)}')}")
    lines = [line.strip() for line in message.split("Config search path")[0].splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("See https://"))


def compose(config_name: str = "chat", overrides: list[str] | None = None) -> DictConfig:
    """The config an entry point would see for these command-line overrides (no run directory).
    Free-text keys are taken as typed, as on the command line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [as_typed(o) for o in overrides or []]
    check_syntax(overrides, config_name)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_one_line(str(err), config_name)) from None


def resolve_device(gpu) -> torch.device:
    """`gpu` as typed on the command line -> the device this process uses.

    auto: the first GPU if there is one, else the CPU; cpu; 0 / cuda:1; [0,1] (first of a list:
    the others are Lightning's business)."""
    if isinstance(gpu, (list, tuple, ListConfig)):
        if not len(gpu):
            raise UserError("gpu=[]: give at least one GPU index, or gpu=cpu")
        gpu = gpu[0]
    text = str(gpu).strip().lower()
    if text in ("auto", "none", ""):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    index = text.removeprefix("cuda:")
    if not index.isdigit():
        raise UserError(f"gpu={gpu}: use gpu=cpu, gpu=auto, gpu=0 or gpu=[0,1]")
    if not torch.cuda.is_available():
        raise UserError(f"gpu={gpu} but no CUDA GPU is visible to this process: use gpu=cpu")
    if int(index) >= torch.cuda.device_count():
        raise UserError(f"gpu={gpu} but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device(f"cuda:{index}")


def gpu_indices(gpu) -> list[int] | None:
    """Lightning's `devices` for a gpu setting (None = CPU)."""
    if isinstance(gpu, (list, tuple, ListConfig)):
        return [int(resolve_device(g).index) for g in gpu] if resolve_device(gpu).type == "cuda" else None
    device = resolve_device(gpu)
    return [device.index] if device.type == "cuda" else None


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """(compute dtype, quantisation or None): 'int8'/'int4' are ours (decoding/quant.py, weight-only,
    fast decoding); 'bnb-int8'/'bnb-nf4' load the LLM through bitsandbytes."""
    p = str(precision).lower()
    if p == "auto":
        return (torch.float16 if device.type == "cuda" else torch.float32), None
    if p in _DTYPES:
        if device.type == "cpu" and p == "fp16":
            raise UserError("precision=fp16 needs a GPU (fp16 matmuls are not supported on CPU): use fp32 or bf16")
        return _DTYPES[p], None
    if p in ("int8", "int4", "bnb-int8", "bnb-nf4"):
        return (torch.float16 if device.type == "cuda" else torch.float32), p
    raise UserError(f"precision={precision}: choose auto, fp32, fp16, bf16, int8, int4, bnb-int8 or bnb-nf4")


def to_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}
