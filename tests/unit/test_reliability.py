"""Reliability of the caches and the data loading: concurrent writers (sweep jobs sharing a
cache), damaged cache files, cut JSONL lines, empty data files, unavailable devices, the
LaMP server's file layout and the data loader registry.

Concurrency is tested with forked processes on small fakes (no model conversion runs)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

from fints_repro.cache import (GenerationStore, append_jsonl, read_jsonl_lenient, write_json_atomic,
                               write_jsonl_atomic)
from fints_repro.config import DatasetConfig, DemoDataConfig, ModelConfig
from fints_repro.data.lamp import lamp_candidates, lamp_paths, load_lamp
from fints_repro.data.load import LOADERS, load_samples
from fints_repro.data.longlamp import load_longlamp_abstract
from fints_repro.errors import CacheError, ConfigError, DataError, FintsError, MissingDataError
from fints_repro.models import loading
from fints_repro.models.loading import converted_folder_problem, gguf_to_safetensors, load_model, resolve_device
from fints_repro.steering.store import load_vectors, save_vectors, vector_metadata
from tests.conftest import FIXTURES

FORK = multiprocessing.get_context("fork")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def private_umask():
    """A umask that would make every new file 0600: cache files must still come out 0644."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def _run_in_processes(target: Callable[..., None], args_list: list[tuple], timeout: float = 60) -> list[int]:
    """Run ``target(barrier, *args)`` in one forked process per args, started together;
    returns their exit codes (non-zero: the process raised)."""
    barrier = FORK.Barrier(len(args_list))
    procs = [FORK.Process(target=target, args=(barrier, *args)) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


# ------------------------------------------------------------- model conversion (task 1)


class _FakeTokenizer:
    def save_pretrained(self, d) -> None:
        Path(d, "tokenizer.json").write_text('{"model": {}}')
        Path(d, "tokenizer_config.json").write_text("{}")


class _FakeModel:
    """What gguf_to_safetensors calls on a model, writing small stand-in files."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(quantization_config={"q": 4})
        self.generation_config = None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_pretrained(self, d) -> None:
        Path(d, "config.json").write_text('{"model_type": "fake"}')
        Path(d, "model.safetensors").write_bytes(b"w" * 1000)


class _FakeAuto:
    """Stands in for AutoModelForCausalLM / AutoTokenizer; every GGUF load is counted as a
    line in ``calls`` (a file, so forked processes count too) and takes ``delay`` seconds."""

    def __init__(self, make: Callable[[], Any], calls: Path, delay: float = 0.0):
        self.make, self.calls, self.delay = make, calls, delay

    def from_pretrained(self, src, gguf_file=None, **kw):
        with open(self.calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(self.delay)
        return self.make()

    def from_config(self, config, **kw):
        return _FakeModel()


def _fake_conversion(monkeypatch, tmp_path: Path, delay: float = 0.0) -> tuple[Path, Path, Path]:
    """(gguf path, output folder, file counting the conversions) with the fakes in place."""
    gguf = tmp_path / "wheel" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    calls = tmp_path / "calls.txt"
    monkeypatch.setattr(loading, "AutoModelForCausalLM", _FakeAuto(_FakeModel, calls, delay))
    monkeypatch.setattr(loading, "AutoTokenizer", _FakeAuto(_FakeTokenizer, tmp_path / "tok_calls.txt"))
    return gguf, tmp_path / "cache" / "models" / "fake-0123", calls


def _conversions(calls: Path) -> int:
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def _convert_in_child(barrier, gguf: Path, out: Path) -> None:
    barrier.wait()
    assert gguf_to_safetensors(gguf, out) == out
    assert converted_folder_problem(out) is None


def test_two_processes_converting_the_same_model_at_once(tmp_path: Path, monkeypatch) -> None:
    gguf, out, calls = _fake_conversion(monkeypatch, tmp_path, delay=1.0)
    codes = _run_in_processes(_convert_in_child, [(gguf, out), (gguf, out)])
    assert codes == [0, 0]
    assert _conversions(calls) == 1  # the second waited for the first, then used its folder
    assert converted_folder_problem(out) is None
    # Nothing beside the folder: no temporary or broken folder, the lock lives elsewhere.
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert sorted(p.name for p in out.iterdir()) == [
        "SOURCE.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert _mode(out) == 0o755 and all(_mode(p) == 0o644 for p in out.iterdir())


@pytest.mark.parametrize("damage", ["delete_weights", "truncate_weights", "delete_tokenizer", "delete_manifest"])
def test_partly_deleted_converted_folder_is_converted_again(
    tmp_path: Path, monkeypatch, caplog, damage: str
) -> None:
    gguf, out, calls = _fake_conversion(monkeypatch, tmp_path)
    gguf_to_safetensors(gguf, out)
    manifest = json.loads((out / "SOURCE.json").read_text())
    assert manifest["files"]["model.safetensors"] == 1000 and manifest["gguf"] == str(gguf)
    if damage == "delete_weights":
        (out / "model.safetensors").unlink()
    elif damage == "truncate_weights":
        (out / "model.safetensors").write_bytes(b"w" * 10)
    elif damage == "delete_tokenizer":
        (out / "tokenizer.json").unlink()
    else:
        (out / "SOURCE.json").unlink()
    assert converted_folder_problem(out) is not None
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        assert gguf_to_safetensors(gguf, out) == out
    assert _conversions(calls) == 2
    assert converted_folder_problem(out) is None
    assert (out / "model.safetensors").stat().st_size == 1000
    assert str(out) in caplog.text and "incomplete" in caplog.text
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the broken one is gone


def test_a_killed_conversions_half_written_folder_is_removed(tmp_path: Path, monkeypatch) -> None:
    gguf, out, calls = _fake_conversion(monkeypatch, tmp_path)
    left = out.parent / f".{out.name}.tmpq8x1"  # what a conversion killed mid-save leaves
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"w" * 500)
    other = out.parent / ".other-model.tmpz"  # another model's: not this one's to remove
    other.mkdir()
    gguf_to_safetensors(gguf, out)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, other.name])


def test_folder_converted_before_the_manifest_listed_files_is_still_used(tmp_path: Path, monkeypatch) -> None:
    """The converted caches already on disk have a SOURCE.json without "files": complete
    ones are used as they are (no conversion), incomplete ones converted again."""
    gguf, out, calls = _fake_conversion(monkeypatch, tmp_path)
    out.mkdir(parents=True)
    _FakeModel().save_pretrained(out)
    _FakeTokenizer().save_pretrained(out)
    (out / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "sha256": "0"}))
    assert gguf_to_safetensors(gguf, out) == out
    assert _conversions(calls) == 0
    (out / "model.safetensors").unlink()
    assert converted_folder_problem(out) == "missing model.safetensors"
    gguf_to_safetensors(gguf, out)
    assert _conversions(calls) == 1 and converted_folder_problem(out) is None


def test_sharded_weights_need_every_shard(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    _FakeTokenizer().save_pretrained(out)
    (out / "config.json").write_text("{}")
    (out / "SOURCE.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert converted_folder_problem(out) == "missing model-00002-of-00002.safetensors"
    (out / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert converted_folder_problem(out) is None


def test_incomplete_folder_that_cannot_be_moved_is_a_cache_error(tmp_path: Path, monkeypatch) -> None:
    gguf, out, calls = _fake_conversion(monkeypatch, tmp_path)
    gguf_to_safetensors(gguf, out)
    (out / "model.safetensors").unlink()
    real_replace = os.replace

    def refuse(src, dst):
        if Path(src) == out:
            raise PermissionError(13, "Permission denied", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(CacheError) as info:
        gguf_to_safetensors(gguf, out)
    message = str(info.value)
    assert str(out) in message and f"rm -r {out}" in message and "missing model.safetensors" in message
    assert isinstance(info.value, FintsError) and info.value.path == str(out)
    assert _conversions(calls) == 1


# ------------------------------------------------------------- concurrent writers (task 1)


def _save_vectors_in_child(barrier, path: Path, value: torch.Tensor, n: int) -> None:
    # Tiny tensors (a forked child must not start torch's thread pool); large metadata
    # makes each write take a while, as a real vector file's would.
    vectors = {"attn": value, "mlp": value.clone()}
    meta = {"writer": float(value[0, 0]), "pad": "x" * 200_000}
    barrier.wait()
    for _ in range(n):
        save_vectors(path, vectors, meta)


def test_two_processes_saving_the_same_vectors(tmp_path: Path) -> None:
    path = tmp_path / "vectors" / "v.safetensors"
    values = [torch.full((3, 8), 1.0), torch.full((3, 8), 2.0)]
    codes = _run_in_processes(_save_vectors_in_child, [(path, v, 200) for v in values])
    assert codes == [0, 0]
    loaded = load_vectors(path)
    assert loaded is not None
    assert any(torch.equal(loaded["attn"], v) and torch.equal(loaded["mlp"], v) for v in values)
    assert vector_metadata(path)["writer"] in (1.0, 2.0)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_save_while_another_is_between_write_and_rename(tmp_path: Path, monkeypatch) -> None:
    """The interleaving two sweep jobs can hit, made deterministic: a second save runs
    after the first has written its temporary file and before it renames it."""
    import fints_repro.steering.store as store

    path = tmp_path / "v.safetensors"
    real_save = store.save_file
    nested: list[str] = []

    def save_then_another_writer(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if not nested:
            nested.append(filename)
            save_vectors(path, {"attn": torch.full((2, 4), 2.0)}, {"writer": 2})

    monkeypatch.setattr(store, "save_file", save_then_another_writer)
    save_vectors(path, {"attn": torch.full((2, 4), 1.0)}, {"writer": 1})
    assert nested and vector_metadata(path)["writer"] == 1  # the last rename wins
    assert torch.equal(load_vectors(path)["attn"], torch.full((2, 4), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def _write_jsonl_in_child(barrier, path: Path, writer: int, n: int) -> None:
    barrier.wait()
    for i in range(n):
        write_jsonl_atomic(path, [{"writer": writer, "i": i, "pad": "x" * 2000}] * 20)


def test_two_processes_replacing_the_same_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    codes = _run_in_processes(_write_jsonl_in_child, [(path, 1, 100), (path, 2, 100)])
    assert codes == [0, 0]
    rows = read_jsonl_lenient(path)
    assert len(rows) == 20 and len({(r["writer"], r["i"]) for r in rows}) == 1  # one writer's whole file
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def _append_in_child(barrier, path: Path, writer: int, n: int) -> None:
    barrier.wait()
    store = GenerationStore(path)
    for i in range(n):
        store.add([(f"{writer}-{i}-{j}", "y" * 5000) for j in range(20)])


def test_two_processes_appending_to_one_store(tmp_path: Path) -> None:
    path = tmp_path / "generations" / "s.jsonl"
    path.parent.mkdir()
    codes = _run_in_processes(_append_in_child, [(path, 1, 50), (path, 2, 50)])
    assert codes == [0, 0]
    assert len(GenerationStore(path).items) == 2 * 50 * 20  # no line lost or interleaved


def test_cache_files_are_readable_by_others_whatever_the_umask(tmp_path: Path, private_umask) -> None:
    vectors = tmp_path / "vectors" / "v.safetensors"
    save_vectors(vectors, {"attn": torch.zeros(2, 4)}, {})
    jsonl = tmp_path / "run" / "predictions.jsonl"
    jsonl.parent.mkdir()
    write_jsonl_atomic(jsonl, [{"id": "1"}])
    store = GenerationStore(tmp_path / "generations" / "g.jsonl")
    store.add([("k", "g")])
    appended = tmp_path / "run" / "appended.jsonl"
    append_jsonl(appended, [{"id": "1"}])
    for path in (vectors, jsonl, store.path, appended):
        assert _mode(path) == 0o644, path


# ------------------------------------------------------------- damaged cache files (task 2)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_matrix"])
def test_damaged_vector_file_is_moved_aside_and_computed_again(tmp_path: Path, caplog, damage: str) -> None:
    path = tmp_path / "vectors" / "v.safetensors"
    good = {"attn": torch.arange(24.0).reshape(3, 8)}
    save_vectors(path, good, {"layer": 1})
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\xff\xfe not safetensors at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        save_vectors(path, {"attn": torch.zeros(8)}, {})
    with caplog.at_level(logging.WARNING, logger="fints_repro.steering.store"):
        assert load_vectors(path) is None
    assert str(path) in caplog.text
    assert not path.exists() and path.with_name(path.name + ".corrupt").exists()
    save_vectors(path, good, {"layer": 1})  # what extract_vectors does next
    assert torch.equal(load_vectors(path)["attn"], good["attn"])


def test_damaged_vector_file_that_cannot_be_moved_is_a_cache_error(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "v.safetensors"
    path.write_bytes(b"garbage")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(CacheError, match=rf"{path}.*delete it \(rm {path}\)"):
        load_vectors(path)
    monkeypatch.undo()
    with pytest.raises(CacheError, match=rf"{path}.*delete it"):
        vector_metadata(path)


def test_missing_vector_file_is_none(tmp_path: Path) -> None:
    assert load_vectors(tmp_path / "none.safetensors") is None


def test_damaged_jsonl_lines_are_dropped_with_one_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "g.jsonl"
    lines = [
        b'{"key": "a", "generation": "x"}',
        b'{"key": "\xff\xfe", "generation": "not utf-8"}',  # line 2
        b"not json at all",  # 3
        b'["a", "list"]',  # 4
        b'{"key": "c"}',  # 5: no generation
        b'{"key": 7, "generation": "y"}',  # 6: key not a string
        b"",  # 7: blank, skipped silently
        b'{"key": "b", "generation": "\xc3\xa9t\xc3\xa9"}',  # 8
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="fints_repro.cache"):
        store = GenerationStore(path)
    assert store.items == {"a": "x", "b": "été"}
    [record] = [r for r in caplog.records if r.name == "fints_repro.cache"]
    assert str(path) in record.getMessage() and "line 2, 3, 4, 5, 6)" in record.getMessage()
    # A reader without a required shape keeps every object.
    assert [r["key"] for r in read_jsonl_lenient(path)] == ["a", "c", 7, "b"]


def test_unreadable_jsonl_is_a_cache_error(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.mkdir()  # not a file: nothing to drop line by line
    with pytest.raises(CacheError, match=rf"cannot read {path}.*rm -r {path}"):
        GenerationStore(path)


def test_clean_jsonl_reads_without_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "g.jsonl"
    write_jsonl_atomic(path, [{"key": "a", "generation": "x\u2028y"}])
    with caplog.at_level(logging.WARNING):
        assert GenerationStore(path).items == {"a": "x\u2028y"}
    assert not caplog.records
    assert read_jsonl_lenient(tmp_path / "missing.jsonl") == []


# ------------------------------------------------------------- cut last line (task 3)


def test_append_after_a_cut_last_line_keeps_the_new_rows(tmp_path: Path, caplog) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text('{"key": "a", "generation": "x"}\n{"key": "cut')  # a killed run
    store = GenerationStore(path)
    assert store.items == {"a": "x"}
    store.add([("b", "y"), ("c", "z")])
    assert path.read_text().splitlines()[1:] == [
        '{"key": "cut', '{"key": "b", "generation": "y"}', '{"key": "c", "generation": "z"}']
    with caplog.at_level(logging.WARNING, logger="fints_repro.cache"):
        assert GenerationStore(path).items == {"a": "x", "b": "y", "c": "z"}
    assert "line 2)" in caplog.text


def test_append_to_a_whole_file_adds_no_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    append_jsonl(path, [{"a": 1}])
    append_jsonl(path, [{"a": 2}, {"a": 3}])
    append_jsonl(path, [])
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 3}\n'


# ------------------------------------------------------------- empty data files (task 4)


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_lamp_files_name_the_file(tmp_path: Path, content: str) -> None:
    questions = tmp_path / "dev_questions.json"
    questions.write_text(content)
    with pytest.raises(DataError, match="empty|whitespace") as info:
        load_lamp(questions, task="lamp4")
    assert info.value.file == str(questions) and f"file {questions}" in str(info.value)
    assert "download_data.py lamp4" in str(info.value)
    shutil.copy(FIXTURES / "lamp4" / "dev_questions.json", questions)
    outputs = tmp_path / "dev_outputs.json"
    outputs.write_text(content)
    with pytest.raises(DataError, match="empty|whitespace") as info:
        load_lamp(questions, outputs, task="lamp4")
    assert info.value.file == str(outputs)


@pytest.mark.parametrize("name,content", [("dev.jsonl", ""), ("dev.jsonl", "\n \n\n"), ("dev.json", " "),
                                          ("dev.parquet", "")])
def test_empty_longlamp_files_name_the_file(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="empty|whitespace") as info:
        load_longlamp_abstract(path)
    assert info.value.file == str(path) and "download_data.py longlamp_abstract" in str(info.value)


def test_download_refuses_an_empty_answer(tmp_path: Path, private_umask) -> None:
    from tests.unit.test_data_loaders import _load_script

    script = _load_script()
    empty, full = tmp_path / "empty.json", tmp_path / "full.json"
    empty.write_text("")
    full.write_text("[1]")
    dest = tmp_path / "data" / "lamp4" / "dev_questions.json"
    with pytest.raises(SystemExit, match="empty"):
        script.download(empty.as_uri(), dest)
    assert list(dest.parent.iterdir()) == []
    script.download(full.as_uri(), dest)
    assert dest.read_text() == "[1]" and _mode(dest) == 0o644
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


# ------------------------------------------------------------- unavailable devices (task 5)


def _no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1", "mps"])
def test_unavailable_device_is_a_config_error(monkeypatch, name: str) -> None:
    _no_gpu(monkeypatch)
    with pytest.raises(ConfigError) as info:
        resolve_device(name)
    message = str(info.value)
    assert f"model.device={name!r}" in message and "available here: cpu" in message


def test_cuda_index_beyond_the_visible_devices(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"'cuda:2'.*2 visible CUDA device.*cpu, cuda:0, cuda:1"):
        resolve_device("cuda:2")


def test_bad_device_name_and_load_model(monkeypatch) -> None:
    _no_gpu(monkeypatch)
    with pytest.raises(ConfigError, match=r"model.device='gpu0' is not a device name"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="model.device='cuda'"):
        load_model(ModelConfig(name="t", source="tiny_random", arch="llama", device="cuda", dtype="float32"))


# ------------------------------------------------------------- LaMP file layouts (task 6)


def _lamp_cfg(root: Path, task: str = "lamp4", split: str = "dev") -> DatasetConfig:
    # the path the dataset configs give: ${data.root}/lamp4
    return DatasetConfig(name="lamp_news", loader="lamp", benchmark=task, path=str(root / task), split=split)


def _lay_out(root: Path, layout: str, task: str = "lamp4", split: str = "dev") -> Path:
    """The fixture's dev files as ``split`` in one layout; returns the questions file."""
    folder = {
        "download": root / task,
        "server": root / f"LaMP_{task[-1]}" / split,
        "server_new": root / f"LaMP_{task[-1]}" / "new" / split,
    }[layout]
    folder.mkdir(parents=True)
    for kind in ("questions", "outputs"):
        shutil.copy(FIXTURES / task / f"dev_{kind}.json", folder / f"{split}_{kind}.json")
    return folder / f"{split}_questions.json"


@pytest.mark.parametrize("layout", ["download", "server", "server_new"])
def test_lamp_data_root_in_either_layout(tmp_path: Path, layout: str) -> None:
    questions = _lay_out(tmp_path, layout)
    assert lamp_paths(tmp_path / "lamp4", "dev", "lamp4") == (questions, questions.with_name("dev_outputs.json"))
    samples = load_samples(_lamp_cfg(tmp_path), seed=0)
    assert [s.id for s in samples] == ["310", "311", "320", "321", "330"]
    assert samples[0].target == "Council Keeps Downtown Ferry Running Through Winter"


def test_lamp5_train_split_in_the_server_layout(tmp_path: Path) -> None:
    _lay_out(tmp_path, "server", task="lamp5", split="train")
    samples = load_samples(_lamp_cfg(tmp_path, task="lamp5", split="train"), seed=0)
    assert [s.id for s in samples] == ["5010", "5020", "5030"] and all(s.target for s in samples)


def test_download_layout_wins_over_the_server_layout(tmp_path: Path) -> None:
    download = _lay_out(tmp_path, "download")
    _lay_out(tmp_path, "server")
    assert lamp_paths(tmp_path / "lamp4", "dev", "lamp4")[0] == download


def test_missing_lamp_data_lists_every_place_looked(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError) as info:
        load_samples(_lamp_cfg(tmp_path), seed=0)
    message = str(info.value)
    for questions, outputs in lamp_candidates(tmp_path / "lamp4", "dev", "lamp4"):
        assert str(questions) in message
    assert str(tmp_path / "lamp4" / "dev_questions.json") in message
    assert str(tmp_path / "LaMP_4" / "dev" / "dev_questions.json") in message
    assert "dev_outputs.json" in message and "download_data.py lamp4" in message


# ------------------------------------------------------------- loader registry (task 7)


def test_loaders_are_registered_and_unknown_ones_listed(tmp_path: Path, monkeypatch) -> None:
    assert LOADERS.names() == ["demo", "demo_pwab", "demo_style", "lamp", "longlamp", "pwab"]
    with pytest.raises(ValueError, match="twice"):
        LOADERS.register("lamp")(lambda cfg, seed: [])
    cfg = DatasetConfig(name="x", loader="csv", benchmark="lamp4", path=str(tmp_path))
    with pytest.raises(ConfigError, match=r"unknown dataset.loader='csv' \(demo \| demo_pwab \| demo_style \| lamp \| longlamp \| pwab\)"):
        load_samples(cfg, seed=0)
    # A new source is one registered function.
    monkeypatch.setitem(LOADERS._items, "fixture", lambda cfg, seed: load_lamp(
        *lamp_paths(FIXTURES / "lamp4", "dev"), task="lamp4"))
    assert len(load_samples(DatasetConfig(name="x", loader="fixture", benchmark="lamp4", path="-"), seed=0)) == 5


def test_demo_data_is_written_readable_and_whole(tmp_path: Path, private_umask) -> None:
    cfg = DatasetConfig(name="demo_news", loader="demo", benchmark="demo_news", path=str(tmp_path / "demo"),
                        demo=DemoDataConfig(n_users=2, n_history=2, n_test=1))
    samples = load_samples(cfg, seed=0)
    [folder] = list((tmp_path / "demo").iterdir())  # no temporary folder left
    assert _mode(folder) == 0o755
    assert sorted(p.name for p in folder.iterdir()) == ["dev_outputs.json", "dev_questions.json"]
    assert all(_mode(p) == 0o644 for p in folder.iterdir())
    assert load_samples(cfg, seed=0) == samples


def _demo_in_child(barrier, cfg: DatasetConfig, out: Path) -> None:
    barrier.wait()
    out.write_text(json.dumps([s.id for s in load_samples(cfg, seed=0)]))


def test_parallel_jobs_generating_the_same_demo_data(tmp_path: Path) -> None:
    cfg = DatasetConfig(name="demo_news", loader="demo", benchmark="demo_news", path=str(tmp_path / "demo"),
                        demo=DemoDataConfig(n_users=3, n_history=3, n_test=2))
    outs = [tmp_path / f"ids{i}.json" for i in range(3)]
    assert _run_in_processes(_demo_in_child, [(cfg, o) for o in outs]) == [0, 0, 0]
    assert len({o.read_text() for o in outs}) == 1
    assert len(list((tmp_path / "demo").iterdir())) == 1


# ------------------------------------------------------------------ writes and paths (issue 22)


ZERO_SHOT = ["+exp=demo_compare", "methods=[{backbone: zero_shot}]"]


def _enospc(path) -> OSError:
    return OSError(28, "No space left on device", str(path))


@pytest.mark.parametrize("errno_, hint", [(28, "free space on that disk"),
                                          (13, "make the folder writable")])
def test_write_errors_name_the_file_and_what_it_holds(tmp_path: Path, monkeypatch, errno_, hint) -> None:
    from fints_repro.errors import WriteError

    target = tmp_path / "generations" / "g.jsonl"
    target.parent.mkdir()

    def fail(fd, data):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(os, "write", fail)
    with pytest.raises(WriteError, match=rf"could not write {target} \(cached generations\): "
                                         rf"{os.strerror(errno_)}; {hint}"):
        GenerationStore(target).add([("k", "g")])
    monkeypatch.undo()

    def refuse(*a, **kw):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(WriteError, match=rf"could not write {tmp_path / 'm.json'} \(the run's "
                                         rf"metrics\): {os.strerror(errno_)}; {hint}"):
        write_json_atomic(tmp_path / "m.json", {"a": 1}, "the run's metrics")


def test_a_demo_dataset_path_that_is_a_file_is_named(tmp_path: Path) -> None:
    from fints_repro.errors import WriteError

    blocker = tmp_path / "demo"
    blocker.write_text("")
    cfg = DatasetConfig(name="demo_news", loader="demo", benchmark="demo_news", path=str(blocker),
                        demo=DemoDataConfig(n_users=2, n_history=2, n_test=1))
    with pytest.raises(WriteError, match=rf"^dataset.path \(where the demo data is generated\) "
                                         rf"{blocker} is not a folder: {blocker} is a file"):
        load_samples(cfg, seed=0)


@pytest.mark.parametrize("kind", ["lamp_questions", "lamp_outputs", "longlamp_jsonl"])
def test_an_unreadable_data_file_is_named(tmp_path: Path, monkeypatch, kind: str) -> None:
    """As root (CI) chmod cannot make a file unreadable, so reading it raises as it would."""
    if kind.startswith("lamp"):
        for name in ("dev_questions.json", "dev_outputs.json"):
            shutil.copy(FIXTURES / "lamp4" / name, tmp_path / name)
        cfg = _lamp_cfg(tmp_path.parent, task="lamp4")
        cfg.path = str(tmp_path)
        bad = tmp_path / ("dev_questions.json" if kind == "lamp_questions" else "dev_outputs.json")
    else:
        bad = tmp_path / "dev.jsonl"
        bad.write_text('{"name": "a"}\n')
        cfg = DatasetConfig(name="longlamp_abstract", loader="longlamp", benchmark="longlamp_abstract",
                            path=str(tmp_path))
    real = Path.read_text

    def denied(self, *a, **kw):
        if self == bad:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(DataError) as info:
        load_samples(cfg, seed=0)
    assert info.value.file == str(bad)
    assert "cannot read the data file (Permission denied)" in str(info.value)
    assert "check its permissions" in str(info.value)


def test_escaped_lone_surrogates_in_a_data_file_read_as_the_replacement_character(tmp_path: Path) -> None:
    questions = json.loads((FIXTURES / "lamp4" / "dev_questions.json").read_text())
    questions[0]["input"] += " caf\\ud800"
    text = json.dumps(questions).replace("\\\\ud800", "\\ud800")  # the JSON escape itself
    (tmp_path / "dev_questions.json").write_text(text)
    shutil.copy(FIXTURES / "lamp4" / "dev_outputs.json", tmp_path)
    samples = load_lamp(tmp_path / "dev_questions.json", tmp_path / "dev_outputs.json", task="lamp4")
    assert samples[0].input.endswith(" caf\ufffd")
