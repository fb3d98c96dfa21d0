"""``backbone=lora``: per-user adapters trained with transformers' Trainer, cached in PEFT's
format, generated in mixed-adapter batches, steering on top.

The users' outputs carry a user-specific marker, so an adapter has something of its
user's to learn even on a tiny random model: its loss on the user's held-out items falls
below the base model's. Mixed batches are checked row by row against generating each row
alone with only its adapter; leakage, resume after a kill, damaged adapters and the shared
model's state after the method are each checked directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")

import fints_repro.backbones.lora as lora_mod  # noqa: E402
from fints_repro.backbones import FitContext, backbone_schema, build_backbone  # noqa: E402
from fints_repro.backbones.lora import LoraSettings  # noqa: E402
from fints_repro.compose import compose_run  # noqa: E402
from fints_repro.config import (DatasetConfig, EvalConfig, GenerationConfig,  # noqa: E402
                                ModelConfig, TrainConfig)
from fints_repro.data.schema import HistoryItem, Sample  # noqa: E402
from fints_repro.errors import ConfigError  # noqa: E402
from fints_repro.models.chat import render_chat  # noqa: E402
from fints_repro.models.generation import DecodingParams, generate_batches  # noqa: E402
from fints_repro.models.loading import LoadedModel, load_model  # noqa: E402
from fints_repro.steering.hooks import steer  # noqa: E402
from fints_repro.tasks import build_task  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DATASET = DatasetConfig(name="demo_news", loader="demo", benchmark="demo_news", path="unused",
                        question_template="Headline: {input}", max_new_tokens=6)
MARKERS = {"alice": "AAA!", "bob": "zq#"}
FAST = TrainConfig(lr=2e-2, epochs=8, batch_size=2, weight_decay=0.0, warmup_ratio=0.0,
                   max_grad_norm=1.0, max_length=256)


def _lm(arch: str = "llama") -> LoadedModel:
    return load_model(ModelConfig(name=f"tiny_random_{arch}", source="tiny_random", arch=arch,
                                  dtype="float32", device="cpu"))


def _items(user: str, n: int, start: int = 0) -> tuple[HistoryItem, ...]:
    return tuple(HistoryItem(f"{user}-h{i}", f"story {i} about town {i % 3}",
                             f"{MARKERS[user]} news {i}") for i in range(start, start + n))


def _samples(users=("alice", "bob"), n_hist: int = 6) -> list[Sample]:
    return [Sample(f"{u}-t{j}", u, f"Headline: test story {j}", f"{MARKERS[u]} t", _items(u, n_hist))
            for u in users for j in range(2)]


def _backbone(tmp_path: Path, k: int = 0, **lora) -> tuple:
    cfg = backbone_schema()(name="lora", k=k, lora=LoraSettings(train=FAST, **lora))
    task = build_task(DATASET, GenerationConfig(), EvalConfig())
    resources = FitContext(cache_dir=tmp_path)
    return build_backbone(cfg, task, lambda: None), resources


def _generate(lm, texts, batch_size, context=None) -> list[str]:
    params = DecodingParams(max_new_tokens=6)
    out = {}
    for idx, gens in generate_batches(lm, texts, params, batch_size=batch_size, progress=False,
                                      batch_context=context):
        out.update(zip(idx, gens))
    return [out[i] for i in range(len(texts))]


@torch.no_grad()
def _loss(model, tok, examples, **kw) -> float:
    total, n = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        out = model(input_ids=ids, labels=labels, **kw)
        k = int((labels[:, 1:] != -100).sum())
        total, n = total + float(out.loss) * k, n + k
    return total / n


# ------------------------------------------------------------------ pieces


def test_target_modules_per_architecture_and_clear_errors() -> None:
    assert lora_mod.target_modules(_lm("llama").model, None) == ["q_proj", "v_proj"]
    assert lora_mod.target_modules(_lm("gpt2").model, None) == ["c_attn"]
    model = _lm("llama").model
    with pytest.raises(ConfigError, match=r"backbone.lora.target_modules.*no module named \['w_q'\]"):
        lora_mod.target_modules(model, ["w_q"])
    odd = SimpleNamespace(config=SimpleNamespace(model_type="my_new_arch"), named_modules=lambda: [])
    with pytest.raises(ConfigError, match=r"backbone.lora.target_modules: no default for the "
                                          r"architecture 'my_new_arch'"):
        lora_mod.target_modules(odd, None)


@pytest.mark.parametrize("template", ["chat", "raw"])
def test_training_example_puts_the_loss_on_the_output_and_eos_only(template: str) -> None:
    lm = _lm()
    tok = lm.tokenizer
    item = HistoryItem("h", "an article", "My Title")
    raw = "Generate a headline.\n article: {input} headline: {output}"
    ex = lora_mod.training_example(tok, item, "Headline: an article", template, raw, None, 512)
    answer = tok("My Title" + tok.eos_token, add_special_tokens=False)["input_ids"]
    if template == "chat":
        prompt = tok(render_chat(tok, "Headline: an article"), add_special_tokens=False)["input_ids"]
    else:
        prompt = tok("Generate a headline.\n article: an article headline: ")["input_ids"]
    assert ex["input_ids"] == prompt + answer
    assert ex["labels"] == [-100] * len(prompt) + answer
    cut = lora_mod.training_example(tok, item, "Headline: an article", template, raw, None,
                                    len(answer) + 4)
    assert len(cut["input_ids"]) == len(answer) + 4 and cut["labels"][-len(answer):] == answer


# ------------------------------------------------------------------ training and generation


def test_an_adapter_learns_its_user_and_leaves_the_model_as_found(tmp_path) -> None:
    lm = _lm()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    grads = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    backbone, res = _backbone(tmp_path)
    samples = _samples(("alice",))
    backbone.fit(lm, samples, res)
    held_out = backbone.training_examples(lm, _items("alice", 3, start=50))
    base_loss = _loss(lm.model, lm.tokenizer, held_out)
    peft_lm = backbone.model(lm)
    with backbone.user_context(lm, ["alice"]) as kw:
        adapted = _loss(peft_lm.model, lm.tokenizer, held_out, adapter_names=kw["adapter_names"])
    assert adapted < base_loss - 0.3, (adapted, base_loss)  # nats per output token
    # outside the backbone's contexts the adapter layers are off: the base model's loss
    assert _loss(peft_lm.model, lm.tokenizer, held_out) == pytest.approx(base_loss, rel=1e-6)
    backbone.close(lm)
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == grads[n], n
    assert not any("lora" in n for n, _ in lm.model.named_modules())
    assert not lm.model.training
    saved = list((tmp_path / "adapters").glob("*/alice"))
    assert len(saved) == 1
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in saved[0].iterdir()}
    assert backbone.metrics()["backbone_n_adapters_trained"] == 1


def _fitted(tmp_path, users):
    """A LoRA backbone fitted on ``users``' samples: (lm, backbone, samples, the model it
    generates with, the chat-rendered prompts)."""
    lm = _lm()
    backbone, res = _backbone(tmp_path)
    samples = _samples(users)
    backbone.fit(lm, samples, res)
    texts = [render_chat(lm.tokenizer, p.text) for p in backbone.build_prompts(samples)]
    return lm, backbone, samples, backbone.model(lm), texts


def test_mixed_adapter_batches_equal_each_row_alone_and_adapters_differ(tmp_path) -> None:
    lm, backbone, samples, peft_lm, texts = _fitted(tmp_path, ("alice", "bob"))
    mixed = _generate(peft_lm, texts, 4, lambda rows: backbone.model_context(lm, rows))
    alone = [_generate(peft_lm, [t], 1, lambda rows, i=i: backbone.model_context(lm, [i]))[0]
             for i, t in enumerate(texts)]
    assert mixed == alone
    base = _generate(peft_lm, texts, 4)  # no context: adapters off
    assert mixed != base
    a, b = samples[0], samples[2]
    assert a.input == b.input  # the same prompt, a different user
    assert mixed[0] != mixed[2]  # ... a different adapter, a different output
    assert backbone.row_identity(0) != backbone.row_identity(2) != ""
    backbone.close(lm)


def test_a_user_adapter_does_not_change_when_another_is_trained_after_it(tmp_path) -> None:
    lm = _lm()
    first, res = _backbone(tmp_path)
    alice = _samples(("alice",))
    first.fit(lm, alice, res)
    texts = [render_chat(lm.tokenizer, p.text) for p in first.build_prompts(alice)]
    out_a = _generate(first.model(lm), texts, 2, lambda rows: first.model_context(lm, rows))
    first.close(lm)
    second, _ = _backbone(tmp_path)
    both = _samples(("alice", "bob"))
    second.fit(lm, both, res)
    assert second.metrics()["backbone_n_adapters_loaded"] == 1  # alice's, from the cache
    assert second.metrics()["backbone_n_adapters_trained"] == 1  # bob's
    out_a2 = _generate(second.model(lm), texts, 2,
                       lambda rows: second.model_context(lm, [both.index(alice[i]) for i in rows]))
    assert out_a2 == out_a
    second.close(lm)


def test_steering_on_top_changes_the_output_again(tmp_path) -> None:
    lm, backbone, _, peft_lm, texts = _fitted(tmp_path, ("alice", "bob"))
    plain = _generate(peft_lm, texts, 4, lambda rows: backbone.model_context(lm, rows))
    H = lm.model.config.hidden_size
    vec = {(1, "mlp"): torch.randn(H, generator=torch.Generator().manual_seed(0)) * 8}

    @contextlib.contextmanager
    def steered(rows):  # each row's adapter, and the vector on top
        with backbone.model_context(lm, rows) as kw, steer(peft_lm.model, vec):
            yield kw

    assert _generate(peft_lm, texts, 4, steered) != plain
    backbone.close(lm)


# ------------------------------------------------------------------ cache, resume, damage, gaps


def test_a_killed_run_resumes_without_training_an_adapter_twice(tmp_path, monkeypatch) -> None:
    lm = _lm()
    calls: list[str] = []
    real = lora_mod.train_adapter

    def counted(model, tok, examples, cfg, targets, train, seed, out_dir):
        calls.append(out_dir.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while training the second user
        return real(model, tok, examples, cfg, targets, train, seed, out_dir)

    monkeypatch.setattr(lora_mod, "train_adapter", counted)
    backbone, res = _backbone(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        backbone.fit(lm, _samples(("alice", "bob")), res)
    assert calls == ["alice", "bob"]
    assert not list((tmp_path / "adapters").glob("*/bob"))  # nothing half-written in place
    backbone, _ = _backbone(tmp_path)
    backbone.fit(lm, _samples(("alice", "bob")), res)
    assert calls == ["alice", "bob", "bob"]
    assert backbone.metrics()["backbone_n_adapters_loaded"] == 1
    backbone.close(lm)


def _damage(folder: Path, how: str) -> str:
    """Damage a saved adapter ``how``; returns what the warning must say is wrong."""
    from safetensors.torch import load_file, save_file

    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:50])
        return "does not read"
    if how == "empty_config":
        config.write_text("{}")
        return "peft_type=None"
    if how == "config_not_json":
        config.write_text("{not json")
        return "does not read as JSON"
    if how == "config_deleted":
        config.unlink()
        return "adapter_config.json is missing"
    if how == "weights_deleted":
        weights.unlink()
        return "adapter_model.safetensors is missing"
    if how == "other_rank":
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": 4}))
        return "r=4, expected 8"
    tensors = load_file(str(weights))
    if how == "no_tensors":
        save_file({}, str(weights))
        return f"lacks {len(tensors)} of {len(tensors)} tensors"
    if how == "one_tensor_missing":
        tensors.pop(sorted(tensors)[0])
        save_file(tensors, str(weights))
        return f"lacks 1 of {len(tensors) + 1} tensors"
    if how == "wrong_shape":
        name = sorted(tensors)[0]
        tensors[name] = torch.zeros(3, 5)
        save_file(tensors, str(weights))
        return f"{name} is [3, 5]"
    raise AssertionError(how)


DAMAGE = ["truncated", "empty_config", "config_not_json", "config_deleted", "weights_deleted",
          "other_rank", "no_tensors", "one_tensor_missing", "wrong_shape"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_adapter_is_named_moved_aside_and_trained_again(tmp_path, caplog, how) -> None:
    lm = _lm()
    backbone, res = _backbone(tmp_path)
    backbone.fit(lm, _samples(("alice",)), res)
    backbone.close(lm)
    (folder,) = (tmp_path / "adapters").glob("*/alice")
    saved = {f.name: f.read_bytes() for f in folder.iterdir()}
    problem = _damage(folder, how)
    backbone, _ = _backbone(tmp_path)
    with caplog.at_level("WARNING", logger="fints_repro.backbones.adapters"):
        backbone.fit(lm, _samples(("alice",)), res)
    assert backbone.metrics()["backbone_n_adapters_trained"] == 1
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(folder) in warning and problem in warning and "'alice'" in warning
    assert folder.with_name("alice.corrupt").is_dir()  # kept for a look, out of the way
    # trained again from the same seed: the same adapter as the first time
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == saved
    out = _generate(backbone.model(lm), ["Headline: test story 0"], 1,
                    lambda rows: backbone.model_context(lm, [0]))
    assert len(out) == 1
    backbone.close(lm)


def test_the_expected_tensors_are_what_peft_saves(tmp_path) -> None:
    """lora_spec, computed from the model, against the trained adapters' files: LLaMA
    (linear layers) and GPT-2 (Conv1D, stored [in, out])."""
    from safetensors import safe_open

    from fints_repro.backbones.adapters import adapter_problem, lora_spec

    for arch in ("llama", "gpt2"):
        lm = _lm(arch)
        backbone, res = _backbone(tmp_path / arch)
        backbone.fit(lm, _samples(("alice",)), res)
        backbone.close(lm)
        (folder,) = (tmp_path / arch / "adapters").glob("*/alice")
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        targets = lora_mod.target_modules(lm.model, None)
        spec = lora_spec(lm.model, targets, 8, 8, "CAUSAL_LM")
        assert dict(spec.tensors) == saved and len(saved) == 2 * len(
            [n for n, _ in lm.model.named_modules() if n.rsplit(".", 1)[-1] in targets])
        assert adapter_problem(folder, spec) is None
        assert adapter_problem(folder, lora_spec(lm.model, targets, 16, 8, "CAUSAL_LM")) == (
            "adapter_config.json has r=8, expected 16")


def test_leftovers_of_a_killed_save_are_removed(tmp_path) -> None:
    lm = _lm()
    backbone, res = _backbone(tmp_path)
    backbone.fit(lm, _samples(("alice",)), res)
    backbone.close(lm)
    (folder,) = (tmp_path / "adapters").glob("*/alice")
    leftovers = [folder.with_name(".alice.tmpk1ll3d"), folder.with_name(".alice.tmp-trainerx9")]
    for d in leftovers:
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"half")
    other = folder.with_name(".bob.tmpq")  # another user's: not this one's to remove
    other.mkdir()
    backbone, _ = _backbone(tmp_path)
    backbone.fit(lm, _samples(("alice",)), res)
    assert backbone.metrics()["backbone_n_adapters_loaded"] == 1
    assert not any(d.exists() for d in leftovers) and other.exists()
    backbone.close(lm)


def test_an_adapter_that_still_does_not_load_is_an_error_naming_it(tmp_path, monkeypatch) -> None:
    from peft import PeftModel

    from fints_repro.errors import CacheError

    lm = _lm()
    backbone, res = _backbone(tmp_path)
    backbone.fit(lm, _samples(("alice",)), res)
    backbone.close(lm)

    def fail(*a, **kw):
        raise RuntimeError("Error(s) in loading state_dict for PeftModelForCausalLM: size mismatch")

    monkeypatch.setattr(PeftModel, "from_pretrained", fail)
    backbone, _ = _backbone(tmp_path)
    with pytest.raises(CacheError) as info:
        backbone.fit(lm, _samples(("alice",)), res)
    (folder,) = (tmp_path / "adapters").glob("*/alice")
    assert str(folder) in str(info.value) and f"rm -r {folder}" in str(info.value)
    assert "size mismatch" in str(info.value)
    backbone.close(lm)


def test_a_user_without_history_runs_the_base_model(tmp_path) -> None:
    lm = _lm()
    backbone, res = _backbone(tmp_path)
    samples = _samples(("alice",)) + [Sample("carol-t0", "carol", "Headline: test story 0", "x", ())]
    backbone.fit(lm, samples, res)
    assert backbone.metrics()["backbone_n_users_without_adapter"] == 1
    assert backbone.row_identity(len(samples) - 1) == ""
    texts = [render_chat(lm.tokenizer, p.text) for p in backbone.build_prompts(samples)]
    peft_lm = backbone.model(lm)
    got = _generate(peft_lm, texts, 4, lambda rows: backbone.model_context(lm, rows))
    assert got[-1] == _generate(peft_lm, texts[-1:], 1)[0]
    backbone.close(lm)


@pytest.mark.parametrize("train_on", ["auto", "history", "train_samples"])
def test_train_on_picks_what_each_adapter_learns_from(tmp_path, monkeypatch, train_on) -> None:
    """``history``: the user's history items; ``train_samples``: the user's training-split
    items (``resources.train_items()``); ``auto`` on text generation: history. The texts
    the Trainer gets are checked: their labelled tokens are those outputs + EOS."""
    lm = _lm()
    tok = lm.tokenizer
    split = {"alice": [HistoryItem("alice-tr0", "Headline: a training story", "AAA! trained"),
                       HistoryItem("alice-tr1", "Headline: another one", "AAA! again")]}
    seen: dict[str, list[str]] = {}
    real = lora_mod.train_adapter

    def spy(model, tok_, examples, *a, **kw):
        seen.setdefault("alice", []).extend(
            tok.decode([t for t in ex["labels"] if t != -100]) for ex in examples)
        return real(model, tok_, examples, *a, **kw)

    monkeypatch.setattr(lora_mod, "train_adapter", spy)
    backbone, res = _backbone(tmp_path, train_on=train_on)
    backbone.fit(lm, _samples(("alice",), n_hist=3), dataclasses.replace(res, train_items=lambda: split))
    from_split = train_on == "train_samples"
    want = [h.output for h in (split["alice"] if from_split else _items("alice", 3))]
    assert seen["alice"] == [w + tok.eos_token for w in want]
    assert backbone.metrics()["backbone_train_on"] == ("train_samples" if from_split else "history")
    assert backbone.metrics()["backbone_train_items_per_user"] == len(want)
    backbone.close(lm)


def test_train_on_auto_is_the_tasks_choice_and_a_bad_value_is_named(tmp_path) -> None:
    from fints_repro.tasks.function_calling import FunctionCallingTask

    assert FunctionCallingTask.lora_train_on == "train_samples"  # calls, not review texts
    with pytest.raises(ConfigError, match=r"backbone.lora.train_on='profile'"):
        _backbone(tmp_path, train_on="profile")
    from tests.conftest import assert_config_error

    assert_config_error(["backbone=lora", "backbone.lora.train_on=profile"], "backbone.lora.train_on")


# ------------------------------------------------------------------ the whole pipeline


@pytest.mark.parametrize("ratio,steps", [(0.0, 0), (0.1, 4), (0.25, 10), (0.99, 40)])
def test_warmup_ratio_is_the_share_of_steps_both_trainers_warm_up_for(tmp_path, ratio, steps) -> None:
    """``backbone.*.train.warmup_ratio`` reaches transformers as a ratio of the run's steps
    (not as a number of steps): 40 steps at 0.25 warm up for 10."""
    from transformers import TrainingArguments
    from trl import RewardConfig

    from fints_repro.backbones.adapters import trainer_arguments
    from fints_repro.config import TrainConfig

    kw = trainer_arguments(TrainConfig(warmup_ratio=ratio), output_dir=str(tmp_path), seed=0, cpu=True)
    assert TrainingArguments(**kw).get_warmup_steps(40) == steps
    assert RewardConfig(**kw).get_warmup_steps(40) == steps


def test_a_warmup_ratio_of_one_or_more_is_named() -> None:
    with pytest.raises(ConfigError, match=r"backbone\.lora\.train\.warmup_ratio=1\.0: must be in \[0, 1\)"):
        compose_run(["backbone.lora.train.warmup_ratio=1.0"])
