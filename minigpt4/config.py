"""Hydra/OmegaConf glue: config composition for scripts and notebooks, and the one place a composed
config becomes typed settings (minigpt4/settings.py)."""

from __future__ import annotations

import re
from dataclasses import asdict, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from minigpt4 import settings
from minigpt4.errors import UserError
from minigpt4.generation import GenerationSettings
from minigpt4.settings import (
    ChatOptions,
    ChatSettings,
    EvaluateSettings,
    FinetuneSettings,
    LoadSpec,
    ServeOptions,
)

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
                         ("run_folder", _run_folder),
                         ("default", lambda name: getattr(settings, name.upper()))):  # ${default:max_context}
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)

# conf/generation/official.yaml takes its values from here: GenerationSettings' defaults are the official
# decoding, written once (minigpt4/generation.py), for notebooks (GenerationSettings()) and for the YAML.
def _register_generation_defaults() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="generation_defaults", node=asdict(GenerationSettings()))


_register_generation_defaults()

# Keys whose value is a sentence a user types: taken exactly as typed, never as Hydra syntax.
FREE_TEXT_KEYS = ("chat.prompt", "chat.system", "chat.system_text_only", "benchmark.prompt")
_FREE_TEXT = re.compile(r"(\+{0,2})(" + "|".join(re.escape(k) for k in FREE_TEXT_KEYS) + r")=(.*)", re.DOTALL)


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
        options = re.findall(r"^\t(\S+)$", message.split("Config search path")[0], flags=re.MULTILINE)
        choose = f"; choose {match[1]}={'|'.join(options)}" if options else ""
        return f"{match[1]}={match[2]}: no such option{choose}"
    if match := re.match(r"Ambiguous value for argument '(.*?)=(.*)'$", message, flags=re.MULTILINE):
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


def to_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}


# ---- the typed boundary: a composed config -> minigpt4/settings.py's objects, once -----------------
def load_spec(cfg) -> LoadSpec:
    """model.*, checkpoint.*, gpu, precision, cpu_threads -> what build.load_model takes."""
    return LoadSpec.from_dict(to_container(cfg))


def chat_settings(cfg) -> ChatSettings:
    """conf/chat.yaml, composed -> recipes.chat.run's argument."""
    plain = to_container(cfg)
    return ChatSettings(load=LoadSpec.from_dict(plain), generation=GenerationSettings(**plain["generation"]),
                        chat=ChatOptions(**plain["chat"]), serve=ServeOptions(**plain["serve"]),
                        ui=plain["ui"], seed=plain.get("seed"))


def _command_line() -> tuple[str, ...] | None:
    """The overrides as the user typed them, under a Hydra run (None when composed in-process)."""
    from hydra.core.hydra_config import HydraConfig

    return tuple(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def evaluate_settings(cfg) -> EvaluateSettings:
    """conf/evaluate.yaml, composed -> recipes.evaluate.run's argument (checked: a bad value or an
    unknown key is one UserError)."""
    return replace(EvaluateSettings.from_dict(to_container(cfg)), command_line=_command_line())


def finetune_settings(cfg) -> FinetuneSettings:
    """conf/finetune.yaml, composed -> recipes.finetune.run's argument. output_dir=null under Hydra:
    Hydra's run folder (conf/finetune.yaml's hydra.run.dir, which already follows resume= and output_dir=)."""
    from hydra.core.hydra_config import HydraConfig

    settings = replace(FinetuneSettings.from_dict(to_container(cfg)), command_line=_command_line())
    if settings.output_dir is None and HydraConfig.initialized():
        settings = replace(settings, output_dir=HydraConfig.get().runtime.output_dir)
    return settings
