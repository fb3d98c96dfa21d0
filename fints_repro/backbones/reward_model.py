"""``backbone=reward_model``: best-of-N with a personalized reward, steering pluggable on top.

- **Candidates**: the base backbone (``backbone.reward_model.base``: zero_shot | rag, with
  ``backbone.k``) writes the prompts; the pipeline samples ``n`` candidates per row in one
  ``generate`` (``temperature``, ``top_p``), each cached by its candidate index. The
  generation model is the run's own, untouched, so a steering plan on top acts exactly as
  on the base backbone (its per-row vectors, N rows per sample).
- **Training data**: each user's contrastive pairs (chosen = the user's output, rejected =
  the generator's), made as the method's ``steering.pairs`` says and cached by
  ``build_pairs`` (``preferences.user_pairs``, the same pairs steering uses).
  The reward reads (question, answer) with the item's *task question*
  (``dataset.question_template``), at test time the sample's: the same text on both sides,
  whatever ``steering.pairs.question`` stores for extraction.
- ``reward=trained``: one scalar reward model per user: a sequence-classification head
  (one label) on the run's model (``encoder=""``: the head sits on the run's own decoder,
  shared, not copied), or on a model option or local folder, with a LoRA adapter; adapter
  and head trained with TRL's ``RewardTrainer`` (Bradley-Terry: -log sigmoid(r(chosen) -
  r(rejected))) on the chat-rendered question + answer + EOS. Saved in PEFT's format under
  ``<cache_dir>/reward_models/<key>/<user>/``, the key a content hash of the encoder's
  fingerprint, the LoRA and training settings, the seed and that user's tokenised pairs;
  written to a temporary directory and renamed into place, so a killed run resumes at the
  user it was on and a damaged directory is trained again, never loaded half. Each
  candidate gets r(question, candidate) from its user's model; the prediction is the
  argmax (the first on a tie). A user without pairs has no reward model: the first
  candidate is chosen (``backbone_n_users_without_reward``).
- ``reward=judge`` (what the authors ran, SynthesizeMe-style): the run's LLM writes a
  persona of each user from up to ``persona_max_pairs`` of their pairs (greedy), then
  judges pairwise: a knock-out over the N candidates, the current winner (A) against the
  next challenger (B), N - 1 comparisons per row, one batched ``generate`` per round over
  all rows of all users. The judge sees the persona, the task input and the two
  candidates; a tie or an unparseable verdict keeps the current winner (counted in
  ``backbone_judge_unparseable``); two identical candidates are not judged. A user without
  pairs gets a generic judge (``no_persona``), as in the authors' code. Personas and
  verdicts are cached per prompt in ``<cache_dir>/judge/``. A row's ``rewards`` are the
  comparisons each candidate won.

``predictions.jsonl``: each row's ``candidates``, and under ``selection`` the ``chosen``
index and the ``rewards`` (N numbers; null for a user without a reward model).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from fints_repro.backbones.adapters import (TrainTally, load_error, lora_spec, safe_name,
                                            save_adapter, scratch_dir, train_once,
                                            trainer_arguments)
from fints_repro.backbones.base import BACKBONES, Backbone, Prompt, build_backbone
from fints_repro.backbones.lora import target_modules
from fints_repro.cache import content_hash
from fints_repro.checks import at_least, check_train, fail, has_placeholders, in_range, one_of, positive
from fints_repro.config import BackboneConfig, SteeringConfig, TrainConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import ConfigError, DataError
from fints_repro.models.chat import fit_token_sequence, render_chat
from fints_repro.models.generation import greedy_cached
from fints_repro.preferences import user_history, user_pairs
from fints_repro.registry import settings_of
from fints_repro.tasks.prompts import item_question, truncate_words
from fints_repro.text import WHITESPACE, pattern, search

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the reward's input


NAME = "reward_model"
REWARD_BASES = ("zero_shot", "rag")
REWARDS = ("trained", "judge")


@dataclass
class RewardModelSettings:
    """``backbone.reward_model.*``: N sampled candidates from a base backbone, the one a
    personalized reward ranks highest is the prediction."""

    base: str = "rag"  # the backbone that writes the candidates: zero_shot | rag
    n: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    # `trained`: a scalar reward model per user (Bradley-Terry on the user's contrastive
    # pairs, TRL's RewardTrainer); `judge`: the run's LLM as a pairwise judge with a persona
    # written from the user's pairs, knock-out over the candidates (the authors' runs).
    reward: str = "trained"
    # trained: the reward model's backbone; "" = the run's model with a scalar head, else
    # a model group option or a local path.
    encoder: str = ""
    # trained: one LoRA adapter per user on the encoder (and its scalar head trained whole),
    # so a user's reward model is small; target_modules null = PEFT's per-architecture
    # default (q_proj + v_proj; GPT-2: c_attn).
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Optional[list[str]] = None
    # lr 1e-4: a rate for a LoRA adapter and a new head (TRL's RewardConfig default).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-4, epochs=2.0, batch_size=4, weight_decay=0.0, warmup_ratio=0.1,
        max_grad_norm=1.0, max_length=1024))
    # trained: (question + candidate) sequences per forward when candidates are scored
    score_batch_size: int = 8
    # judge: decoding of its verdicts and persona
    judge_max_new_tokens: int = 8
    persona_max_new_tokens: int = 96
    persona_max_pairs: int = 8
    # judge: the persona prompt ({pairs}: up to persona_max_pairs of the user's pairs, each
    # by persona_pair_template with {question}, {chosen}, {rejected}, blank-line separated).
    persona_template: str = (
        "Here are examples of what one user wrote. For each task, the user preferred their own "
        "answer over an alternative.\n\n{pairs}\n\nDescribe this user's preferences and "
        "writing style in a few sentences, so that someone could tell which answer this user "
        "would prefer.")
    persona_pair_template: str = "Task: {question}\nPreferred: {chosen}\nNot preferred: {rejected}"
    # judge: one comparison ({persona}, {input}: the task input, {a}, {b}: the current winner
    # and the challenger); the verdict is the A or B its answer starts with.
    judge_template: str = (
        "Which of two answers would a specific user prefer?\n\nThe user:\n{persona}\n\n"
        "The task:\n{input}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\nWhich answer would this "
        "user prefer? Reply with one letter: A or B.")
    # judge: the persona of a user without pairs (a generic judge, as the authors' code).
    no_persona: str = "Nothing is known about this user."

    def check(self, key: str, backbone: BackboneConfig) -> None:
        one_of(f"{key}.base", self.base, REWARD_BASES)
        at_least(f"{key}.n", self.n, 1)
        positive(f"{key}.temperature", self.temperature)
        in_range(f"{key}.top_p", self.top_p, 0, 1, low_open=True)
        one_of(f"{key}.reward", self.reward, REWARDS)
        at_least(f"{key}.lora_r", self.lora_r, 1)
        positive(f"{key}.lora_alpha", self.lora_alpha)
        in_range(f"{key}.lora_dropout", self.lora_dropout, 0, 1)
        if self.target_modules is not None and not self.target_modules:
            fail(f"{key}.target_modules", [], "is empty (null = the architecture's default)")
        check_train(self.train, f"{key}.train")
        at_least(f"{key}.score_batch_size", self.score_batch_size, 1)
        at_least(f"{key}.judge_max_new_tokens", self.judge_max_new_tokens, 1)
        at_least(f"{key}.persona_max_new_tokens", self.persona_max_new_tokens, 1)
        at_least(f"{key}.persona_max_pairs", self.persona_max_pairs, 1)
        has_placeholders(f"{key}.persona_template", self.persona_template, ["pairs"])
        has_placeholders(f"{key}.judge_template", self.judge_template, ["persona", "input", "a", "b"])


def reward_sequence(tok, question: str, answer: str, system_prompt: str | None,
                    max_length: int) -> list[int]:
    """The token ids a reward model reads for one (question, answer): the chat-rendered
    question (as the run's prompts are), then the answer and the EOS. Longer than
    ``max_length``: question tokens are dropped from the middle, the answer kept whole (an
    answer alone too long keeps its start)."""
    prompt = tok(render_chat(tok, question, system_prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer.strip() + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
    fitted = fit_token_sequence(prompt + answer_ids, len(prompt), max_length)
    if fitted is None:
        return (prompt[:1] + answer_ids)[:max_length]
    return fitted[0]


def task_question(item_input: str, dataset) -> str:
    """The task question of an item or a sample input (``dataset.question_template``; an
    input that already is the whole question stays as it is)."""
    return item_question(HistoryItem("", item_input, ""), dataset)


def reward_pairs(steering, samples: Sequence[Sample], resources) -> dict:
    """{user: pairs}, each pair's question the item's task question (``task_question``)."""
    inputs = resources.steering_inputs(steering)
    by_user = user_pairs(steering.pairs, samples, inputs)
    items = {(u, h.id): h for u, hs in user_history(samples).items() for h in hs}
    if steering.pairs.source == "train_samples" and inputs.pair_items:
        items.update({(u, h.id): h for u, hs in inputs.pair_items().items() for h in hs})

    def question(p) -> str:
        item = items.get((p.user, p.item_id))
        return task_question(item.input, inputs.dataset) if item is not None else p.question

    return {u: [dataclasses.replace(p, question=question(p)) for p in ps] for u, ps in by_user.items()}


# ------------------------------------------------------------------ the reward model


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


def build_encoder(name: str, lm, resources, seed: int) -> Encoder:
    """``backbone.reward_model.encoder``: "" = the run's model; a folder with a
    ``config.json`` = that model, loaded as a sequence classifier; else a model option."""
    if name:
        path = Path(name).expanduser()
        if (path / "config.json").is_file():
            return _local_encoder(path, lm, seed)
        lm = resources.model(name)
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
    from transformers.trainer_callback import PrinterCallback
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
        try:
            with scratch_dir(out_dir) as scratch:
                args = RewardConfig(
                    **trainer_arguments(t, output_dir=scratch, seed=seed,
                                        cpu=ref.device.type == "cpu"),
                    # the decoder may be the run's own: no checkpointing flags, no dropout
                    # rates changed on it; mixed precision only for a bf16 model
                    activation_checkpointing=False, disable_dropout=False,
                    bf16=ref.dtype == torch.bfloat16, fp16=False,
                    max_length=None)  # the sequences are cut by reward_sequence
                trainer = RewardTrainer(model=peft_model, args=args,
                                        train_dataset=Dataset.from_list(examples),
                                        processing_class=enc.tokenizer)
                trainer.remove_callback(PrinterCallback)  # no metrics dict printed per user
                result = trainer.train()
            save_adapter(peft_model, out_dir)
            return float(result.training_loss)
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


# ------------------------------------------------------------------ the judge

# The verdict: "A" or "B" (capital, a word of its own) at the start of the answer, after an
# optional "Answer:" / "The answer is" and quotes or brackets. Matched by RE2 (linear time
# on any text; Python's re took 7 s on "answer" and 16,000 spaces), whitespace as Python's.
_VERDICT = (r"^{w}*(?i:(?:the{w}+)?(?:better{w}+)?answer(?:{w}+is)?{w}*[:\-]?{w}*)?"
            r"[\"'*(\[]*([AB])(?:[^A-Za-z0-9]|$)").replace("{w}", WHITESPACE)


def parse_verdict(text: str) -> str | None:
    """"A", "B", or None (a tie, a refusal, anything else)."""
    m = search(pattern(_VERDICT, "the judge's verdict"), text)
    return m.group(1) if m else None


def knockout(candidates: Sequence[Sequence[str]],
             judge: Callable[[list[tuple[int, int, int]]], list[str]],
             ) -> tuple[list[int], list[list[int]], list[list[list]], dict[str, int]]:
    """A sequential knock-out over each row's candidates: candidate 0 is the first winner;
    round b (1 .. N-1) compares the current winner (A) with candidate b (B), for every row
    at once: ``judge([(row, a, b), ...])`` returns one verdict text per comparison. "B"
    makes B the winner; "A", a tie or an unparseable verdict keeps A (the latter counted).
    Two identical candidates are not judged (A stays).

    Returns the winner per row, the comparisons each candidate won, per row the
    comparisons as ``[a, b, verdict]`` (verdict "A" | "B" | None), and counts (``calls``,
    ``unparseable``, ``identical``)."""
    winner = [0] * len(candidates)
    wins = [[0] * len(c) for c in candidates]
    log_rows: list[list[list]] = [[] for _ in candidates]
    counts = {"calls": 0, "unparseable": 0, "identical": 0}
    for b in range(1, max((len(c) for c in candidates), default=0)):
        asks = []
        for i, c in enumerate(candidates):
            if b >= len(c):
                continue
            if c[winner[i]].strip() == c[b].strip():
                counts["identical"] += 1
                continue
            asks.append((i, winner[i], b))
        if not asks:
            continue
        verdicts = judge(asks)
        counts["calls"] += len(asks)
        for (i, a, b_), text in zip(asks, verdicts):
            v = parse_verdict(text)
            if v == "B":
                winner[i] = b_
                wins[i][b_] += 1
            elif v == "A":
                wins[i][a] += 1
            else:
                counts["unparseable"] += 1
            log_rows[i].append([a, b_, v])
    return winner, wins, log_rows, counts


# ------------------------------------------------------------------ the backbone


@BACKBONES.register(NAME, settings=RewardModelSettings)
class RewardModel(Backbone):
    name = NAME

    def __init__(self, cfg: BackboneConfig, task, retriever):
        super().__init__(cfg, task, retriever)
        self.rm: RewardModelSettings = settings_of(cfg, NAME, "backbone")
        self.rm.check(f"backbone.{NAME}", cfg)  # as at start-up, for a backbone built directly
        self.n_candidates = self.rm.n
        self.base = build_backbone(dataclasses.replace(cfg, name=self.rm.base), task, retriever)
        self.lm = None
        self.resources = None
        self.samples: list[Sample] = []
        self.pairs: dict[str, list] = {}
        self.keys: dict[str, str] = {}  # user -> reward model key ("" = none)
        self.encoder: Encoder | None = None
        self.cache_dir: Path | None = None
        self.personas: dict[str, str] = {}
        self.stats: dict[str, Any] = {}
        self._active = None  # a loaded user reward model (unloaded by close after an error)

    # ------------------------------------------------------------------ lifecycle

    def build_prompts(self, samples: Sequence[Sample]) -> list[Prompt]:
        return self.base.build_prompts(samples)

    def decoding(self, params):
        return dataclasses.replace(params, do_sample=True, temperature=self.rm.temperature,
                                   top_p=self.rm.top_p)

    def fit(self, lm, samples, resources, steering=None, pairs: dict | None = None) -> None:
        """``pairs``: {user: pairs} made elsewhere (e.g. a held-out split of
        ``reward_pairs``); None: made here as ``steering.pairs`` says."""
        steering = steering if steering is not None else SteeringConfig()
        self.lm, self.resources, self.samples = lm, resources, list(samples)
        self.pairs = pairs if pairs is not None else reward_pairs(steering, samples, resources)
        self.stats = {"backbone_n_pairs": sum(len(v) for v in self.pairs.values())}
        if self.rm.reward == "trained":
            self._fit_trained(lm, resources)
        else:
            self._fit_judge()

    def select(self, samples, candidates):
        t0 = time.time()
        if self.rm.reward == "trained":
            out = self._select_trained(samples, candidates)
        else:
            out = self._select_judge(samples, candidates)
        self.stats["backbone_n_candidates"] = sum(len(c) for c in candidates)
        self.stats["seconds_selection"] = round(time.time() - t0, 3)
        return out

    def metrics(self) -> dict[str, Any]:
        return dict(self.stats)

    def close(self, lm) -> None:
        if self._active is not None:
            self._active.base_model.unload()
            self._active = None
        if self.encoder is not None:
            self.encoder.reset_heads()
            self.encoder = None
        lm.model.eval()

    # ------------------------------------------------------------------ trained

    def sequence_ids(self, question: str, answer: str) -> list[int]:
        enc = self.encoder
        return reward_sequence(enc.tokenizer, question, answer, enc.system_prompt,
                               self.rm.train.max_length)

    def _path(self, user: str) -> Path:
        return self.cache_dir / self.keys[user] / safe_name(user)

    def _fit_trained(self, lm, resources) -> None:
        from tqdm.auto import tqdm

        self.cache_dir = Path(resources.cfg.cache_dir) / "reward_models"
        seed = resources.cfg.seed
        users = sorted({s.user for s in self.samples})
        with_pairs = [u for u in users if self.pairs.get(u)]
        self.keys = {u: "" for u in users}
        tally = TrainTally()
        if with_pairs:
            self.encoder = build_encoder(self.rm.encoder, lm, resources, seed)
            targets = target_modules(self.encoder.model, self.rm.target_modules)
            recipe = {"encoder": self.encoder.fingerprint, "r": self.rm.lora_r,
                      "alpha": self.rm.lora_alpha, "dropout": self.rm.lora_dropout,
                      "targets": targets, "heads": sorted(self.encoder.heads),
                      "train": dataclasses.asdict(self.rm.train), "seed": seed}
            spec = lora_spec(self.encoder.model, targets, self.rm.lora_r, self.rm.lora_alpha,
                             "SEQ_CLS", heads=sorted(self.encoder.heads))
        for user in tqdm(with_pairs, desc="reward models", unit="user",
                         disable=not resources.cfg.progress, leave=False):
            examples = [{"chosen_ids": self.sequence_ids(p.question, p.chosen),
                         "rejected_ids": self.sequence_ids(p.question, p.rejected)} for p in self.pairs[user]]
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

    def _select_trained(self, samples, candidates):
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

    # ------------------------------------------------------------------ judge

    def _settings(self) -> tuple[Path, int, bool, int, str]:
        cfg = self.resources.cfg
        g = getattr(cfg, "generation", None)
        return (Path(cfg.cache_dir), cfg.seed, bool(cfg.progress),
                getattr(g, "batch_size", 8), getattr(g, "overlength", "error"))

    def generate(self, user_texts: Sequence[str], max_new_tokens: int, desc: str,
                 describe: Callable[[int, int], Exception]) -> list[str]:
        """Greedy generations of the run's LLM for chat-rendered ``user_texts``, batched
        (``generation.batch_size``) and cached per prompt in ``<cache_dir>/judge/``."""
        cache_dir, seed, progress, batch_size, overlength = self._settings()
        out, n_new = greedy_cached(self.lm, user_texts, max_new_tokens, store_dir=cache_dir / "judge",
                                   seed=seed, batch_size=batch_size, overlength=overlength,
                                   progress=progress, desc=desc, describe=describe)
        self.stats[f"backbone_{desc}_generated"] = self.stats.get(f"backbone_{desc}_generated", 0) + n_new
        return out

    def persona_prompt(self, pairs: Sequence) -> str:
        """Up to ``persona_max_pairs`` of the user's pairs (first attempts first, then in
        item order), each by ``persona_pair_template``, in ``persona_template``."""
        words = self.task.dataset.history_max_words
        order = sorted(range(len(pairs)), key=lambda j: (pairs[j].attempt, j))
        shown = sorted(order[:self.rm.persona_max_pairs])
        return self.rm.persona_template.format(pairs="\n\n".join(
            self.rm.persona_pair_template.format(question=truncate_words(pairs[j].question, words),
                                                 chosen=pairs[j].chosen, rejected=pairs[j].rejected)
            for j in shown))

    def _fit_judge(self) -> None:
        t0 = time.time()
        users = sorted({s.user for s in self.samples})
        with_pairs = [u for u in users if self.pairs.get(u)]
        prompts = [self.persona_prompt(self.pairs[u]) for u in with_pairs]

        def too_long(i: int, n: int) -> Exception:
            return DataError(f"reward_model: the persona prompt of user {with_pairs[i]!r} has {n} "
                             "tokens, more than the model's context with persona_max_new_tokens; "
                             "set generation.overlength=truncate or lower "
                             "backbone.reward_model.persona_max_pairs", record=with_pairs[i])

        self.stats["backbone_personas_generated"] = 0
        written = (self.generate(prompts, self.rm.persona_max_new_tokens, "personas", too_long)
                   if prompts else [])
        self.personas = {u: p.strip() for u, p in zip(with_pairs, written)}
        self.stats.update({"backbone_n_personas": len(with_pairs),
                           "backbone_n_users_without_persona": len(users) - len(with_pairs),
                           "seconds_personas": round(time.time() - t0, 3)})

    def persona(self, user: str) -> str:
        return self.personas.get(user) or self.rm.no_persona

    def _select_judge(self, samples, candidates):
        texts = [[self.task.reward_text(c) for c in cands] for cands in candidates]

        def judge(asks: list[tuple[int, int, int]]) -> list[str]:
            prompts = [self.rm.judge_template.format(persona=self.persona(samples[i].user),
                                                     input=samples[i].input, a=texts[i][a],
                                                     b=texts[i][b]) for i, a, b in asks]

            def too_long(j: int, n: int) -> Exception:
                s = samples[asks[j][0]]
                return DataError(f"reward_model: a judge prompt of sample {s.id!r} (user {s.user!r}) "
                                 f"has {n} tokens, more than the model's context with "
                                 "judge_max_new_tokens; set generation.overlength=truncate",
                                 record=s.id)

            return self.generate(prompts, self.rm.judge_max_new_tokens, "judge", too_long)

        t0 = time.time()
        self.stats.setdefault("backbone_judge_generated", 0)
        chosen, wins, comparisons, counts = knockout(texts, judge)
        self.stats.update({"backbone_judge_calls": counts["calls"],
                           "backbone_judge_unparseable": counts["unparseable"],
                           "backbone_judge_identical_skipped": counts["identical"],
                           "seconds_judge": round(time.time() - t0, 3)})
        if counts["unparseable"]:
            log.warning("reward_model: %d of %d judge verdicts were neither A nor B (the current "
                        "winner kept)", counts["unparseable"], counts["calls"])
        info = [{"rewards": w, "comparisons": c} for w, c in zip(wins, comparisons)]
        return chosen, info
