"""``python -m fints_repro.plan``: on the tiny demo, its counts equal counts made by hand
(the byte tokenizer: one token per byte, one per special token) and what a run then does
(the pair prompts it generates, the rows); its time estimate is the stated arithmetic over
the throughput table's speeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fints_repro.models.tiny import SPECIALS
from fints_repro.throughput import Throughput, add_entries
from tests.conftest import run

METHODS = "methods=[{backbone: zero_shot}, {backbone: rag}, {backbone: rag, steering: caa}, " \
          "{backbone: rag, steering: fine_grained}]"


def _hand_tokens(text: str) -> int:
    """Tokens of a chat-rendered text under the byte tokenizer, by hand."""
    n = 0
    for special in SPECIALS:
        n += text.count(special)
        text = text.replace(special, "")
    return n + len(text.encode("utf-8"))


def _chat(user_text: str) -> str:
    return f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def planned(tiny_overrides, tmp_path: Path, capsys):
    from fints_repro.plan import main

    table = tmp_path / "throughput.json"
    add_entries([Throughput("tiny_random_llama", 181440, "cpu (test)", "cpu", "float32", b, 512,
                            prefill_tokens_per_s=1000.0 * b, decode_tokens_per_s=50.0 * b,
                            date="2026-12-07", source="test") for b in (1, 8)], table)
    over = ["+exp=demo", *tiny_overrides, METHODS, "dataset.demo.n_users=2"]
    stages = main([*over, "--table", str(table), "--json", str(tmp_path / "plan.json")])
    printed = capsys.readouterr().out
    total = sum(s.seconds["here (cpu, float32)"] for s in stages)
    assert f"estimated here (cpu, float32): {total:.0f} s" in printed  # the stages' sum
    return over, {(s.method, s.stage): s for s in stages}


def test_plan_counts_equal_hand_counts_and_the_runs_work(planned, tmp_path: Path) -> None:
    over, stages = planned
    from fints_repro.compose import compose_run
    from fints_repro.data.load import load_samples

    cfg = compose_run(over)
    samples = load_samples(cfg.dataset, seed=cfg.seed)
    users = sorted({s.user for s in samples})
    zero = stages[("zero_shot", "generation")]
    assert (zero.users, zero.rows, zero.new_tokens) == (2, 4, 4 * 6)
    template = cfg.dataset.zero_shot_template
    assert zero.prompt_tokens == sum(_hand_tokens(_chat(template.format(input=s.input))) for s in samples)
    assert zero.batch == 1

    # pairs: every history item of every user, twice (steering.pairs.attempts=2)
    pairs = stages[("rag+caa", "pairs")]
    items = {u: {h.id for s in samples if s.user == u for h in s.history} for u in users}
    attempts = 2 * sum(len(v) for v in items.values())
    assert pairs.note.startswith(f"{attempts} attempts")
    assert pairs.new_tokens == pairs.rows * cfg.dataset.max_new_tokens
    assert stages[("rag+fine_grained", "pairs")].shared_with == "rag+caa"
    ext = stages[("rag+caa", "extraction")]
    assert ext.rows == 2 * attempts
    batch = cfg.steering.extract_batch_size
    assert ext.forward_passes == 2 * sum(math.ceil(2 * len(v) / batch) for v in items.values())
    assert stages[("rag+caa", "generation")].shared_with == ""  # steered rows are new rows

    # what the run then does: the same pair prompts generated, the same rows
    out = run(over, tmp_path / "run")
    (store,) = (Path(cfg.cache_dir) / "pairs").glob("*.jsonl")
    generated = [json.loads(line) for line in store.read_text().splitlines()]
    assert len(generated) == pairs.rows
    assert out["methods"]["rag+caa"]["n_generated"] == stages[("rag+caa", "generation")].rows
    rag_prompts = [json.loads(line)["prompt"] for line in
                   (tmp_path / "run" / "rag" / "predictions.jsonl").read_text().splitlines()]
    # predictions.jsonl holds the chat-rendered prompt each row was generated from
    assert stages[("rag", "generation")].prompt_tokens == sum(_hand_tokens(p) for p in rag_prompts)


def test_the_estimate_is_the_stated_arithmetic(planned) -> None:
    _, stages = planned
    here = "here (cpu, float32)"
    zero = stages[("zero_shot", "generation")]  # batch 1: the batch-1 entry's speeds
    expected = zero.prompt_tokens / 1000.0 + math.ceil(zero.rows / 1) * 6 * 1 / 50.0
    assert zero.seconds[here] == pytest.approx(expected)
    assert stages[("rag+fine_grained", "pairs")].seconds[here] == 0.0  # cached by rag+caa


def test_the_paper_preset_is_planned_with_every_backbone(tmp_path: Path, capsys) -> None:
    """+exp=lamp_news on the LaMP fixtures: LoRA's steps by hand (per user, batches of its
    history items times the epochs); the judge's rounds named as not counted, not guessed."""
    from fints_repro.compose import compose_run, resolve_methods
    from fints_repro.data.load import load_samples
    from fints_repro.plan import main
    from tests.conftest import FIXTURES

    over = ["+exp=lamp_news", f"data.root={FIXTURES / 'lamp_time'}", "model=tiny_random_llama",
            "retriever=bm25", "steering.fine_grained.retriever=bm25", f"cache_dir={tmp_path}"]
    stages = {(s.method, s.stage): s for s in main([*over, "--table", str(tmp_path / "none.json")])}
    cfg = compose_run(over)
    samples = load_samples(cfg.dataset, seed=cfg.seed)
    lora = stages[("lora", "lora")]
    t = next(m for m in resolve_methods(cfg, over) if m.name == "lora").backbone.lora.train
    items = {u: {h.id for s in samples if s.user == u for h in s.history if h.output.strip()}
             for u in {s.user for s in samples}}
    assert lora.train_steps == sum(math.ceil(math.ceil(len(v) / t.batch_size) * t.epochs)
                                   for v in items.values() if v)
    assert stages[("lora+fine_grained", "lora")].shared_with == "lora"
    judge = stages[("reward_model", "reward judge")]
    assert not judge.counted and judge.seconds == {"here (cpu, float32)": None}
    assert "no measured figure" in capsys.readouterr().out


def test_a_task_with_model_time_scores_plans_its_scoring_stage(tiny_overrides, tmp_path: Path) -> None:
    """+exp=demo_style: each method's NLL scoring is one pass over every sample's zero-shot
    chat prompt and its prediction at the budget, counted by hand."""
    from fints_repro.compose import compose_run
    from fints_repro.data.load import load_samples
    from fints_repro.plan import main

    over = ["+exp=demo_style", *tiny_overrides, "methods=[{backbone: zero_shot}]",
            "dataset.demo_style.users.casual=1", "dataset.demo_style.users.formal=0",
            "dataset.demo_style.users.positive=0", "dataset.demo_style.users.topic=1",
            "dataset.demo_style.n_history=2", "dataset.demo_style.n_test=3"]
    stages = {(s.method, s.stage): s for s in main([*over, "--table", str(tmp_path / "none.json")])}
    samples = load_samples(compose_run(over).dataset, seed=0)
    scoring = stages[("zero_shot", "scoring nll")]
    assert scoring.rows == 6 and scoring.forward_passes == 6  # batch size 1 (tiny_overrides)
    assert scoring.prompt_tokens == sum(_hand_tokens(_chat(s.input)) for s in samples) + 6 * 6
