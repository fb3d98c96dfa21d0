"""``backbone.reward_model.reward=trained``: one scalar reward model per user, and the
selector that ranks a row's candidates by it (``TrainedReward``).

Each reward model is a sequence-classification head (one label) on the encoder (the
run's model with the head shared, not copied, or a model option or a local folder) with a
LoRA adapter; adapter and head are trained with TRL's ``RewardTrainer`` (Bradley-Terry:
-log sigmoid(r(chosen) - r(rejected))) on the chat-rendered question + answer + EOS, saved
through ``adapters`` (the per-user adapter module LoRA shares) under
``<cache_dir>/reward_models/<key>/<user>/``, the key a content hash of the encoder's
fingerprint, the LoRA and training settings, the seed and that user's tokenised pairs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from fints_repro.backbones.adapters import (TrainTally, checkpointing_field, load_error, lora_spec,
                                            safe_name, train_and_save, train_once,
                                            trainer_arguments)
from fints_repro.backbones.base import FitContext
from fints_repro.backbones.lora import target_modules
from fints_repro.cache import content_hash
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import ConfigError
from fints_repro.models.chat import clip_token_sequence, render_chat
from fints_repro.tasks.prompts import item_question

if TYPE_CHECKING:
    from fints_repro.backbones.reward_model import RewardModelSettings
    from fints_repro.tasks import Task

log = logging.getLogger(__name__)


def reward_sequence(tok, question: str, answer: str, system_prompt: str | None,
                    max_length: int) -> list[int]:
    """The token ids a reward model reads for one (question, answer): the chat-rendered
    question (as the run's prompts are), then the answer and the EOS. Longer than
    ``max_length``: question tokens are dropped from the middle, the answer kept whole (an
    answer alone too long keeps its start)."""
    prompt = tok(render_chat(tok, question, system_prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer.strip() + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
    fitted = clip_token_sequence(prompt + answer_ids, len(prompt), max_length)
    if fitted is None:
        return (prompt[:1] + answer_ids)[:max_length]
    return fitted[0]



def task_question(item_input: str, dataset) -> str:
    """The task question of an item or a sample input (``dataset.question_template``; an
    input that already is the whole question stays as it is)."""
    return item_question(HistoryItem("", item_input, ""), dataset)



@dataclasses.dataclass
class Encoder:
    """A sequence classifier (one label) and what its inputs are made with. ``heads``: a
    pristine copy of each freshly initialised head module (every user's training starts
    from it; PEFT's unload leaves the trained copy in place, so it is put back)."""

    model: torch.nn.Module
    tokenizer: Any
    fingerprint: str
    system_prompt: str | None
    heads: dict[str, torch.nn.Module]

    def reset_heads(self) -> None:
        for name, module in self.heads.items():
            setattr(self.model, name, copy.deepcopy(module))


def _init_head(module: torch.nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()


def sequence_classifier(causal: torch.nn.Module, pad_token_id: int, seed: int
                        ) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """transformers' sequence-classification model of ``causal``'s architecture, one label,
    on ``causal``'s own decoder (shared, not copied: built on the meta device, then the
    decoder is put in); its new head initialised on the CPU from ``seed``. Returns the
    model and a pristine copy of its head modules."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    config.get_text_config().pad_token_id = pad_token_id
    arch = getattr(config, "model_type", "?")
    try:
        with torch.device("meta"):
            seq = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"backbone.reward_model.encoder: transformers has no sequence-"
                          f"classification model for the architecture {arch!r}; name another "
                          "encoder (a model option or a local folder)") from e
    prefix = seq.base_model_prefix
    body = getattr(causal, prefix, None)
    if body is None or type(body) is not type(getattr(seq, prefix, None)):
        raise ConfigError(f"backbone.reward_model.encoder: the {arch!r} model keeps its decoder "
                          f"elsewhere than {prefix!r}; name another encoder")
    setattr(seq, prefix, body)
    ref = next(body.parameters())
    std = float(getattr(config.get_text_config(), "initializer_range", 0.02) or 0.02)
    heads: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, child in list(seq.named_children()):
            if name == prefix:
                continue
            child = child.to_empty(device="cpu")
            _init_head(child, std)
            child = child.to(device=ref.device, dtype=ref.dtype)
            setattr(seq, name, child)
            if any(True for _ in child.parameters()):
                heads[name] = copy.deepcopy(child)
    meta = [n for n, t in [*seq.named_parameters(), *seq.named_buffers()] if t.is_meta]
    if meta or not heads:
        why = "left on meta: " + ", ".join(meta[:3]) if meta else "no head"
        raise ConfigError(f"backbone.reward_model.encoder: cannot put a scalar head on the "
                          f"{arch!r} model ({why}); name another encoder")
    seq.requires_grad_(False)
    seq.eval()
    return seq, heads


def build_encoder(name: str, lm, ctx: FitContext, seed: int) -> Encoder:
    """``backbone.reward_model.encoder``: "" = the run's model; a folder with a
    ``config.json`` = that model, loaded as a sequence classifier; else a model option."""
    if name:
        path = Path(name).expanduser()
        if (path / "config.json").is_file():
            return _local_encoder(path, lm, seed)
        lm = ctx.model_option(name)
    seq, heads = sequence_classifier(lm.model, lm.tokenizer.pad_token_id, seed)
    return Encoder(seq, lm.tokenizer, f"{lm.fingerprint}+scalar-head", lm.system_prompt, heads)


def _local_encoder(path: Path, lm, seed: int) -> Encoder:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fints_repro.models.loading import local_fingerprint

    ref = next(lm.model.parameters())
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new head's initialisation
        seq = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1,
                                                                 dtype=ref.dtype)
    seq.config.pad_token_id = tok.pad_token_id
    seq.to(ref.device).requires_grad_(False).eval()
    prefix = seq.base_model_prefix
    heads = {n: copy.deepcopy(c) for n, c in seq.named_children()
             if n != prefix and any(True for _ in c.parameters())}
    fp = content_hash(["local", local_fingerprint(path), str(ref.dtype), ref.device.type])
    return Encoder(seq, tok, f"{path.name}-{fp}", None, heads)


@contextlib.contextmanager
def _rng_kept(seed: int) -> Iterator[None]:
    """Seeded inside; the global random states (Python, NumPy, torch) as they were after
    (TRL's trainer reseeds them all)."""
    py, npr = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npr)


def train_reward_model(enc: Encoder, examples: list[dict], rm, targets: list[str], seed: int,
                       out_dir: Path) -> float:
    """One user's reward model: a LoRA adapter on ``enc.model`` and its head (trained
    whole, PEFT's ``modules_to_save``), trained with TRL's RewardTrainer on ``examples``
    (``chosen_ids`` / ``rejected_ids``, already tokenised), saved in PEFT's format into
    ``out_dir`` (a temporary directory renamed into place) and unloaded again: the model
    is left as found (weights, head, requires_grad, eval mode). Returns the training loss."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import RewardConfig, RewardTrainer

    model = enc.model
    enc.reset_heads()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = next(model.parameters())
    cfg = LoraConfig(task_type="SEQ_CLS", r=rm.lora_r, lora_alpha=rm.lora_alpha,
                     lora_dropout=rm.lora_dropout, target_modules=targets, bias="none",
                     modules_to_save=list(enc.heads),
                     fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
    t = rm.train
    with _rng_kept(seed):
        peft_model = get_peft_model(model, cfg)  # the adapter's initialisation: seeded
        def trainer(scratch: str):
            args = RewardConfig(
                **trainer_arguments(t, output_dir=scratch, seed=seed, cpu=ref.device.type == "cpu"),
                # the decoder may be the run's own: no checkpointing flags, no dropout
                # rates changed on it; mixed precision only for a bf16 model
                **{checkpointing_field(RewardConfig): False}, disable_dropout=False,
                bf16=ref.dtype == torch.bfloat16, fp16=False,
                max_length=None)  # the sequences are cut by reward_sequence
            return RewardTrainer(model=peft_model, args=args,
                                 train_dataset=Dataset.from_list(examples),
                                 processing_class=enc.tokenizer)

        try:
            return train_and_save(peft_model, trainer, out_dir)
        finally:
            peft_model.base_model.unload()
            enc.reset_heads()
            for n, p in model.named_parameters():
                p.requires_grad_(grads.get(n, False))
            model.eval()


@torch.inference_mode()
def score_sequences(model: torch.nn.Module, seqs: Sequence[list[int]], pad_token_id: int,
                    batch_size: int) -> list[float]:
    """The scalar reward of each token sequence (right-padded batches, longest first, as
    in training: the head reads the last token that is not padding)."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    out = [0.0] * len(seqs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            mask[j, :len(seqs[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       use_cache=False).logits
        for j, i in enumerate(idx):
            out[i] = float(logits[j, 0])
    return out


class TrainedReward:
    """Fits a reward model per user with pairs; selects each row's candidate with the
    highest r(task question, candidate) under its user's model (the first on a tie; the
    first for a user without pairs)."""

    def __init__(self, rm: "RewardModelSettings", task: "Task"):
        self.rm, self.task = rm, task
        self.keys: dict[str, str] = {}  # user -> reward model key ("" = none)
        self.encoder: Encoder | None = None
        self.cache_dir: Path | None = None
        self.stats: dict[str, Any] = {}
        self._active = None  # a loaded user reward model (unloaded by close after an error)

    def sequence_ids(self, question: str, answer: str) -> list[int]:
        enc = self.encoder
        return reward_sequence(enc.tokenizer, question, answer, enc.system_prompt,
                               self.rm.train.max_length)

    def _path(self, user: str) -> Path:
        return self.cache_dir / self.keys[user] / safe_name(user)

    def fit(self, lm, samples: Sequence[Sample], pairs: dict[str, list], ctx: FitContext) -> None:
        from tqdm.auto import tqdm

        self.cache_dir = Path(ctx.cache_dir) / "reward_models"
        seed = ctx.seed
        users = sorted({s.user for s in samples})
        with_pairs = [u for u in users if pairs.get(u)]
        self.keys = {u: "" for u in users}
        tally = TrainTally()
        if with_pairs:
            self.encoder = build_encoder(self.rm.encoder, lm, ctx, seed)
            targets = target_modules(self.encoder.model, self.rm.target_modules)
            recipe = {"encoder": self.encoder.fingerprint, "r": self.rm.lora_r,
                      "alpha": self.rm.lora_alpha, "dropout": self.rm.lora_dropout,
                      "targets": targets, "heads": sorted(self.encoder.heads),
                      "train": dataclasses.asdict(self.rm.train), "seed": seed}
            spec = lora_spec(self.encoder.model, targets, self.rm.lora_r, self.rm.lora_alpha,
                             "SEQ_CLS", heads=sorted(self.encoder.heads))
        for user in tqdm(with_pairs, desc="reward models", unit="user",
                         disable=not ctx.progress, leave=False):
            examples = [{"chosen_ids": self.sequence_ids(p.prompt, p.chosen),
                         "rejected_ids": self.sequence_ids(p.prompt, p.rejected)} for p in pairs[user]]
            self.keys[user] = content_hash([recipe, examples])
            path = self._path(user)
            done = train_once(path, f"reward_model: the reward model of user {user!r}", spec,
                              lambda out, ex=examples: train_reward_model(
                                  self.encoder, ex, self.rm, targets, seed, out))
            if tally.add(done):
                log.info("reward_model: reward model of user %s trained in %.1f s (%d pairs) "
                         "into %s", user, tally.seconds[-1], len(examples), path)
        n_without = len(users) - len(with_pairs)
        if n_without:
            log.warning("reward_model: %d user(s) have no pairs: their first candidate is the "
                        "prediction", n_without)
        self.stats.update({
            "backbone_n_reward_models_trained": tally.trained,
            "backbone_n_reward_models_loaded": tally.loaded,
            "backbone_n_users_without_reward": n_without,
            "seconds_reward_train_per_user": tally.mean_seconds(),
            "seconds_reward_train_total": round(sum(tally.seconds), 3),
            "backbone_reward_train_loss_mean": tally.mean_loss(),
        })

    @contextlib.contextmanager
    def reward_of(self, user: str) -> Iterator[torch.nn.Module]:
        """The user's reward model, loaded onto the encoder for the block and unloaded after."""
        from peft import PeftModel

        enc = self.encoder
        enc.reset_heads()
        path = self._path(user)
        try:
            self._active = PeftModel.from_pretrained(enc.model, str(path), is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            enc.reset_heads()
            raise load_error(path, f"reward_model: the reward model of user {user!r}", e) from e
        try:
            self._active.eval()
            yield self._active
        finally:
            self._active.base_model.unload()
            self._active = None
            enc.reset_heads()
            enc.model.eval()

    def reward_scores(self, samples: Sequence[Sample], candidates: Sequence[Sequence[str]]
                      ) -> list[list[float] | None]:
        """Per row, r(task question, candidate) of each candidate (``task.reward_text``)
        by the row's user's reward model; None for a user without one."""
        out: list[list[float] | None] = [None] * len(samples)
        rows: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            if self.keys.get(s.user):
                rows.setdefault(s.user, []).append(i)
        d = self.task.dataset
        for user, idx in rows.items():
            seqs = [self.sequence_ids(task_question(samples[i].input, d), self.task.reward_text(c))
                    for i in idx for c in candidates[i]]
            with self.reward_of(user) as model:
                scores = score_sequences(model, seqs, self.encoder.tokenizer.pad_token_id,
                                         self.rm.score_batch_size)
            k = 0
            for i in idx:
                out[i] = scores[k:k + len(candidates[i])]
                k += len(candidates[i])
        return out

    def select(self, samples, candidates) -> tuple[list[int], list[dict[str, Any]]]:
        chosen, info = [], []
        n_first = 0
        for r in self.reward_scores(samples, candidates):
            if r is None:
                n_first += 1
                chosen.append(0)
                info.append({"rewards": None, "fallback": "first candidate: no reward model "
                                                          "(the user has no pairs)"})
            else:
                chosen.append(max(range(len(r)), key=lambda j: (r[j], -j)))
                info.append({"rewards": r})
        self.stats["backbone_n_rows_without_reward"] = n_first
        return chosen, info

    def close(self, lm) -> None:
        if self._active is not None:
            self._active.base_model.unload()
            self._active = None
        if self.encoder is not None:
            self.encoder.reset_heads()
            self.encoder = None
