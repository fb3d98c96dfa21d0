"""Every config group option composes into the typed schema; mistakes fail at start-up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fints_repro.config import RunConfig
from tests.conftest import compose

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ["dataset", "model", "backbone", "steering", "retriever", "logger"]


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_group_option_composes(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, RunConfig)
    assert getattr(run, group).name == option


@pytest.mark.parametrize("exp", sorted(p.stem for p in (CONF / "exp").glob("*.yaml")))
def test_every_exp_preset_composes_and_documents_its_command(exp: str) -> None:
    text = (CONF / "exp" / f"{exp}.yaml").read_text()
    assert re.search(rf"python -m fints_repro\.run (-m )?\+exp={exp}\b", text), \
        "preset must open with its command"
    run = OmegaConf.to_object(compose([f"+exp={exp}"]))
    assert isinstance(run, RunConfig)


def test_misspelt_key_fails_at_compose() -> None:
    with pytest.raises(Exception) as e:
        compose(["dataset.rag_kk=3"])
    assert "rag_kk" in str(e.value)


def test_wrong_type_fails_at_compose() -> None:
    with pytest.raises(Exception) as e:
        compose(["dataset.rag_k=five"])
    assert "rag_k" in str(e.value)


def test_data_root_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTS_DATA_ROOT", "/some/where")
    run = OmegaConf.to_object(compose(["dataset=lamp_news"]))
    assert run.dataset.path == "/some/where/lamp4"
    run = OmegaConf.to_object(compose(["dataset=lamp_news", "data.root=/else"]))
    assert run.dataset.path == "/else/lamp4"


def test_structured_schema_rejects_unknown_top_level_key() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Could not override 'not_a_key'"):
        compose(["not_a_key=1"])


@pytest.mark.parametrize("old, new, value", [
    ("steering.steerx.backbone", "steering.steerx.base", "caa"),
    ("steering.steerx.tau", "steering.steerx.token_threshold", "0.5"),
    ("steering.fine_grained.tau", "steering.fine_grained.temperature", "0.5"),
    ("steering.bipo.beta", "steering.bipo.dpo_beta", "0.5"),
    ("steering.pairs.question", "steering.pairs.extraction_prompt", "task"),
    ("dataset.task", "dataset.benchmark", "lamp4"),
])
def test_a_renamed_key_stops_the_run_naming_its_new_name(old: str, new: str, value: str) -> None:
    from fints_repro.compose import RENAMED, compose_run
    from fints_repro.errors import ConfigError

    assert RENAMED[old] == new
    message = f"{old} is now {new}: rename it (in the override, the preset or the yaml that sets it)"
    with pytest.raises(ConfigError) as e:
        compose_run(["+exp=demo", f"{old}={value}"])
    assert str(e.value) == message
    if old.startswith("steering."):  # a method's own overrides in a preset's `methods:`
        from fints_repro.compose import resolve_methods

        over = ["+exp=demo", f"methods=[{{backbone: rag, steering: caa, overrides: {{{old}: {value}}}}}]"]
        with pytest.raises(ConfigError) as e:
            resolve_methods(compose_run(over), over)
        assert str(e.value) == "methods[0] (rag, caa): " + message
    # and the new key composes
    cfg = compose_run(["+exp=demo", f"{new}={value}"])
    node = cfg
    for part in new.split("."):
        node = getattr(node, part)
    assert str(node) == value or float(node) == float(value)
