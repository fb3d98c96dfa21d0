"""reliability: small runs (the unit checks: tests.unit.test_reliability)."""

from __future__ import annotations
import os
from pathlib import Path
import pytest
from tests.unit.test_reliability import ZERO_SHOT, _enospc  # noqa: E402


def test_a_full_disk_while_saving_metrics_names_the_file_and_keeps_the_old_one(
        tiny_overrides, tmp_path: Path, monkeypatch) -> None:
    from fints_repro.errors import WriteError
    from tests.conftest import run

    run_dir = tmp_path / "run"
    run([*ZERO_SHOT, *tiny_overrides], run_dir)
    before = {p: p.read_bytes() for p in (run_dir / "metrics.json", run_dir / "zero_shot" / "metrics.json")}
    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".metrics.json."):  # atomic_file's temporary file
            raise _enospc(self)
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(WriteError) as info:
        run([*ZERO_SHOT, *tiny_overrides], run_dir)  # everything cached: straight to the writes
    message = str(info.value)
    target = run_dir / "zero_shot" / "metrics.json"
    assert message.startswith(f"could not write {target} (zero_shot's metrics): No space left")
    assert "free space" in message and info.value.path == str(target)
    assert {p: p.read_bytes() for p in before} == before  # not cut to 0 bytes
    assert not list(run_dir.rglob(".*.tmp"))


def test_every_file_a_run_writes_is_renamed_into_place(tiny_overrides, tmp_path: Path,
                                                       monkeypatch) -> None:
    from tests.conftest import run

    renamed: list[Path] = []
    real = os.replace

    def record(src, dst):
        renamed.append(Path(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", record)
    run_dir = tmp_path / "run"
    run([*ZERO_SHOT, *tiny_overrides], run_dir)
    written = sorted(p for p in run_dir.rglob("*") if p.is_file())
    assert {"config.yaml", "metrics.json", "summary.md", "predictions.jsonl"} <= {p.name for p in written}
    assert [p for p in written if p not in renamed] == []


def test_a_run_dir_that_is_a_file_is_named(tiny_overrides, tmp_path: Path) -> None:
    from fints_repro.errors import WriteError
    from tests.conftest import run

    blocker = tmp_path / "results"
    blocker.write_text("notes")
    with pytest.raises(WriteError, match=rf"^run_dir {blocker} is not a folder: {blocker} is a file"):
        run([*ZERO_SHOT, *tiny_overrides], blocker)
    with pytest.raises(WriteError, match=rf"^run_dir {blocker / 'run'} is not a folder: {blocker} is a file"):
        run([*ZERO_SHOT, *tiny_overrides], blocker / "run")
    assert blocker.read_text() == "notes"
