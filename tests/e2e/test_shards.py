"""One experiment in parts (fints_repro/shards.py): the parts' merged rows and scores
equal the whole run's; the parts run through Hydra's launchers and are merged when the
multirun ends."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fints_repro.config import ShardConfig
from fints_repro.shards import shard_samples, shard_users

from ..conftest import run

# zero-shot, Fints per user, and BiPO with one vector over every user's pairs (a stage
# over all users: each part must train it on the whole experiment's pairs, and only one does)
METHODS = ("methods=[{backbone: zero_shot},{backbone: rag, steering: fine_grained},"
           "{backbone: rag, steering: bipo, name: bipo_all}]")
SHARDED = ["steering.bipo.scope=all", "steering.bipo.max_steps=2"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_users_are_dealt_into_disjoint_parts_that_cover_them() -> None:
    users = [f"u{i}" for i in (5, 1, 3, 2, 4, 0, 6)]
    parts = [shard_users(users, ShardConfig(3, i)) for i in range(3)]
    assert parts == [["u0", "u3", "u6"], ["u1", "u4"], ["u2", "u5"]]
    samples = [type("S", (), {"user": u, "id": n})() for n, u in enumerate(users * 2)]
    got = [[s.id for s in shard_samples(samples, ShardConfig(3, i))] for i in range(3)]
    assert got[1] == [1, 4, 8, 11]  # u1 and u4, in the samples' order
    assert sorted(sum(got, [])) == list(range(14))


def _assert_merged_equals_whole(merged: Path, whole: Path, methods: list[str]) -> None:
    whole_metrics = json.loads((whole / "metrics.json").read_text())
    merged_metrics = json.loads((merged / "metrics.json").read_text())
    assert merged_metrics["n_samples"] == whole_metrics["n_samples"]
    assert merged_metrics["n_users"] == whole_metrics["n_users"]
    for method in methods:
        a = _rows(whole / method / "predictions.jsonl")
        b = _rows(merged / method / "predictions.jsonl")
        assert [r["id"] for r in b] == [r["id"] for r in a]
        for ra, rb in zip(a, b):  # row for row: prompt, candidates, prediction, scores, key
            assert rb == ra, f"{method}: row {ra['id']} differs"
        wm, mm = whole_metrics["methods"][method], merged_metrics["methods"][method]
        scores = [k for k in wm if k.startswith(("rouge", "meteor", "n")) and k in mm
                  and not k.startswith(("n_generated", "n_cached"))]
        assert {"rouge1", "rougeL", "rouge1_bootstrap", "rougeL_bootstrap", "n"} <= set(scores)
        assert {k: mm[k] for k in scores} == {k: wm[k] for k in scores}  # to the last digit
        assert mm["n_generated"] + mm["n_cached"] == wm["n_generated"] + wm["n_cached"]


def test_a_missing_or_failed_part_is_named_and_nothing_is_merged(tiny_overrides, tmp_path) -> None:
    from fints_repro.errors import DataError
    from fints_repro.report import write_merged

    ov = ["+exp=demo", *tiny_overrides, "methods=[{backbone: zero_shot}]", "shard.count=2"]
    run([*ov, "shard.index=0"], tmp_path / "sweep" / "0")
    with pytest.raises(DataError, match=r"parts \[1\] of 2 have no run folder"):
        write_merged(tmp_path / "sweep")
    (tmp_path / "sweep" / "1").mkdir()
    (tmp_path / "sweep" / "1" / "config.yaml").write_text(
        (tmp_path / "sweep" / "0" / "config.yaml").read_text().replace("index: 0", "index: 1"))
    with pytest.raises(DataError, match=r"part 1 \(.*sweep/1\) has no metrics.json: it failed"):
        write_merged(tmp_path / "sweep")
    assert not (tmp_path / "sweep" / "merged").exists()


def test_more_parts_than_users_stops_at_start_up(tiny_overrides, tmp_path) -> None:
    from fints_repro.errors import ConfigError

    from ..conftest import assert_config_error

    assert_config_error([*tiny_overrides, "shard.count=2", "shard.index=2"], "shard.index")
    with pytest.raises(ConfigError, match=r"shard.count=4: more parts than the experiment's 3 users"):
        run(["+exp=demo", *tiny_overrides, "methods=[{backbone: zero_shot}]", "shard.count=4",
             "shard.index=3"], tmp_path / "run")


def _multirun(ov: list[str], sweep: Path, launcher: list[str]) -> str:
    cmd = [sys.executable, "-m", "fints_repro.run", "-m", *ov, *launcher,
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"merged: {sweep / 'merged'}" in done.stdout  # by the callback, when the multirun ended
    return done.stdout


def test_three_parts_side_by_side_merged_equal_the_whole_run_row_for_row(
        tiny_overrides, tmp_path) -> None:
    """Three parts at once (joblib, one process each, sharing one cache): the merged rows
    and scores equal the whole run's (own cache); BiPO's one vector over every user is
    trained once; each part appended to cache files of its own."""
    ov = ["+exp=demo", *tiny_overrides, METHODS, *SHARDED, "threads=1"]
    run([*ov, f"cache_dir={tmp_path / 'whole-cache'}"], tmp_path / "whole")
    sweep = tmp_path / "sweep"
    _multirun([*ov, "shard.count=3", "shard.index=0,1,2"], sweep,
              ["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"])
    _assert_merged_equals_whole(sweep / "merged", tmp_path / "whole",
                                ["zero_shot", "rag+fine_grained", "bipo_all"])
    users = [f"demo_user_{u:02d}" for u in range(3)]
    for job in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        shard = json.loads((job / "metrics.json").read_text())
        i = [int(o.split("=")[1]) for o in (job / ".hydra" / "overrides.yaml").read_text().split()
             if o.startswith("shard.index=")][0]
        part = _rows(job / "zero_shot" / "predictions.jsonl")
        assert {r["user"] for r in part} == set(shard_users(users, ShardConfig(3, i)))
        whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["methods"]["bipo_all"]
        assert shard["methods"]["bipo_all"]["steering_n_pairs"] == whole["steering_n_pairs"]
    assert len(list((tmp_path / "cache" / "vectors").glob("bipo-*.safetensors"))) == 1
    stores = sorted(p.name for p in (tmp_path / "cache" / "generations").glob("*.jsonl"))
    assert stores and all(".part-" in name for name in stores)
    assert (sweep / "merged" / "summary.md").read_text().startswith("| method | n | rouge1")
    # the sweep's own report, one row per (part, method), as for any multirun
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 9
    assert sorted({r["shard.index"] for r in rows}) == ["0", "1", "2"]


def test_parts_through_submitit_local_are_merged_when_the_multirun_ends(tiny_overrides, tmp_path) -> None:
    ov = ["+exp=demo", *tiny_overrides, "methods=[{backbone: zero_shot}]", "threads=1"]
    run(ov, tmp_path / "whole")
    _multirun([*ov, "shard.count=2", "shard.index=0,1"], tmp_path / "sweep",
              ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"])
    _assert_merged_equals_whole(tmp_path / "sweep" / "merged", tmp_path / "whole", ["zero_shot"])


def test_a_task_with_model_time_scores_merges_without_the_model(tiny_overrides, tmp_path) -> None:
    """The style demo's metric reads each row's NLL under the unsteered model: the merge
    scores again from the NLL kept in the parts' rows, and equals the whole run."""
    from fints_repro.report import write_merged

    ov = ["+exp=demo_style", *tiny_overrides, "methods=[{backbone: zero_shot}]",
          "dataset.demo_style.users.casual=1", "dataset.demo_style.users.formal=1",
          "dataset.demo_style.users.positive=0", "dataset.demo_style.users.topic=1",
          "dataset.demo_style.n_history=2", "dataset.demo_style.n_test=2"]
    run(ov, tmp_path / "whole")
    for i in range(2):
        run([*ov, "shard.count=2", f"shard.index={i}"], tmp_path / "sweep" / str(i))
    write_merged(tmp_path / "sweep")
    _assert_merged_equals_whole(tmp_path / "sweep" / "merged", tmp_path / "whole", ["zero_shot"])
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["methods"]["zero_shot"]
    merged = json.loads((tmp_path / "sweep" / "merged" / "metrics.json").read_text())["methods"]["zero_shot"]
    keys = [k for k in whole if k.split("/")[-1] in ("style", "casual", "positive", "fluent", "nll")]
    assert "style" in keys and "topic_casual/style" in keys and "nll" in keys
    assert {k: merged[k] for k in keys} == {k: whole[k] for k in keys}
    rows = _rows(tmp_path / "whole" / "zero_shot" / "predictions.jsonl")
    assert len(rows) == 6 and any(r["scores"]["nll"] is not None for r in rows)
