"""Every config group option composes into the typed schema; mistakes fail at start-up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from fints_repro.config import RunConfig
from tests.conftest import compose

CONF = Path(__file__).resolve().parents[1] / "conf"
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
    with pytest.raises((ConfigKeyError, ValidationError, Exception)):
        compose(["not_a_key=1"])
