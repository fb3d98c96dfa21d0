"""``backbone=lora``: one LoRA adapter per user (OPPU), steering pluggable on top.

- **Training** (``fit``): each user's items (``backbone.lora.train_on``: the history items,
  or the user's training-split samples with their gold outputs, which is what function
  calling learns from) become (question -> output) texts, in
  the chat template the run generates with (``backbone.lora.train_template=chat``) or the
  dataset's raw OPPU template (``raw``, the authors'); the loss is on the output tokens
  and the EOS after them. One adapter at a time is injected into the run's model (PEFT's
  ``get_peft_model``), trained with transformers' ``Trainer`` (settings: ``backbone.lora``
  and its ``train`` node, the authors' OPPU values by default), saved in PEFT's own format
  and unloaded again, so that no user's training ever sees another's adapter.
- **Cache**: ``<cache_dir>/adapters/<key>/<user>/`` (``adapter_config.json`` +
  ``adapter_model.safetensors``), the key a content hash of the model fingerprint, the
  adapter and training settings, the seed and that user's training texts. Each is written
  to a temporary directory and renamed into place when complete: a run killed during
  training resumes at the user it was on, and an adapter that is not complete (its config,
  every tensor and its shape checked: ``backbones/adapters.py``) is moved aside with a
  warning and trained again, never used half.
- **Generation**: every user's adapter is loaded under its own name into one PEFT wrapper;
  a batch holds rows of different users, each run with its own adapter (PEFT's mixed
  batches, ``adapter_names``; a user without history runs the base model, ``__base__``).
  Adapter layers are switched off outside this backbone's contexts, and ``close`` unloads
  them, so the other methods of a run see the base model untouched. An engine that loads
  adapters itself (``engine=vllm``) gets each row's adapter folder (``row_adapter``).
- **Steering on top**: vectors are extracted through ``user_context`` (each pair's user's
  adapter, ``steering.extract_with_adapter``), and ``steer()`` works through the wrapper.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from fints_repro.backbones.adapters import (TrainTally, load_error, lora_spec, safe_name,
                                            train_and_save, train_once, trainer_arguments)
from fints_repro.backbones.base import BACKBONES, Backbone, FitContext, Prompt, build_backbone
from fints_repro.cache import content_hash
from fints_repro.checks import at_least, check_train, fail, in_range, one_of, positive
from fints_repro.config import BackboneConfig, TrainConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import ConfigError
from fints_repro.models.chat import clip_token_sequence, render_chat
from fints_repro.models.engines import RowAdapter
from fints_repro.preferences.pairs import user_history
from fints_repro.registry import settings_of
from fints_repro.tasks.prompts import item_question

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


NAME = "lora"
LORA_TEMPLATES = ("chat", "raw")
LORA_TRAIN_ON = ("auto", "history", "train_samples")


@dataclass
class LoraSettings:
    """``backbone.lora.*``: one LoRA adapter per user (OPPU), trained on that user's items
    (``train_on``; question -> output, loss on the output tokens, EOS appended)."""

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.05
    # Modules the adapters wrap; null = per architecture (q_proj + v_proj; GPT-2: c_attn).
    target_modules: Optional[list[str]] = None
    # `chat`: training text in the chat template the run generates with (ours);
    # `raw`: dataset.lora_raw_template, no template (the authors' OPPU code).
    train_template: str = "chat"
    # What each user's adapter learns from: `history` = the user's history items (OPPU on
    # LaMP / LongLaMP); `train_samples` = the user's training-split samples and their gold
    # outputs (function calling: the training tasks' gold calls); `auto` = the task's
    # choice (text generation: history; function calling: train_samples).
    train_on: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self, key: str, backbone: BackboneConfig) -> None:
        at_least(f"{key}.r", self.r, 1)
        positive(f"{key}.lora_alpha", self.lora_alpha)
        in_range(f"{key}.lora_dropout", self.lora_dropout, 0, 1)
        one_of(f"{key}.train_template", self.train_template, LORA_TEMPLATES)
        one_of(f"{key}.train_on", self.train_on, LORA_TRAIN_ON)
        if self.target_modules is not None and not self.target_modules:
            fail(f"{key}.target_modules", [], "is empty (null = the architecture's default)")
        check_train(self.train, f"{key}.train")


def target_modules(model: Any, configured: Sequence[str] | None) -> list[str]:
    """The modules the adapters wrap: ``backbone.lora.target_modules``, or PEFT's default
    for the architecture (q_proj + v_proj for Llama-like models, c_attn for GPT-2)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if configured:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in configured if t not in names]
        if missing:
            raise ConfigError(f"backbone.lora.target_modules={list(configured)}: the model has no "
                              f"module named {missing}")
        return list(configured)
    arch = getattr(model.config, "model_type", None)
    if arch not in DEFAULTS:
        raise ConfigError(f"backbone.lora.target_modules: no default for the architecture "
                          f"{arch!r}; name the modules to adapt (e.g. [q_proj, v_proj])")
    return list(DEFAULTS[arch])


def training_example(tok, item: HistoryItem, question: str, template: str, raw_template: str,
                     system_prompt: str | None, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one training text: the prompt part's labels are -100, the
    output's and the EOS's are their ids. ``chat``: the chat-rendered question (as at test
    time), then output + EOS; ``raw``: the raw template up to ``{output}`` (with the
    tokenizer's special tokens), then output + EOS."""
    if template == "chat":
        prompt_ids = tok(render_chat(tok, question, system_prompt), add_special_tokens=False)["input_ids"]
    else:
        head = raw_template.split("{output}", 1)[0]
        prompt_ids = tok(head.format(input=item.input))["input_ids"]
    answer = tok(item.output + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
    fitted = clip_token_sequence(prompt_ids + answer, len(prompt_ids), max_length)
    if fitted is None:  # the output alone fills the cut-off: keep its start
        ids, start = (prompt_ids[:1] + answer)[:max_length], 1
    else:
        ids, start = fitted
    return {"input_ids": ids, "labels": [-100] * start + ids[start:]}


@contextlib.contextmanager
def _right_padding(tok) -> Iterator[None]:
    """Training batches are right-padded (positions from 0, as unpadded); generation's
    left padding is restored after."""
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        yield
    finally:
        tok.padding_side = side


def train_adapter(model, tok, examples: list[dict], lora_cfg, targets: list[str],
                  train: TrainConfig, seed: int, out_dir: Path) -> float:
    """Inject one LoRA adapter into ``model``, train it on ``examples`` with transformers'
    Trainer, save it in PEFT's format into ``out_dir`` and unload it again (the model is
    left as found: weights, requires_grad and eval mode). Returns the mean training loss."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = LoraConfig(task_type="CAUSAL_LM", r=lora_cfg.r, lora_alpha=lora_cfg.lora_alpha,
                     lora_dropout=lora_cfg.lora_dropout, target_modules=targets, bias="none",
                     fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapter's initialisation
        peft_model = get_peft_model(model, cfg)
    def trainer(scratch: str):
        args = TrainingArguments(**trainer_arguments(train, output_dir=scratch, seed=seed,
                                                     cpu=model.device.type == "cpu"),
                                 remove_unused_columns=False)
        return Trainer(model=peft_model, args=args, train_dataset=Dataset.from_list(examples),
                       data_collator=DataCollatorForSeq2Seq(tok, padding=True,
                                                            label_pad_token_id=-100))

    try:
        with _right_padding(tok):
            return train_and_save(peft_model, trainer, out_dir)
    finally:
        peft_model.base_model.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))
        model.eval()


def _adapter_name(i: int) -> str:
    return f"user{i}"


@BACKBONES.register(NAME, settings=LoraSettings)
class LoRA(Backbone):
    name = NAME
    needs = frozenset({"per_row_adapters"})  # each row's user's adapter

    def __init__(self, cfg: BackboneConfig, task, retriever):
        super().__init__(cfg, task, retriever)
        self.lcfg: LoraSettings = settings_of(cfg, NAME, "backbone")
        self.lcfg.check(f"backbone.{NAME}", cfg)  # as at start-up, for a backbone built directly
        self.train_on = task.lora_train_on if self.lcfg.train_on == "auto" else self.lcfg.train_on
        k = cfg.k or 0
        base = dataclasses.replace(cfg, name="rag" if k > 0 else "zero_shot", k=k)
        self.prompting = build_backbone(base, task, retriever)
        self.peft = None
        self.adapter_dir: Optional[Path] = None  # <cache_dir>/adapters, once fitted
        self.keys: dict[str, str] = {}  # user -> adapter key ("" = no adapter)
        self.names: dict[str, str] = {}  # user -> adapter name in the wrapper
        self.samples: list[Sample] = []
        self.stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ fit

    def training_examples(self, lm, items: Sequence[HistoryItem]) -> list[dict]:
        """The user's training texts: each item's task question (as pairs and extraction
        phrase it) -> its output."""
        d = self.task.dataset
        t = self.lcfg.train
        return [training_example(lm.tokenizer, h, item_question(h, d), self.lcfg.train_template,
                                 d.lora_raw_template, lm.system_prompt, t.max_length)
                for h in items if h.output.strip()]

    def fit(self, lm, samples, ctx: FitContext) -> None:
        cache_dir = self.adapter_dir = Path(ctx.cache_dir) / "adapters"
        seed = ctx.seed
        progress = ctx.progress
        targets = target_modules(lm.model, self.lcfg.target_modules)
        recipe = {"model": lm.fingerprint, "r": self.lcfg.r, "alpha": self.lcfg.lora_alpha,
                  "dropout": self.lcfg.lora_dropout, "targets": targets,
                  "template": self.lcfg.train_template, "train": dataclasses.asdict(self.lcfg.train),
                  "seed": seed}
        spec = lora_spec(lm.model, targets, self.lcfg.r, self.lcfg.lora_alpha, "CAUSAL_LM")
        self.samples = list(samples)
        history = user_history(samples)
        if self.train_on == "train_samples":  # the user's training tasks, gold outputs
            split = ctx.train_items()
            history = {u: split.get(u, []) for u in history}
        tally = TrainTally()
        from tqdm.auto import tqdm

        users = sorted(history)
        for user in tqdm(users, desc="lora adapters", unit="user", disable=not progress, leave=False):
            examples = self.training_examples(lm, history[user])
            if not examples:
                self.keys[user] = ""
                continue
            key = content_hash([recipe, examples])
            self.keys[user] = key
            path = cache_dir / key / safe_name(user)
            done = train_once(path, f"lora: the adapter of user {user!r}", spec,
                              lambda out, ex=examples: train_adapter(
                                  lm.model, lm.tokenizer, ex, self.lcfg, targets, self.lcfg.train,
                                  seed, out))
            if tally.add(done):
                log.info("lora: adapter of user %s trained in %.1f s (%d items) into %s",
                         user, tally.seconds[-1], len(examples), path)
        self._load(lm, cache_dir)
        n_without = sum(1 for u in users if not self.keys[u])
        if n_without:
            log.warning("lora: %d user(s) have no training items and are generated with the "
                        "base model",
                        n_without)
        self.stats = {"backbone_n_adapters_trained": tally.trained,
                      "backbone_n_adapters_loaded": tally.loaded,
                      "backbone_n_users_without_adapter": n_without,
                      "backbone_train_on": self.train_on,
                      "backbone_train_items_per_user": round(
                          sum(map(len, history.values())) / max(len(history), 1), 2),
                      "seconds_train_per_user": tally.mean_seconds(),
                      "backbone_train_loss_mean": tally.mean_loss()}

    def _load(self, lm, cache_dir: Path) -> None:
        """Every user's adapter into one PEFT wrapper, each under its own name; a directory
        that fails to load is an error naming it (it was checked complete before)."""
        from peft import PeftModel

        with_adapter = [u for u in sorted(self.keys) if self.keys[u]]
        for i, user in enumerate(with_adapter):
            path = cache_dir / self.keys[user] / safe_name(user)
            name = _adapter_name(i)
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(lm.model, str(path), adapter_name=name,
                                                          is_trainable=False)
                else:
                    self.peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise load_error(path, f"lora: the adapter of user {user!r}", e) from e
            self.names[user] = name
        if self.peft is not None:
            self.peft.eval()
            self.peft.base_model.disable_adapter_layers()  # on only inside our contexts

    # ------------------------------------------------------------------ lifecycle

    def build_prompts(self, samples: Sequence[Sample]) -> list[Prompt]:
        return self.prompting.build_prompts(samples)

    def model(self, lm):
        return lm if self.peft is None else dataclasses.replace(lm, model=self.peft)

    @contextlib.contextmanager
    def user_context(self, lm, users: list[str]) -> Iterator[dict[str, Any]]:
        if self.peft is None:
            yield {}
            return
        self.peft.base_model.enable_adapter_layers()
        try:
            yield {"adapter_names": [self.names.get(u, BASE) for u in users]}
        finally:
            self.peft.base_model.disable_adapter_layers()

    def model_context(self, lm, rows: list[int]):
        return self.user_context(lm, [self.samples[i].user for i in rows])

    def user_identity(self, user: str) -> str:
        key = self.keys.get(user, "")
        return f"lora:{key}" if key else ""

    def row_identity(self, i: int) -> str:
        return self.user_identity(self.samples[i].user)

    def row_adapter(self, i: int) -> Optional[RowAdapter]:
        user = self.samples[i].user
        key = self.keys.get(user, "")
        if not key or self.adapter_dir is None:
            return None
        return RowAdapter(self.user_identity(user), str(self.adapter_dir / key / safe_name(user)),
                          self.lcfg.r)

    @classmethod
    def adapter_rank(cls, cfg: BackboneConfig) -> int:
        return settings_of(cfg, NAME, "backbone").r

    def metrics(self) -> dict[str, Any]:
        return dict(self.stats)

    def close(self, lm) -> None:
        if self.peft is not None:
            self.peft.base_model.unload()  # the shared model's modules, as they were
            self.peft = None
            lm.model.eval()
