"""Config composition through Hydra itself, for the run and for each of its methods.

A run's config is what ``python -m fints_repro.run <overrides>`` composes. A preset's
``methods`` list names, per method, a ``backbone`` and a ``steering`` option (and optional
dotted ``overrides``). Each method's config is composed by Hydra from the run's own
overrides plus ``backbone=<b> steering=<s>`` plus the method's overrides, so precedence is
Hydra's: the option's yaml < the preset's values < the command line < the method's own
overrides. ``+exp=lamp_news steering.layer=15`` therefore moves every steered method of
the preset, unless a method sets its own layer.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from fints_repro.backbones import backbone_schema
from fints_repro.config import BackboneConfig, GenerationConfig, RunConfig, SteeringConfig
from fints_repro.errors import ConfigError
from fints_repro.models.engines import check_engine, engine_schema, rows_need
from fints_repro.steering import steering_schema

CONFIG_MODULE = "fints_repro.conf"
# The groups a method chooses (fidelity: optionally); its overrides may only touch these
# two and the generation settings (decoding per method, as the authors decode steered rows
# otherwise than unsteered ones).
METHOD_GROUPS = ("backbone", "steering")
METHOD_OVERRIDES = (*METHOD_GROUPS, "generation")
# Generation settings that hold for the whole run (the task parses every method's rows alike).
RUN_WIDE = ("generation.postprocess",)


@functools.cache
def run_schema() -> type:
    """``RunConfig`` whose ``backbone``, ``steering`` and ``engine`` nodes hold every
    registered backbone's, steering method's and engine's own settings."""
    nodes = {"backbone": backbone_schema(), "steering": steering_schema(),
             "engine": engine_schema()}
    schema = dataclasses.make_dataclass(
        "RunSchema", [(n, t, dataclasses.field(default_factory=t)) for n, t in nodes.items()],
        bases=(RunConfig,))
    schema.__module__ = __name__  # found by name through __getattr__ (pickle, multirun)
    return schema


def __getattr__(name: str) -> Any:
    if name == "RunSchema":
        return run_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_configs() -> None:
    """Store the run's schema in Hydra's ConfigStore (``schema``, the first default of
    ``conf/config.yaml``)."""
    ConfigStore.instance().store(name="schema", node=run_schema())


@dataclass
class Method:
    """One method a run evaluates: its name and its composed backbone, steering and
    generation settings."""

    name: str
    backbone: BackboneConfig
    steering: SteeringConfig
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)


# Keys that were renamed, old -> new: an old key (in an override, a preset or a yaml)
# stops the run with an error naming the new one.
RENAMED = {
    "steering.steerx.backbone": "steering.steerx.base",
    "steering.steerx.tau": "steering.steerx.token_threshold",
    "steering.fine_grained.tau": "steering.fine_grained.temperature",
    "steering.bipo.beta": "steering.bipo.dpo_beta",
    "steering.pairs.question": "steering.pairs.extraction_prompt",
    "dataset.task": "dataset.benchmark",
}


def renamed_key_error(text: str) -> ConfigError | None:
    """The error for the first renamed key that ``text`` (an override or Hydra's message)
    names, or None."""
    for old, new in RENAMED.items():
        if re.search(rf"(?<![\w.]){re.escape(old)}(?![\w])", text):
            return ConfigError(f"{old} is now {new}: rename it (in the override, the preset "
                               "or the yaml that sets it)")
    return None


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m fints_repro.run <overrides>`` runs with (without ``hydra``).

    Inside a running Hydra app (``@hydra.main``, also in a multirun job) the app's own
    config search path is used; elsewhere (tests, scripts) the package's ``conf/``."""
    register_configs()
    for o in overrides:
        if (e := renamed_key_error(o.split("=", 1)[0].lstrip("+~"))) is not None:
            raise e
    try:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name="config", overrides=list(overrides))
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as e:
        renamed = renamed_key_error(str(e))
        if renamed is None:
            raise
        raise renamed from e


def group_options(group: str) -> list[str]:
    """The options of a config group (``backbone`` → ``["rag", "zero_shot"]``)."""

    def options() -> list[str]:
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))

    if GlobalHydra.instance().is_initialized():
        return options()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return options()


def compose_run(overrides: Sequence[str] = ()) -> RunConfig:
    return OmegaConf.to_object(compose(overrides))  # type: ignore[return-value]


def _chooses(override: str, group: str) -> bool:
    """Does this command-line override pick an option of ``group`` (``group=x``,
    ``+group=x``, ``~group``, ``override group``)?"""
    key = override.split("=", 1)[0].lstrip("+~")
    return key == group


def method_name(backbone: str, steering: str) -> str:
    return backbone if steering == "none" else f"{backbone}+{steering}"


def _override_value(value: Any) -> str:
    """A method override's value as Hydra override syntax."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def resolve_methods(cfg: RunConfig, overrides: Sequence[str] | None) -> list[Method]:
    """The methods of a run, each composed by Hydra (see the module docstring).

    ``overrides`` are the overrides ``cfg`` was composed with; they are required when the
    config lists ``methods`` (a check recomposes them and fails on a mismatch, so a
    method can never run with settings other than its run's)."""
    specs = cfg.methods or []
    if not specs:
        return [Method(method_name(cfg.backbone.name, cfg.steering.name), cfg.backbone,
                       cfg.steering, cfg.generation)]
    if overrides is None:
        raise ConfigError("a config with `methods` needs the overrides it was composed with "
                          "(run_experiment(cfg, run_dir, overrides=...))")
    base = [o for o in overrides if not any(_chooses(o, g) for g in METHOD_GROUPS)]
    composed = compose_run(overrides)
    # (logger and run_dir are the run's own business: a multirun names its wandb group)
    if dataclasses.replace(composed, logger=cfg.logger, run_dir=cfg.run_dir) != cfg:
        raise ConfigError("run_experiment: the config differs from what its overrides compose "
                          f"({list(overrides)}); pass the overrides it was composed with")
    methods = []
    for i, spec in enumerate(specs):
        chosen = [("backbone", spec.backbone), ("steering", spec.steering)]
        if spec.fidelity is not None:
            chosen.append(("fidelity", spec.fidelity))
        for group, option in chosen:
            known = group_options(group)
            if option not in known:
                raise ConfigError(f"methods[{i}]: no {group} option {option!r} (known: {known})")
        own = []
        for key, value in spec.overrides.items():
            if key.split(".", 1)[0] not in METHOD_OVERRIDES or "." not in key:
                raise ConfigError(f"methods[{i}].overrides: {key!r} must start with backbone., "
                                  "steering. or generation.")
            if key in RUN_WIDE:
                raise ConfigError(f"methods[{i}].overrides: {key} holds for the whole run; set "
                                  "it outside `methods`")
            own.append(f"{key}={_override_value(value)}")
        try:
            picks = [f"{g}={o}" for g, o in chosen]
            mine = [o for o in base if not (spec.fidelity is not None and _chooses(o, "fidelity"))]
            run = compose_run([*mine, *picks, *own])
        except Exception as e:  # Hydra's message names the option or key
            raise ConfigError(f"methods[{i}] ({spec.backbone}, {spec.steering}): {e}") from e
        name = spec.name or method_name(run.backbone.name, run.steering.name)
        methods.append(Method(name, run.backbone, run.steering, run.generation))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"methods: duplicate method names {names}; give one a `name`")
    return methods


def compose_group(overrides: Sequence[str], group: str, option: str) -> Any:
    """The config node of ``group=option`` composed with the run's overrides (e.g. a pair
    generator's model config)."""
    base = [o for o in overrides if not _chooses(o, group)]
    try:
        return getattr(compose_run([*base, f"{group}={option}"]), group)
    except Exception as e:
        raise ConfigError(f"no {group} option {option!r}: {e}") from e


def check_names(cfg: "RunConfig", methods: Iterable[Any] = ()) -> None:
    """Every component name against its registry (imports the registering modules)."""
    from fints_repro.backbones import BACKBONES
    from fints_repro.data.load import LOADERS
    from fints_repro.eval.metrics import METRICS
    from fints_repro.eval.postprocess import POSTPROCESS
    from fints_repro.retrieval.base import RETRIEVERS
    from fints_repro.steering import STEERING
    from fints_repro.tasks import TASKS
    from fints_repro.tracking import TRACKERS

    TASKS.get(cfg.dataset.task_type, "dataset.task_type")
    LOADERS.get(cfg.dataset.loader, "dataset.loader")
    if getattr(TASKS.get(cfg.dataset.task_type), "scores_with_metric_functions", False):
        for name in cfg.dataset.metrics:
            METRICS.get(name, "dataset.metrics")
    POSTPROCESS.get(cfg.generation.postprocess, "generation.postprocess")
    RETRIEVERS.get(cfg.retriever.name, "retriever.name")
    TRACKERS.get(cfg.logger.name, "logger.name")
    needs: dict[str, set[str]] = {}
    for method in methods or [cfg]:
        backbone = BACKBONES.get(method.backbone.name, "backbone.name")
        STEERING.get(method.steering.name, "steering.name")
        needs[getattr(method, "name", "the run")] = rows_need(backbone, method.steering.name != "none")
    check_engine(cfg.engine, needs)
        # (each method's values were checked when its config was composed: RunConfig)
