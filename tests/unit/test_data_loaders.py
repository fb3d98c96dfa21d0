"""Real-data loaders (LaMP-4/5, LongLaMP abstract generation) and the download plan."""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from fints_repro.data.lamp import lamp_paths, load_lamp
from fints_repro.data.longlamp import load_longlamp_abstract
from fints_repro.data.schema import HistoryItem
from fints_repro.errors import ConfigError, DataError, MissingDataError

FIXTURES = Path(__file__).parents[1] / "fixtures"
HEADLINE = "Generate a headline for the following article: "


def _load_script() -> Any:
    path = Path(__file__).parents[2] / "scripts" / "download_data.py"
    spec = importlib.util.spec_from_file_location("download_data", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _year(y: int) -> float:
    return datetime(y, 1, 1, tzinfo=timezone.utc).timestamp()


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _lamp4_pair(tmp_path: Path, questions: Any, golds: Any) -> tuple[Path, Path]:
    return _write(tmp_path / "dev_questions.json", questions), _write(tmp_path / "dev_outputs.json", golds)


def _question(qid: str = "1", **over: Any) -> dict[str, Any]:
    q = {"id": qid, "input": HEADLINE + "text", "profile": [{"id": "10", "text": "a", "title": "b"}]}
    q.update(over)
    return q


# ---------------------------------------------------------------- LaMP


def test_lamp_paths() -> None:
    assert lamp_paths(Path("data/lamp4"), "dev") == (
        Path("data/lamp4/dev_questions.json"),
        Path("data/lamp4/dev_outputs.json"),
    )


def test_lamp4_fixture_maps_every_field() -> None:
    samples = load_lamp(*lamp_paths(FIXTURES / "lamp4", "dev"), task="lamp4")
    assert [s.id for s in samples] == ["310", "311", "320", "321", "330"]
    assert sorted({s.user for s in samples}) == ["u_harbor", "u_kitchen", "u_newcomer"]
    first = samples[0]
    assert first.user == "u_harbor"
    assert first.input.startswith(HEADLINE + "The city council voted 7-2")
    assert first.target == "Council Keeps Downtown Ferry Running Through Winter"
    assert first.timestamp is None
    assert len(first.history) == 3
    assert first.history[2] == HistoryItem(
        id="3102",
        input="Ridership on the east-side ferry route doubled in the first month after fares were cut to one "
        "dollar, the transit agency reported.",
        output="Ferry Ridership Doubles After Fare Cut",
        timestamp=None,
    )
    assert samples[-1].history == ()  # empty profile: a user with no history
    assert samples[-1].target == "Library Extends Summer Hours After Student Rush"


def test_lamp5_fixture_user_defaults_to_id_and_abstract_is_input() -> None:
    samples = load_lamp(*lamp_paths(FIXTURES / "lamp5", "dev"), task="lamp5")
    assert [(s.id, s.user) for s in samples] == [("5010", "5010"), ("5020", "5020"), ("5030", "5030")]
    item = samples[1].history[0]
    assert item.id == "50200"
    assert item.input.startswith("We analyse gradient noise")
    assert item.output == "Warm-Up Tames Small-Batch Training"
    assert samples[1].target == "Stable Load Balancing for Sparse Mixtures of Experts"
    assert samples[2].history == ()


def test_lamp_without_outputs_has_no_targets() -> None:
    questions, _ = lamp_paths(FIXTURES / "lamp4", "dev")
    samples = load_lamp(questions, task="lamp4")
    assert len(samples) == 5 and all(s.target is None for s in samples)


def test_lamp_task_must_match_profile_fields() -> None:
    with pytest.raises(DataError, match=r"record 5010.*profile\[0\]\.text"):
        load_lamp(*lamp_paths(FIXTURES / "lamp5", "dev"), task="lamp4")
    with pytest.raises(ConfigError, match="lamp3"):
        load_lamp(FIXTURES / "lamp4" / "dev_questions.json", task="lamp3")


def test_lamp_integer_ids_and_dates(tmp_path: Path) -> None:
    q = [
        {
            "id": 7,
            "user_id": 42,
            "input": "x",
            "date": "2018-03-01",
            "profile": [
                {"id": 70, "text": "t0", "title": "h0", "date": "2017-05-02T10:00:00"},
                {"id": "71", "text": "t1", "title": "h1", "date": 2016},
                {"id": "72", "text": "t2", "title": "h2", "date": "2015"},
                {"id": "73", "text": "t3", "title": "h3"},
            ],
        }
    ]
    (s,) = load_lamp(_write(tmp_path / "q.json", q), task="lamp4")
    assert (s.id, s.user) == ("7", "42")
    assert s.timestamp == datetime(2018, 3, 1, tzinfo=timezone.utc).timestamp()
    assert [h.id for h in s.history] == ["70", "71", "72", "73"]
    assert [h.timestamp for h in s.history] == [
        datetime(2017, 5, 2, 10, tzinfo=timezone.utc).timestamp(),
        _year(2016),
        _year(2015),
        None,
    ]


@pytest.mark.parametrize(
    ("questions", "golds", "bad_file", "expected"),
    [
        ([_question(input=None)], None, "q", ["record 1", "'input'"]),
        ([{"input": "x", "profile": []}], None, "q", ["record 0", "'id'"]),
        ([_question(profile=None)], None, "q", ["record 1", "'profile'"]),
        ([_question(profile="none")], None, "q", ["record 1", "'profile'", "not a list"]),
        ([_question(profile=[{"id": "10", "title": "b"}])], None, "q", ["record 1", "profile[0].text"]),
        ([_question(profile=[{"id": "10", "text": "a", "title": 3}])], None, "q", ["record 1", "profile[0].title"]),
        ([_question(profile=[{"text": "a", "title": "b"}])], None, "q", ["record 1", "profile[0]", "'id'"]),
        ([_question(profile=["a"])], None, "q", ["record 1", "profile[0]"]),
        ([_question(input=["x"])], None, "q", ["record 1", "'input'", "list"]),
        ([_question(date="last tuesday")], None, "q", ["record 1", "'date'"]),
        ([_question(), _question()], None, "q", ["record 1", "duplicate"]),
        ([_question("1")], {"golds": [{"id": "1", "output": "h"}, {"id": "9", "output": "h"}]}, "o", ["record 9"]),
        ([_question("1"), _question("2")], {"golds": [{"id": "1", "output": "h"}]}, "q", ["record 2", "no gold"]),
        ([_question("1")], {"golds": [{"id": "1", "output": 5}]}, "o", ["record 1", "'output'"]),
        ([_question("1")], {"golds": [{"id": "1", "output": "a"}, {"id": "1", "output": "b"}]}, "o", ["record 1"]),
        ([_question("1")], [{"id": "1", "output": "h"}], "o", ["'golds'"]),
        ({"id": "1"}, None, "q", ["JSON list"]),
    ],
)
def test_lamp_bad_records_name_file_record_and_field(
    tmp_path: Path, questions: Any, golds: Any, bad_file: str, expected: list[str]
) -> None:
    qpath, opath = _lamp4_pair(tmp_path, questions, golds if golds is not None else {"golds": []})
    if golds is None:
        opath.unlink()
    with pytest.raises(DataError) as info:
        load_lamp(qpath, opath if golds is not None else None, task="lamp4")
    message = str(info.value)
    assert f"file {qpath if bad_file == 'q' else opath}" in message
    for part in expected:
        assert part in message


def test_lamp_missing_files_and_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="nowhere_questions.json.*download_data.py lamp5"):
        load_lamp(tmp_path / "nowhere_questions.json", task="lamp5")
    qpath = _write(tmp_path / "dev_questions.json", [_question()])
    with pytest.raises(MissingDataError, match="dev_outputs.json"):
        load_lamp(qpath, tmp_path / "dev_outputs.json", task="lamp4")
    broken = tmp_path / "broken_questions.json"
    broken.write_text('[{"id": "1", "input": ', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken_questions\.json.*invalid JSON") as info:
        load_lamp(broken, task="lamp4")
    assert not isinstance(info.value, MissingDataError)
    assert info.value.file == str(broken)


# ---------------------------------------------------------------- LongLaMP


def test_longlamp_jsonl_fixture_maps_every_field() -> None:
    samples = load_longlamp_abstract(FIXTURES / "longlamp_abstract" / "dev.jsonl")
    assert [s.id for s in samples] == ["Ada Rivera-0", "Ada Rivera-1", "Bo Lindqvist-2", "Chen Okafor-3"]
    assert [s.user for s in samples] == ["Ada Rivera", "Ada Rivera", "Bo Lindqvist", "Chen Okafor"]
    first = samples[0]
    assert first.input.startswith('Generate an abstract for the title "Learning Sparse Routers')
    assert first.target is not None and first.target.startswith("Mixture-of-experts models route")
    assert first.timestamp is None
    assert first.history[1] == HistoryItem(
        id="a2",
        input="Load Balancing Losses Revisited",
        output="Auxiliary load-balancing losses are widely used but poorly understood; we characterise when "
        "they help and when they hurt.",
        timestamp=_year(2019),
    )
    assert samples[3].history == ()


def test_longlamp_parquet_and_json_match_jsonl(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    folder = FIXTURES / "longlamp_abstract"
    expected = [s.to_dict() for s in load_longlamp_abstract(folder / "dev.jsonl")]
    assert [s.to_dict() for s in load_longlamp_abstract(folder / "dev.parquet")] == expected
    rows = [json.loads(line) for line in (folder / "dev.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s.to_dict() for s in load_longlamp_abstract(_write(tmp_path / "dev.json", rows))] == expected


def test_longlamp_row_ids_missing_profile_ids_and_no_output(tmp_path: Path) -> None:
    paper = {"title": "T", "abstract": "A", "year": None}
    rows = [
        {"id": 11, "name": "n", "input": "i", "output": "o", "profile": [paper], "year": 2020},
        {"name": "n", "input": "i2", "profile": [paper, {"title": "T2", "abstract": "A2", "date": "2019-06-01"}]},
    ]
    first, second = load_longlamp_abstract(_write(tmp_path / "rows.json", rows))
    assert (first.id, first.timestamp, first.target) == ("11", _year(2020), "o")
    assert (second.id, second.target) == ("n-1", None)
    assert first.history[0].id == second.history[0].id != second.history[1].id  # content-keyed id
    assert first.history[0].timestamp is None
    assert second.history[1].timestamp == datetime(2019, 6, 1, tzinfo=timezone.utc).timestamp()


def test_longlamp_parquet_numpy_profiles(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    rows = [
        {"name": "x", "input": "i", "output": "o", "profile": [{"id": "p", "title": "t", "abstract": "a"}]},
        {"name": "y", "input": "i", "output": "o", "profile": [{"id": "q", "title": "t", "abstract": 3}]},
    ]
    path = tmp_path / "bad.parquet"
    pd.DataFrame(rows[:1]).to_parquet(path, index=False)
    (s,) = load_longlamp_abstract(path)
    assert s.history == (HistoryItem(id="p", input="t", output="a"),)
    pd.DataFrame([rows[0], {**rows[1], "profile": [{"id": "q", "title": None, "abstract": "a"}]}]).to_parquet(
        path, index=False
    )
    with pytest.raises(DataError, match=r"bad\.parquet, record y-1\].*profile\[0\]\.title"):
        load_longlamp_abstract(path)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"input": "i", "output": "o", "profile": []}, ["record line 2", "'name'"]),
        ({"name": "n", "output": "o", "profile": []}, ["record n-1", "'input'"]),
        ({"name": "n", "input": "i", "output": 1, "profile": []}, ["record n-1", "'output'"]),
        ({"name": "n", "input": "i", "output": "o"}, ["record n-1", "'profile'"]),
        ({"name": "n", "input": "i", "output": "o", "profile": {"title": "t"}}, ["record n-1", "not a list"]),
        ({"name": "n", "input": "i", "output": "o", "profile": [{"title": "t"}]}, ["n-1", "profile[0].abstract"]),
        (
            {"name": "n", "input": "i", "output": "o", "profile": [{"title": "t", "abstract": "a", "year": "soon"}]},
            ["n-1", "profile[0].year"],
        ),
        ({"id": "r0", "name": "n", "input": "i", "output": "o", "profile": []}, ["record r0", "duplicate"]),
        ([1, 2], ["record line 2", "not an object"]),
    ],
)
def test_longlamp_bad_rows_name_file_record_and_field(tmp_path: Path, row: Any, expected: list[str]) -> None:
    good = {"id": "r0", "name": "m", "input": "i", "output": "o", "profile": []}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_longlamp_abstract(path)
    assert f"file {path}" in str(info.value)
    for part in expected:
        assert part in str(info.value)


def test_longlamp_missing_unsupported_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=r"test\.jsonl.*download_data\.py longlamp_abstract"):
        load_longlamp_abstract(tmp_path / "test.jsonl")
    csv = tmp_path / "rows.csv"
    csv.write_text("name,input\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.csv.*unsupported"):
        load_longlamp_abstract(csv)
    broken = tmp_path / "rows.jsonl"
    broken.write_text('{"name": "n"}\n{"name": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl, record line 2\] invalid JSON"):
        load_longlamp_abstract(broken)
    not_parquet = tmp_path / "rows.parquet"
    not_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"rows\.parquet"):
        load_longlamp_abstract(not_parquet)


# ---------------------------------------------------------------- download script


def test_download_plan_lamp() -> None:
    script = _load_script()
    assert script.lamp_plan("lamp4", Path("data"), "dev") == [
        (
            "https://ciir.cs.umass.edu/downloads/LaMP/LaMP_4/new/dev/dev_questions.json",
            Path("data/lamp4/dev_questions.json"),
        ),
        (
            "https://ciir.cs.umass.edu/downloads/LaMP/LaMP_4/new/dev/dev_outputs.json",
            Path("data/lamp4/dev_outputs.json"),
        ),
    ]
    assert script.lamp_plan("lamp5", Path("/r"), "test") == [
        (
            "https://ciir.cs.umass.edu/downloads/LaMP/LaMP_5/new/test/test_questions.json",
            Path("/r/lamp5/test_questions.json"),
        )
    ]
    # what the plan writes is what the loader reads
    (_, questions), (_, outputs) = script.lamp_plan("lamp5", Path("/r"), "train")
    assert (questions, outputs) == lamp_paths(Path("/r/lamp5"), "train")
    with pytest.raises(ValueError, match="validation"):
        script.lamp_plan("lamp4", Path("data"), "validation")


def test_download_plan_longlamp() -> None:
    script = _load_script()
    assert script.longlamp_plan(Path("data"), "dev") == (
        "abstract_generation_user",
        "val",
        Path("data/longlamp_abstract/dev.jsonl"),
    )
    assert script.longlamp_plan(Path("d"), "test", temporal=True) == (
        "abstract_generation_temporal",
        "test",
        Path("d/longlamp_abstract_temporal/test.jsonl"),
    )
    with pytest.raises(ValueError):
        script.longlamp_plan(Path("data"), "holdout")


def test_download_failure_is_a_clear_message(tmp_path: Path) -> None:
    script = _load_script()
    dest = tmp_path / "lamp4" / "dev_questions.json"
    with pytest.raises(SystemExit, match="(?s)could not download.*put it at"):
        script.download((tmp_path / "absent.json").as_uri(), dest)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    source = _write(tmp_path / "present.json", [1])
    script.download(source.as_uri(), dest)
    assert json.loads(dest.read_text()) == [1]
    with pytest.raises(SystemExit):
        script.main(["lamp4", "--temporal"])
