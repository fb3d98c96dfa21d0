"""``backbone=reward_model``: best-of-N with a per-user reward (a scalar reward model
trained with TRL's RewardTrainer, or the run's LLM as a pairwise judge with a persona).

The users' chosen outputs carry a user-specific marker and the rejected ones do not, so a
reward model has something of its user's to learn even on a tiny random model: it ranks
held-out chosen above rejected, and one trained on the swapped pairs ranks them below
(the check can fail). Selection, resume after a kill, damaged caches, users without
pairs and the judge's knock-out are each checked directly; one run goes through the
pipeline with steering on top.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("trl")

import fints_repro.backbones.reward_judge as judge_mod  # noqa: E402
import fints_repro.backbones.reward_model as rm_mod  # noqa: E402
import fints_repro.backbones.reward_trained as trained_mod  # noqa: E402
from fints_repro.backbones import FitContext, backbone_schema, build_backbone  # noqa: E402
from fints_repro.backbones.reward_model import RewardModelSettings  # noqa: E402
from fints_repro.config import (DatasetConfig, EvalConfig, GenerationConfig,  # noqa: E402
                                ModelConfig, TrainConfig)
from fints_repro.data.schema import Sample  # noqa: E402
from fints_repro.errors import ConfigError  # noqa: E402
from fints_repro.models.loading import LoadedModel, load_model  # noqa: E402
from fints_repro.preferences.pairs import Pair  # noqa: E402
from fints_repro.tasks import build_task  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DATASET = DatasetConfig(name="demo_news", loader="demo", benchmark="demo_news", path="unused",
                        question_template="Headline: {input}", max_new_tokens=6)
WORDS = ["river", "market", "council", "storm", "school", "bridge", "garden", "festival",
         "train", "museum", "harbor", "library", "winter", "budget", "doctor", "stadium"]
MARKERS = {"alice": "AAA!", "bob": "zq#"}
FAST = TrainConfig(lr=3e-3, epochs=5, batch_size=4, weight_decay=0.0, warmup_ratio=0.0,
                   max_grad_norm=1.0, max_length=256)
QUICK = TrainConfig(lr=3e-3, epochs=1, batch_size=4, weight_decay=0.0, warmup_ratio=0.0,
                    max_grad_norm=1.0, max_length=256)


def _lm() -> LoadedModel:
    return load_model(ModelConfig(name="tiny_random_llama", source="tiny_random", arch="llama",
                                  dtype="float32", device="cpu"))


def _headline(i: int) -> str:
    return " ".join(random.Random(i).sample(WORDS, 3))


def _pairs(user: str, start: int, n: int, swap: bool = False) -> list[Pair]:
    out = []
    for i in range(start, start + n):
        chosen, rejected = f"{MARKERS[user]} {_headline(i)}", _headline(10_000 + i)
        if swap:
            chosen, rejected = rejected, chosen
        out.append(Pair(user, f"{user}-h{i}", f"Headline: story {i}", chosen, rejected, 0.0, 0))
    return out


def _samples(users=("alice", "bob"), n: int = 2) -> list[Sample]:
    return [Sample(f"{u}-t{j}", u, f"Headline: test story {j}", "x", ())
            for u in users for j in range(n)]


def _backbone(tmp_path: Path, monkeypatch, pairs: dict, reward: str = "trained",
              train: TrainConfig = QUICK, n: int = 3, **rm) -> tuple:
    """A reward_model backbone on zero-shot prompts whose pairs are ``pairs``."""
    monkeypatch.setattr(rm_mod, "reward_pairs", lambda pairs_cfg, samples, source: pairs)
    cfg = backbone_schema()(name="reward_model", reward_model=RewardModelSettings(
        base="zero_shot", n=n, reward=reward, train=train, **rm))
    task = build_task(DATASET, GenerationConfig(), EvalConfig())
    resources = FitContext(cache_dir=tmp_path, batch_size=4)
    return build_backbone(cfg, task, lambda: None), resources


# ------------------------------------------------------------------ selection


def test_best_of_n_keeps_the_argmax_and_samples_its_candidates(tmp_path, monkeypatch) -> None:
    from fints_repro.models.generation import DecodingParams

    bb, _ = _backbone(tmp_path, monkeypatch, {}, temperature=0.7, top_p=0.8)
    assert bb.n_candidates == 3
    p = bb.decoding(DecodingParams(max_new_tokens=5, seed=3))
    assert (p.do_sample, p.temperature, p.top_p, p.max_new_tokens, p.seed) == (True, 0.7, 0.8, 5, 3)
    samples = _samples(("alice", "bob"))
    assert [x.text for x in bb.build_prompts(samples)] == [s.input for s in samples]
    known = [[0.1, 0.7, 0.3], None, [2.0, 2.0, 1.0], [-1.0, -3.0, -0.5]]
    monkeypatch.setattr(bb.selector, "reward_scores", lambda s, c: known)
    chosen, info = bb.select(samples, [["a", "b", "c"]] * 4)
    assert chosen == [1, 0, 0, 2]  # a tie goes to the first; no reward: the first candidate
    assert [i["rewards"] for i in info] == known
    assert "fallback" in info[1]
    m = bb.metrics()
    assert m["backbone_n_rows_without_reward"] == 1 and m["backbone_n_candidates"] == 12


# ------------------------------------------------------------------ the trained reward


def _accuracy(rewards) -> float:
    return sum(r[0] > r[1] for r in rewards) / len(rewards)


def test_a_trained_reward_model_prefers_its_users_held_out_chosen(tmp_path, monkeypatch) -> None:
    lm = _lm()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    held = _pairs("alice", 500, 12)
    samples = [Sample(f"alice-q{j}", "alice", p.prompt, None, ()) for j, p in enumerate(held)]
    cands = [[p.chosen, p.rejected] for p in held]

    def fitted(pairs, cache) -> tuple[float, float]:
        bb, res = _backbone(tmp_path / cache, monkeypatch, {"alice": pairs}, train=FAST, n=2)
        bb.fit(lm, samples, res)
        # what generation runs on after fit: the run's model, no adapter left in it
        assert not any("lora" in n for n, _ in lm.model.named_modules()) and not lm.model.training
        trained = _accuracy(bb.selector.reward_scores(samples, cands))
        assert bb.metrics()["backbone_n_reward_models_trained"] == 1
        # the same encoder and head before training: no adapter, the pristine head
        sel = bb.selector
        sel.encoder.reset_heads()
        seqs = [sel.sequence_ids(p.prompt, c) for p in held for c in (p.chosen, p.rejected)]
        raw = trained_mod.score_sequences(sel.encoder.model, seqs, lm.tokenizer.pad_token_id, 8)
        untrained = _accuracy(list(zip(raw[0::2], raw[1::2])))
        bb.close(lm)
        return trained, untrained

    trained, untrained = fitted(_pairs("alice", 0, 16), "a")
    swapped, _ = fitted(_pairs("alice", 0, 16, swap=True), "b")
    assert trained >= 0.9, (trained, untrained)
    assert swapped <= 0.1, swapped  # trained to prefer the other side, it does
    assert trained > untrained, (trained, untrained)
    # the run's model as found: weights, no adapter modules, frozen, eval mode
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]) and not p.requires_grad, n
    assert not any("lora" in n or "modules_to_save" in n for n, _ in lm.model.named_modules())
    assert not lm.model.training
    (saved,) = (tmp_path / "a" / "reward_models").glob("*/alice")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in saved.iterdir()}


def test_a_killed_run_resumes_without_training_a_reward_model_twice(tmp_path, monkeypatch) -> None:
    lm = _lm()
    calls: list[str] = []
    real = trained_mod.train_reward_model

    def counted(enc, examples, rm, targets, seed, out_dir):
        calls.append(out_dir.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while training the second user
        return real(enc, examples, rm, targets, seed, out_dir)

    monkeypatch.setattr(trained_mod, "train_reward_model", counted)
    pairs = {"alice": _pairs("alice", 0, 4), "bob": _pairs("bob", 0, 4)}
    bb, res = _backbone(tmp_path, monkeypatch, pairs)
    with pytest.raises(KeyboardInterrupt):
        bb.fit(lm, _samples(), res)
    bb.close(lm)
    assert calls == ["alice", "bob"]
    assert not list((tmp_path / "reward_models").glob("*/bob"))  # nothing half-written in place
    bb, _ = _backbone(tmp_path, monkeypatch, pairs)
    bb.fit(lm, _samples(), res)
    assert calls == ["alice", "bob", "bob"]
    m = bb.metrics()
    assert (m["backbone_n_reward_models_loaded"], m["backbone_n_reward_models_trained"]) == (1, 1)
    assert m["seconds_reward_train_per_user"] > 0
    bb.close(lm)


@pytest.mark.parametrize("how", ["truncated", "empty_config", "config_deleted", "no_tensors",
                                 "wrong_shape", "head_missing"])
def test_a_damaged_reward_model_is_named_moved_aside_and_trained_again(tmp_path, monkeypatch,
                                                                        caplog, how) -> None:
    """At fit, before any candidate is generated: a config of {} or a weights file without
    its tensors (the head's too) is named and trained again, never loaded half."""
    from safetensors.torch import load_file, save_file

    from tests.unit.test_lora import _damage

    lm = _lm()
    pairs = {"alice": _pairs("alice", 0, 4)}
    bb, res = _backbone(tmp_path, monkeypatch, pairs)
    bb.fit(lm, _samples(("alice",)), res)
    bb.close(lm)
    (folder,) = (tmp_path / "reward_models").glob("*/alice")
    if how == "head_missing":
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        assert tensors.pop("base_model.model.score.weight").shape == (1, 64)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        problem = "base_model.model.score.weight"
    else:
        problem = _damage(folder, how)
    bb, _ = _backbone(tmp_path, monkeypatch, pairs)
    with caplog.at_level("WARNING", logger="fints_repro.backbones.adapters"):
        bb.fit(lm, _samples(("alice",)), res)
    m = bb.metrics()
    assert (m["backbone_n_reward_models_trained"], m["backbone_n_reward_models_loaded"]) == (1, 0)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(folder) in warning and problem in warning and "reward model of user 'alice'" in warning
    assert folder.with_name("alice.corrupt").is_dir()
    chosen, info = bb.select(_samples(("alice",)), [["x", "y", "z"]] * 2)  # loads and scores
    assert all(len(i["rewards"]) == 3 for i in info)
    bb.close(lm)


def test_a_user_without_pairs_gets_the_first_candidate_and_is_counted(tmp_path, monkeypatch) -> None:
    lm = _lm()
    bb, res = _backbone(tmp_path, monkeypatch, {"alice": _pairs("alice", 0, 4), "carol": []})
    samples = _samples(("alice", "carol"))
    bb.fit(lm, samples, res)
    cands = [[f"{MARKERS['alice']} one", "two", "three"]] * len(samples)
    chosen, info = bb.select(samples, cands)
    for s, c, i in zip(samples, chosen, info):
        if s.user == "carol":
            assert c == 0 and i["rewards"] is None
        else:
            assert len(i["rewards"]) == 3 and c == max(range(3), key=lambda j: i["rewards"][j])
    m = bb.metrics()
    assert m["backbone_n_users_without_reward"] == 1
    assert m["backbone_n_rows_without_reward"] == 2
    bb.close(lm)


# ------------------------------------------------------------------ the judge


@pytest.mark.parametrize("text,verdict", [
    ("A", "A"), (" B.", "B"), ("Answer: A", "A"), ("the answer is B", "B"), ("**B**", "B"),
    ("(A) because", "A"), ("a good one", None), ("Tie", None), ("", None), ("AB", None),
    ("Both", None),
])
def test_judge_verdicts_parse_to_a_b_or_nothing(text, verdict) -> None:
    assert judge_mod.parse_verdict(text) == verdict


def test_the_knockout_keeps_the_winner_on_an_unparseable_verdict_and_counts_it() -> None:
    cands = [["x", "y", "z"], ["p", "p", "q"], ["m", "n", "o"]]
    script = iter([["B", "maybe"], ["A", "B", "Answer: B"]])
    asked = []

    def judge(asks):
        asked.append(asks)
        return next(script)

    winner, wins, comparisons, counts = judge_mod.knockout(cands, judge)
    # one call per round, every row at once; identical candidates are not judged
    assert asked == [[(0, 0, 1), (2, 0, 1)], [(0, 1, 2), (1, 0, 2), (2, 0, 2)]]
    assert winner == [1, 2, 2]
    assert wins == [[0, 2, 0], [0, 0, 1], [0, 0, 1]]
    assert comparisons[2] == [[0, 1, None], [0, 2, "B"]]
    assert counts == {"calls": 5, "unparseable": 1, "identical": 1}


def test_the_judge_backbone_writes_personas_and_batches_rounds_across_users(tmp_path,
                                                                           monkeypatch) -> None:
    lm = _lm()
    pairs = {"alice": _pairs("alice", 0, 5), "bob": _pairs("bob", 0, 3), "carol": []}
    samples = _samples(("alice", "bob", "carol"), n=1)
    bb, res = _backbone(tmp_path, monkeypatch, pairs, reward="judge", persona_max_new_tokens=6,
                        persona_max_pairs=2)
    bb.fit(lm, samples, res)
    m = bb.metrics()
    assert (m["backbone_n_personas"], m["backbone_n_users_without_persona"]) == (2, 1)
    assert m["backbone_personas_generated"] == 2
    prompt = bb.selector.persona_prompt(pairs["alice"])
    assert prompt.count("Preferred:") == 2 and pairs["alice"][0].chosen in prompt
    # the judge's generations, scripted: round 1 B / unparseable / A, round 2 all B
    script = iter([["B", "no idea", "A"], ["B", "B", "B"]])
    seen = []

    def fake(texts, max_new_tokens, desc, describe):
        assert desc == "judge" and max_new_tokens == bb.rm.judge_max_new_tokens
        seen.append(list(texts))
        return next(script)

    monkeypatch.setattr(bb.selector, "generate", fake)
    cands = [["a1", "a2", "a3"], ["b1", "b2", "b3"], ["c1", "c2", "c3"]]
    chosen, info = bb.select(samples, cands)
    assert len(seen) == 2 and all(len(t) == 3 for t in seen)  # one batch per round, all users
    assert chosen == [2, 2, 2]
    assert [i["rewards"] for i in info] == [[0, 1, 1], [0, 0, 1], [1, 0, 1]]
    assert bb.metrics()["backbone_judge_unparseable"] == 1
    assert bb.metrics()["backbone_judge_calls"] == 6
    first = seen[0]
    assert bb.selector.persona("alice") in first[0] and samples[0].input in first[0]
    assert "Answer A:\na1" in first[0] and "Answer B:\na2" in first[0]
    assert bb.rm.no_persona in first[2]  # carol: a generic judge
    assert "Answer A:\na2" in seen[1][0]  # alice's round-1 winner defends
    assert "Answer A:\nb1" in seen[1][1]  # bob's unparseable verdict kept b1
    bb.close(lm)
    # personas are cached: a new backbone on the same cache writes none
    again, res = _backbone(tmp_path, monkeypatch, pairs, reward="judge", persona_max_new_tokens=6,
                           persona_max_pairs=2)
    again.fit(lm, samples, res)
    assert again.metrics()["backbone_personas_generated"] == 0
    assert again.selector.personas == bb.selector.personas


def test_bad_reward_model_values_are_named_at_start_up() -> None:
    from fints_repro.compose import compose_run

    for override, key in [("backbone.reward_model.n=0", "backbone.reward_model.n"),
                          ("backbone.reward_model.reward=vote", "backbone.reward_model.reward"),
                          ("backbone.reward_model.base=lora", "backbone.reward_model.base"),
                          ("backbone.reward_model.train.lr=0", "backbone.reward_model.train.lr"),
                          ("backbone.reward_model.judge_template=hi",
                           "backbone.reward_model.judge_template")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            compose_run(["backbone=reward_model", override])


# ------------------------------------------------------------------ the whole pipeline


