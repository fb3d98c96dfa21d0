"""How much work a run is, before running it:

    python -m fints_repro.plan +exp=lamp_news data.root=/data/lamp [--gpu H100] [--table PATH]

takes the overrides ``run`` takes, reads the data and the tokenizer (and builds the
retriever a RAG prompt needs), and prints per method and stage: users, rows (prompts or
sequences), prompt tokens (counted with the model's tokenizer and chat template), the
new-token budget, forward passes and training steps; then the estimated time from the
measured throughput table (``fints_repro/throughput.py``: the benchmarks' tokens/s of
prefill and decoding per model, device and dtype), on this machine's kind of device and,
with ``--gpu NAME``, on a GPU whose measured figures name it.

What it counts is what the pipeline runs (the same prompt builders and pair planner); two
things it cannot know before the model has run are bounded: the pairs kept (at most one
per attempt: the bound is used) and the length of generated text (the budget: every row
decodes all its new tokens, so the decoding time is an upper bound where rows stop early).
A stage whose result an earlier method's identical stage caches (the pairs of two methods
with the same pair settings, the rows of two identical unsteered methods) is listed as
shared and costs nothing again. Stages of plug-ins it has no counter for are named, not
guessed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

from fints_repro.backbones import build_backbone
from fints_repro.compose import Method, compose_run, resolve_methods
from fints_repro.config import RunConfig
from fints_repro.data.load import SplitReader, load_samples
from fints_repro.data.schema import Sample
from fints_repro.models.chat import render_chat
from fints_repro.models.loading import load_tokenizer, parameter_count, resolve_device, resolve_dtype
from fints_repro.preferences.pairs import extraction_question, user_history, user_pair_attempts
from fints_repro.report import markdown
from fints_repro.shards import shard_samples
from fints_repro.stages import RunContext
from fints_repro.tasks import build_task
from fints_repro.throughput import DEFAULT_TABLE, Throughput, read_table

# A training step (forward and backward) costs about three forward passes.
TRAIN_FACTOR = 3.0


@dataclass
class Stage:
    method: str
    stage: str  # generation | pairs | extraction | logprobs | bipo | lora | reward_training | ...
    users: int = 0
    rows: int = 0  # prompts, or sequences through a forward pass
    prompt_tokens: int = 0  # counted
    new_tokens: int = 0  # the decoding budget (rows x max_new_tokens)
    forward_passes: int = 0  # batched forward calls (extraction, log-prob passes)
    train_steps: int = 0  # optimizer steps
    train_tokens: int = 0  # tokens through forward and backward, over every step
    batch: int = 1
    shared_with: str = ""  # cached by this earlier method's identical stage: no cost
    note: str = ""
    counted: bool = True  # False: work the plan has no counter for (no estimate either)
    seconds: dict[str, float | None] = field(default_factory=dict)  # per device, estimated


@dataclass
class Counter:
    """Tokens of the run's model: chat-rendered prompts and bare texts."""

    tok: Any
    system_prompt: str | None

    def chat(self, text: str) -> int:
        return len(self.tok(render_chat(self.tok, text, self.system_prompt),
                            add_special_tokens=False)["input_ids"])

    def text(self, text: str, special: bool = False) -> int:
        return len(self.tok(text, add_special_tokens=special)["input_ids"])


class Planner:
    def __init__(self, cfg: RunConfig, overrides: Sequence[str]):
        self.cfg = cfg
        reader = SplitReader()
        self.task = build_task(cfg.dataset, cfg.generation, cfg.eval, cfg.seed)
        all_samples = load_samples(cfg.dataset, seed=cfg.seed, reader=reader)
        self.samples = shard_samples(all_samples, cfg.shard)
        self.ctx = RunContext(cfg, self.task, self.samples, list(overrides), reader,
                              all_samples=all_samples if cfg.shard.count > 1 else [])
        self.tok = load_tokenizer(cfg.model, cfg.cache_dir)
        sp = "\n\n".join(p for p in (cfg.dataset.system_prompt, cfg.model.system_prompt) if p) or None
        self.count = Counter(self.tok, sp)
        self.methods = resolve_methods(cfg, overrides)
        self.seen: dict[str, str] = {}  # a stage's identity -> the first method that runs it
        self.users = len({s.user for s in self.samples})
        # per pair settings, planned and tokenized once: (attempts, sequences)
        self._pair_work: dict[str, tuple[list, list[tuple[str, int, int]]]] = {}

    def shared(self, stage: Stage, identity: Any) -> Stage:
        key = json.dumps([stage.stage, identity], sort_keys=True, default=str)
        if key in self.seen:
            stage.shared_with = self.seen[key]
        else:
            self.seen[key] = stage.method
        return stage

    # ------------------------------------------------------------------ stages

    def plan(self) -> list[Stage]:
        out: list[Stage] = []
        for m in self.methods:
            backbone = build_backbone(m.backbone, self.task, self.ctx.retriever)
            pairs = None  # the method's pairs stage, if it makes pairs
            if m.steering.name != "none" or m.backbone.name == "reward_model":
                pairs = self.pairs(m)
                out.append(pairs)
            out += BACKBONE_WORK.get(m.backbone.name, _unknown("backbone"))(self, m, backbone, pairs)
            if m.steering.name != "none":
                out += STEERING_WORK.get(m.steering.name, _unknown("steering"))(self, m, pairs)
            out.append(self.generation(m, backbone))
            if self.task.model_values:
                out.append(self.model_values(m))
        return out

    def model_values(self, m: Method) -> Stage:
        """The task's model-time scores (the style metric's NLL): one forward pass over
        each sample's zero-shot chat prompt and its prediction, at most the budget."""
        rows = len(self.samples)
        batch = self.cfg.generation.batch_size
        tokens = sum(self.count.chat(s.input) for s in self.samples) + rows * self.max_new(m)
        return Stage(m.name, "scoring " + "+".join(self.task.model_values), users=self.users,
                     rows=rows, prompt_tokens=tokens, forward_passes=math.ceil(rows / batch),
                     batch=batch, note="predictions at the budget; a text scored before is cached")

    def max_new(self, m: Method) -> int:
        return m.generation.max_new_tokens or self.cfg.dataset.max_new_tokens

    def generation(self, m: Method, backbone) -> Stage:
        prompts = backbone.build_prompts(self.samples)
        n = backbone.n_candidates
        sampled = n > 1  # best-of-N samples N candidates per prompt in one call
        tokens = sum(self.count.chat(p.text) for p in prompts) * (n if sampled else 1)
        rows = len(prompts) * (n if sampled else 1)
        stage = Stage(m.name, "generation", users=self.users, rows=rows, prompt_tokens=tokens,
                      new_tokens=rows * self.max_new(m), batch=m.generation.batch_size * (n if sampled else 1))
        if m.steering.name == "none" and not sampled:
            return self.shared(stage, [m.backbone, self.max_new(m)])
        return stage

    def pair_work(self, m: Method) -> tuple[list, list[tuple[str, int, int]]]:
        """The method's pair attempts and, per attempt (the upper bound on its pairs),
        (user, chosen tokens, rejected tokens at most) of question + answer as extraction
        and training read them; made once per pair settings."""
        p, d = m.steering.pairs, self.cfg.dataset
        key = json.dumps(asdict(p), sort_keys=True, default=str)
        if key not in self._pair_work:
            attempts = user_pair_attempts(p, self.samples, self.ctx.steering_inputs(m.steering))
            budget = p.max_new_tokens or d.max_new_tokens
            seqs = []
            for a in attempts:
                q = self.count.text(extraction_question(a, p, d, self.task), special=True)
                seqs.append((a.user, q + self.count.text(" " + a.item.output), q + budget))
            self._pair_work[key] = attempts, seqs
        return self._pair_work[key]

    def pairs(self, m: Method) -> Stage:
        p = m.steering.pairs
        attempts, _ = self.pair_work(m)
        prompts = list(dict.fromkeys(a.prompt for a in attempts))
        budget = p.max_new_tokens or self.cfg.dataset.max_new_tokens
        stage = Stage(m.name, "pairs", users=len({a.user for a in attempts}), rows=len(prompts),
                      prompt_tokens=sum(self.count.chat(q) for q in prompts),
                      new_tokens=len(prompts) * budget, batch=p.batch_size,
                      note=f"{len(attempts)} attempts; at most one pair each")
        if p.generator:
            stage.note += f"; generator {p.generator} (counted and timed as the run's model)"
        return self.shared(stage, asdict(p))


def _by_user(seqs: list[tuple[str, int, int]]) -> dict[str, list[tuple[str, int, int]]]:
    out: dict[str, list[tuple[str, int, int]]] = {}
    for s in seqs:
        out.setdefault(s[0], []).append(s)
    return out


def _unknown(kind: str) -> Callable[..., list[Stage]]:
    def work(planner: Planner, m: Method, *args) -> list[Stage]:
        name = m.steering.name if kind == "steering" else m.backbone.name
        return [Stage(m.name, f"{kind} {name}", counted=False, note="no work counter for this "
                      "plug-in: its preparation is not counted (fints_repro/plan.py)")]
    return work


def _extraction(planner: Planner, m: Method, pairs, weighted_by: Any = None) -> list[Stage]:
    """``weighted_by``: what weights the chosen tokens (SteerX's settings), part of what
    the cached vectors are for."""
    _, seqs = planner.pair_work(m)
    b = m.steering.extract_batch_size
    return [planner.shared(Stage(
        m.name, "extraction", users=pairs.users, rows=2 * len(seqs),
        prompt_tokens=sum(c + r for _, c, r in seqs),
        forward_passes=2 * sum(math.ceil(len(g) / b) for g in _by_user(seqs).values()), batch=b,
        note="chosen and rejected, one pass each; rejected at the budget"),
        [asdict(m.steering.pairs), m.steering.layer, list(m.steering.sites), m.steering.attn_read,
         weighted_by])]


def _bipo(planner: Planner, m: Method, pairs, weighted_by: Any = None) -> list[Stage]:
    own = getattr(m.steering, "bipo")
    _, seqs = planner.pair_work(m)
    groups = _by_user(seqs) if own.scope == "user" else {"*": seqs}
    groups = {g: v for g, v in groups.items() if v}
    steps = tokens = 0
    for g in groups.values():
        n = own.max_steps if own.max_steps is not None else own.epochs * math.ceil(len(g) / own.batch_size)
        per_seq = sum(c + r for _, c, r in g) / len(g)  # a pair's two sequences
        steps += n
        tokens += int(n * min(own.batch_size, len(g)) * per_seq)
    reference = 2 * len(seqs)  # one pass without the vector over every sequence
    return [Stage(m.name, "bipo", users=len(groups) if own.scope == "user" else pairs.users,
                  rows=2 * len(seqs), prompt_tokens=sum(c + r for _, c, r in seqs),
                  forward_passes=math.ceil(reference / own.batch_size), train_steps=steps,
                  train_tokens=tokens, batch=own.batch_size,
                  note=f"{len(groups)} vector(s), scope={own.scope}")]


def _steerx(planner: Planner, m: Method, pairs) -> list[Stage]:
    own = getattr(m.steering, "steerx")
    _, seqs = planner.pair_work(m)
    d = planner.cfg.dataset
    k = own.k if own.k is not None else d.rag_k
    items = [h for hs in user_history(planner.samples).values() for h in hs]
    per_item = (sum(planner.count.text(h.input + " " + h.output) for h in items) / len(items)
                if items else 0)
    chosen = sum(c for _, c, _ in seqs)
    logprobs = planner.shared(Stage(m.name, "logprobs", users=pairs.users, rows=2 * len(seqs),
                     prompt_tokens=int(2 * chosen + len(seqs) * k * per_item),
                     forward_passes=2 * math.ceil(len(seqs) / own.batch_size), batch=own.batch_size,
                     note=f"with and without {k} history items (their length: the mean item's)"),
        [asdict(m.steering.pairs), k, own.effect])
    base = dataclasses.replace(m, steering=dataclasses.replace(m.steering, name=own.base))
    counter = STEERING_WORK.get(own.base)
    # what decides the token weights (and so the vectors and the descriptions)
    selection = [asdict(m.steering.pairs), k, own.effect, own.token_threshold, own.top_q]
    out = [logprobs, *(counter(planner, base, pairs, weighted_by=selection) if counter
                       else _unknown("steering")(planner, base, pairs))]
    if own.description:
        words = " ".join(["word"] * own.description_tokens)  # the prompt's length, about
        out.append(planner.shared(Stage(
            m.name, "descriptions", users=pairs.users, rows=pairs.users,
            prompt_tokens=pairs.users * planner.count.chat(own.description_prompt.format(tokens=words)),
            new_tokens=pairs.users * own.description_max_new_tokens, batch=own.batch_size),
            [selection, own.description_tokens, own.description_prompt, own.description_max_new_tokens]))
    return out


def _no_work(planner: Planner, m: Method, backbone, pairs) -> list[Stage]:
    return []


def _lora(planner: Planner, m: Method, backbone, pairs) -> list[Stage]:
    t = backbone.lcfg.train
    history = user_history(planner.samples)
    if backbone.train_on == "train_samples":
        split = planner.ctx.train_items()
        history = {u: split.get(u, []) for u in history}
    lm = SimpleNamespace(tokenizer=planner.tok, system_prompt=planner.count.system_prompt)
    steps = tokens = users = 0
    for items in history.values():
        examples = backbone.training_examples(lm, items)
        if not examples:
            continue
        users += 1
        per_epoch = math.ceil(len(examples) / t.batch_size)
        steps += math.ceil(per_epoch * t.epochs)
        tokens += int(sum(len(e["input_ids"]) for e in examples) * t.epochs)
    return [planner.shared(Stage(m.name, "lora", users=users, train_steps=steps, train_tokens=tokens,
                                 batch=t.batch_size, note="one adapter per user"),
                           [asdict(backbone.lcfg), backbone.train_on])]


def _reward(planner: Planner, m: Method, backbone, pairs) -> list[Stage]:
    rm = backbone.rm
    if rm.reward != "trained":
        return [Stage(m.name, f"reward {rm.reward}", counted=False,
                      note="the judge's rounds are not counted")]
    _, seqs = planner.pair_work(m)
    t = rm.train
    steps = tokens = 0
    by_user = _by_user(seqs)
    for g in by_user.values():
        steps += math.ceil(math.ceil(len(g) / t.batch_size) * t.epochs)
        tokens += int(sum(c + r for _, c, r in g) * t.epochs)
    n_rows = len(planner.samples) * rm.n
    budget = planner.max_new(m)
    scoring_tokens = sum(planner.count.text(s.input) for s in planner.samples) * rm.n + n_rows * budget
    return [Stage(m.name, "reward_training", users=len(by_user), train_steps=steps,
                  train_tokens=tokens, batch=t.batch_size, note="one reward model per user"),
            Stage(m.name, "reward_scoring", users=planner.users, rows=n_rows,
                  prompt_tokens=scoring_tokens, forward_passes=math.ceil(n_rows / rm.score_batch_size),
                  batch=rm.score_batch_size, note="candidates at the budget")]


# The work each plug-in adds before generation, by registered name. A new method or
# backbone adds its counter here; without one, the plan names it as not counted.
STEERING_WORK: dict[str, Callable[..., list[Stage]]] = {
    "caa": _extraction, "fine_grained": _extraction, "bipo": _bipo, "steerx": _steerx}
BACKBONE_WORK: dict[str, Callable[..., list[Stage]]] = {
    "zero_shot": _no_work, "rag": _no_work, "lora": _lora, "reward_model": _reward}


# ------------------------------------------------------------------ time


def _nearest(entries: list[Throughput], batch: int, prompt: int) -> Throughput:
    return min(entries, key=lambda t: (abs(math.log(max(t.batch, 1) / max(batch, 1))),
                                       abs(math.log(max(t.prompt_tokens, 1) / max(prompt, 1)))))


def estimate(stage: Stage, entries: list[Throughput], scale: float) -> float | None:
    """Seconds for ``stage`` from measured speeds (``scale``: the run's model's parameters
    over the measured model's): prompts at the prefill speed of the nearest measured batch
    and prompt length; decoding as batches of ``stage.batch`` rows stepping through the
    whole budget, each step as long as one at the nearest measured batch; training at
    three forward passes per token."""
    if not stage.counted:
        return None
    if stage.shared_with or not entries:
        return 0.0 if stage.shared_with else None
    avg_prompt = stage.prompt_tokens / stage.rows if stage.rows else 128
    t = _nearest(entries, stage.batch, int(avg_prompt))
    seconds = stage.prompt_tokens / t.prefill_tokens_per_s
    if stage.new_tokens:
        steps = math.ceil(stage.rows / stage.batch) * (stage.new_tokens // max(stage.rows, 1))
        seconds += steps * t.batch / t.decode_tokens_per_s
    if stage.train_tokens:
        seconds += TRAIN_FACTOR * stage.train_tokens / _nearest(entries, stage.batch, 256).prefill_tokens_per_s
    return seconds * scale


def _matching(table: list[Throughput], dtype: str, device_type: str | None = None,
              device: str | None = None) -> list[Throughput]:
    rows = [t for t in table if t.dtype == dtype]
    if device_type:
        rows = [t for t in rows if t.device_type == device_type]
    if device:
        rows = [t for t in rows if device.lower() in t.device.lower()]
    return rows


def _by_model(rows: list[Throughput], model: str, params: int | None) -> tuple[list[Throughput], float]:
    """The entries of ``model`` if measured, else those of the measured model nearest in
    size, with the factor that scales their times to ``params``."""
    own = [t for t in rows if t.model == model]
    if own or not rows:
        return own, 1.0
    if params is None:
        return [], 1.0
    near = min({t.model: t for t in rows}.values(), key=lambda t: abs(math.log(t.params / params)))
    return [t for t in rows if t.model == near.model], params / near.params


def main(argv: Sequence[str] | None = None) -> list[Stage]:
    ap = argparse.ArgumentParser(prog="python -m fints_repro.plan", description=__doc__.splitlines()[0],
                                 epilog="Every other argument is a Hydra override, as for run.")
    ap.add_argument("--gpu", help="also estimate on a measured GPU whose name contains this")
    ap.add_argument("--table", help=f"the throughput table (default {DEFAULT_TABLE})")
    ap.add_argument("--json", help="also write the stages as JSON here")
    opts, args = ap.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    gpu, table_path, json_path = opts.gpu, opts.table, opts.json
    cfg = compose_run(args)
    planner = Planner(cfg, args)
    stages = planner.plan()
    table = read_table(table_path or DEFAULT_TABLE)
    device = resolve_device(cfg.model.device)
    dtype = str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    params = parameter_count(cfg.model, cfg.cache_dir)
    targets = {f"here ({device.type}, {dtype})": _matching(table, dtype, device.type)}
    if gpu:
        targets[f"{gpu} (bf16)"] = _matching(table, "bfloat16", "cuda", gpu)
    sources = {}
    for name, rows in targets.items():
        rows, scale = _by_model(rows, cfg.model.name, params)
        sources[name] = (f"{rows[0].model} on {rows[0].device}, {rows[0].date}"
                         + (f", times x{scale:.3g} for the model's size" if scale != 1 else "")
                         if rows else "no measured figure (scripts/bench_throughput.py, scripts/bench_gpu.py)")
        for s in stages:
            s.seconds[name] = estimate(s, rows, scale) if rows else None
    print(render(cfg, planner, stages, sources, params))
    if json_path:
        Path(json_path).write_text(json.dumps([asdict(s) for s in stages], indent=1) + "\n")
    return stages


def render(cfg: RunConfig, planner: Planner, stages: list[Stage], sources: dict[str, str],
           params: int | None) -> str:
    cols = ["method", "stage", "users", "rows", "prompt_tokens", "new_tokens", "forward_passes",
            "train_steps", "train_tokens", "batch", "shared_with", "note"]  # not `counted`: in the note
    rows = []
    for s in stages:
        row = {c: getattr(s, c) for c in cols}
        for name, sec in s.seconds.items():
            row[f"s {name}"] = "" if sec is None else round(sec, 1)
        rows.append(row)
    head = (f"{cfg.dataset.name} · {cfg.model.name} ({params / 1e6:.3g}M parameters) · "
            if params else f"{cfg.dataset.name} · {cfg.model.name} · ")
    head += f"{len(planner.samples)} samples, {planner.users} users, {len(planner.methods)} methods"
    lines = [head, "", markdown(rows, list(rows[0]) if rows else cols).rstrip(), ""]
    for name, src in sources.items():
        total = [s.seconds.get(name) for s in stages]
        known = [x for x in total if x is not None]
        missing = len(total) - len(known)
        lines.append(f"estimated {name}: " + (f"{sum(known):.0f} s ({sum(known) / 3600:.2f} h)"
                     + (f", {missing} stage(s) not estimated" if missing else "") if known else "-")
                     + f" [from {src}]")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
