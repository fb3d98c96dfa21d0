"""Per-user adapters on disk: the cache the LoRA and reward-model backbones share.

An adapter is saved in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``)
under ``<cache_dir>/<stage>/<key>/<user>/``, trained at most once even by parallel runs
(``train_once``, under the folder's lock) and written atomically (``save_adapter``: a
temporary folder beside it, renamed into place).

An adapter found there is used only when it is complete (``adapter_problem``): its config
parses with the PEFT type and settings it was trained with, and its weights hold every
tensor training makes, each of the shape the model gives it (``AdapterSpec``, computed from
the model: no adapter is built to know). Anything else (a config of ``{}``, a deleted
file, a truncated or tensor-less weights file, tensors of another shape) is named in a
warning with what is wrong, moved aside to ``<user>.corrupt`` and trained again. Temporary
folders of a killed save or training (``.<user>.tmp*``) are removed when the adapter is
next trained or found.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from fints_repro.cache import content_hash, lock_for, make_dir, remove_temporaries, write_error
from fints_repro.config import TrainConfig
from fints_repro.errors import CacheError, ConfigError

log = logging.getLogger(__name__)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What a complete adapter holds: the config's settings (``peft_type``, ``task_type``,
    ``r``, ``lora_alpha``), its ``target_modules`` (as a set), the ``heads`` it saves whole
    (among its ``modules_to_save``), and every tensor's name and shape."""

    settings: Mapping[str, Any]
    targets: frozenset[str]
    heads: frozenset[str]
    tensors: Mapping[str, tuple[int, ...]]


def _in_out(module: torch.nn.Module, name: str) -> tuple[int, int]:
    """(in, out) features of a module LoRA adapts: ``nn.Linear``, or transformers' GPT-2
    ``Conv1D`` (weight stored [in, out])."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    raise ConfigError(f"LoRA target {name!r} is a {type(module).__name__}; the adapters wrap "
                      "linear layers (name them in target_modules)")


def lora_spec(model: torch.nn.Module, targets: Sequence[str], r: int, lora_alpha: float,
              task_type: str, heads: Sequence[str] = ()) -> AdapterSpec:
    """The ``AdapterSpec`` of a LoRA adapter of rank ``r`` on the modules of ``model``
    named by ``targets`` (the last part of the name, as PEFT matches them), with the
    ``heads`` (children of ``model``) saved whole (PEFT's ``modules_to_save``): the names
    PEFT saves them under (``base_model.model.<module>.lora_A.weight`` [r, in],
    ``lora_B.weight`` [out, r], ``base_model.model.<head>.<parameter>``)."""
    tensors: dict[str, tuple[int, ...]] = {}
    wanted = set(targets)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in wanted:
            n_in, n_out = _in_out(module, name)
            tensors[f"base_model.model.{name}.lora_A.weight"] = (r, n_in)
            tensors[f"base_model.model.{name}.lora_B.weight"] = (n_out, r)
    for head in heads:
        for pname, p in getattr(model, head).named_parameters():
            tensors[f"base_model.model.{head}.{pname}"] = tuple(p.shape)
    return AdapterSpec({"peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": lora_alpha},
                       frozenset(targets), frozenset(heads), tensors)


def _config_problem(config: Any, spec: AdapterSpec) -> str | None:
    if not isinstance(config, dict):
        return f"{CONFIG} is not a JSON object"
    for key, want in spec.settings.items():
        if config.get(key) != want:
            return f"{CONFIG} has {key}={config.get(key)!r}, expected {want!r}"
    targets, saved = config.get("target_modules"), config.get("modules_to_save") or []
    if not isinstance(targets, list) or set(targets) != spec.targets:
        return f"{CONFIG} has target_modules={targets!r}, expected {sorted(spec.targets)}"
    if not isinstance(saved, list) or not spec.heads <= set(saved):
        return f"{CONFIG} has modules_to_save={saved!r}, expected {sorted(spec.heads)} among them"
    return None


def adapter_problem(path: Path, spec: AdapterSpec) -> str | None:
    """What keeps the adapter folder ``path`` from being used, or None when it is complete
    (see the module docstring). Reads every tensor, so damage to the data shows too."""
    from safetensors import safe_open

    config, weights = path / CONFIG, path / WEIGHTS
    for f in (config, weights):
        if not f.is_file():
            return f"{f.name} is missing"
    try:
        problem = _config_problem(json.loads(config.read_text(encoding="utf-8")), spec)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{CONFIG} does not read as JSON ({e})"
    if problem:
        return problem
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own types for damage)
        return f"{WEIGHTS} does not read ({e})"
    missing = [k for k in spec.tensors if k not in shapes]
    if missing:
        return (f"{WEIGHTS} lacks {len(missing)} of {len(spec.tensors)} tensors "
                f"(e.g. {missing[0]})")
    extra = [k for k in shapes if k not in spec.tensors]
    if extra:
        return f"{WEIGHTS} holds {len(extra)} tensor(s) training does not make (e.g. {extra[0]})"
    wrong = [k for k, shape in spec.tensors.items() if shapes[k] != shape]
    if wrong:
        k = wrong[0]
        return (f"{WEIGHTS}: {len(wrong)} tensor(s) of the wrong shape (e.g. {k} is "
                f"{list(shapes[k])}, expected {list(spec.tensors[k])})")
    return None


def _move_aside(path: Path, what: str, problem: str) -> None:
    aside = path.with_name(path.name + ".corrupt")
    try:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    except OSError as e:
        raise CacheError(f"{what} in {path} is damaged ({problem}) and cannot be moved aside "
                         f"({e}); delete it (rm -r {path}) and run again: it is trained again",
                         path=str(path)) from e
    log.warning("%s in %s is damaged (%s): moved it to %s; training it again", what, path,
                problem, aside)


def save_adapter(peft_model, out_dir: Path) -> None:
    """Save a PEFT model's adapter in PEFT's format into ``out_dir``, atomically: written to
    a temporary directory beside it and renamed into place, so ``out_dir`` is complete or
    not there at all (a kill mid-save leaves nothing that looks trained). An ``OSError``
    (a full disk) is a ``WriteError`` naming ``out_dir``."""
    make_dir(out_dir.parent, "the adapter cache")
    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
        try:
            peft_model.save_pretrained(tmp)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise write_error(out_dir, "a trained adapter", e) from e


def scratch_dir(out_dir: Path) -> tempfile.TemporaryDirectory:
    """A trainer's scratch folder beside ``out_dir`` (``.<user>.tmp-trainer*``), so that a
    killed training leaves nothing outside the cache, and the next one removes it."""
    make_dir(out_dir.parent, "the adapter cache")
    return tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-trainer")


def train_and_save(peft_model, make_trainer: Callable[[str], Any], out_dir: Path) -> float:
    """Train with the trainer ``make_trainer(scratch)`` builds (its output folder a scratch
    directory, no metrics printed per user), then save the adapter into ``out_dir``.
    Returns the mean training loss."""
    from transformers.trainer_callback import PrinterCallback

    with scratch_dir(out_dir) as scratch:
        trainer = make_trainer(scratch)
        trainer.remove_callback(PrinterCallback)
        result = trainer.train()
    save_adapter(peft_model, out_dir)
    return float(result.training_loss)


def safe_name(user: str) -> str:
    """A user id as a directory name; one that could be taken for a hidden, temporary or
    moved-aside folder (``.x``, ``x.corrupt``) is replaced by a hash."""
    s = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(user))
    return s if s and not s.startswith(".") and not s.endswith(".corrupt") else f"user_{content_hash(user)}"


def train_once(path: Path, what: str, spec: AdapterSpec,
               train: Callable[[Path], float]) -> tuple[float, float] | None:
    """One per-user adapter cached in ``path``, trained at most once even by parallel runs:
    under the path's lock, None when a complete one (``adapter_problem``) is saved there
    (the caller loads it); otherwise a damaged one is moved aside with a warning naming it
    (``what``: whose it is), ``train(path)`` trains and saves it (atomically,
    ``save_adapter``) and (its loss, seconds taken) is returned."""
    make_dir(path.parent, "the adapter cache")
    with lock_for(path):
        remove_temporaries(path)
        if path.exists():
            problem = adapter_problem(path, spec)
            if problem is None:
                return None
            _move_aside(path, what, problem)
        t0 = time.time()
        loss = train(path)
        return loss, time.time() - t0


def load_error(path: Path, what: str, e: Exception) -> CacheError:
    """The error for an adapter that was checked complete and still does not load."""
    return CacheError(f"{what} in {path} does not load ({type(e).__name__}: {e}); delete it "
                      f"(rm -r {path}) and run again: it is trained again", path=str(path))


@dataclasses.dataclass
class TrainTally:
    """What a backbone's per-user training did: adapters trained (their losses and
    seconds) and adapters loaded from the cache."""

    trained: int = 0
    loaded: int = 0
    seconds: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)

    def add(self, done: tuple[float, float] | None) -> bool:
        """Count one ``train_once`` result; True when it trained."""
        if done is None:
            self.loaded += 1
            return False
        self.trained += 1
        self.losses.append(done[0])
        self.seconds.append(done[1])
        return True

    def mean_seconds(self) -> float | None:
        return round(sum(self.seconds) / len(self.seconds), 3) if self.seconds else None

    def mean_loss(self) -> float | None:
        return round(sum(self.losses) / len(self.losses), 4) if self.losses else None


def checkpointing_field(args_class: type) -> str:
    """The name of the activation-checkpointing switch of a ``TrainingArguments`` class:
    ``activation_checkpointing`` from transformers 5.20, ``gradient_checkpointing``
    before (the vLLM extra runs on 5.19)."""
    names = {f.name for f in dataclasses.fields(args_class)}
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if name in names:
            return name
    raise TypeError(f"{args_class.__name__} has neither activation_checkpointing nor "
                    "gradient_checkpointing: a transformers release this project does not know")


def trainer_arguments(train: TrainConfig, *, output_dir: str, seed: int, cpu: bool) -> dict:
    """The settings a per-user training run gives transformers' ``TrainingArguments`` (or
    TRL's ``RewardConfig``, its subclass): ``backbone.*.train`` plus no saving, logging or
    progress bar. ``warmup_ratio`` is passed as ``warmup_steps``, which transformers 5
    reads, below 1, as the fraction of the run's steps (it has no ``warmup_ratio``)."""
    return dict(output_dir=output_dir, per_device_train_batch_size=train.batch_size,
                num_train_epochs=train.epochs, learning_rate=train.lr,
                weight_decay=train.weight_decay, warmup_steps=float(train.warmup_ratio),
                lr_scheduler_type=train.lr_scheduler, max_grad_norm=train.max_grad_norm,
                optim=train.optimizer, seed=seed, data_seed=seed, report_to="none",
                save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=cpu,
                dataloader_num_workers=0)
