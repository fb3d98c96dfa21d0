"""Extraction against explicit recomputations written here.

- ``answer_means`` at attn, mlp and resid equals, per sequence, one *unpadded* forward pass
  of question ids + answer ids, read independently (resid: ``output_hidden_states``;
  attn/mlp: a hook of this file on the module), averaged over the answer positions only —
  with several sequences of different lengths in batches smaller than the input, so the
  right padding and the length sort are exercised;
- ``attn_read="residual"`` reads layer input + attention output;
- ``answer_tokenization="joint"`` tokenises question + answer as one string and averages
  from len(tokens(question)) on (the authors' way); it is part of the cache key, while
  ``separate`` keeps the key it always had;
- ``pair_vectors`` = chosen mean - rejected mean, cached in a safetensors file whose
  metadata says what it holds; a second call runs no forward pass; other inputs, other file;
- the forward pass stops after the requested layer; bad requests fail loudly.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fints_repro.cache import content_hash
from fints_repro.config import ModelConfig
from fints_repro.models.loading import LoadedModel, load_model
from fints_repro.preferences.pairs import Pair
from fints_repro.steering.extract import answer_means, pair_vectors, tokenize_pair_texts
from fints_repro.steering.sites import SteeringError, decoder_layers, site_module
from fints_repro.steering.store import load_vectors, vector_metadata

LAYER = 2
# Lengths deliberately unsorted and all different, so the length sort and right padding matter.
QUESTIONS = [
    "Generate a headline: the council met",
    "Q?",
    "Generate a headline for the following article: a long article about rivers and floods",
    "tell me",
    "Generate a headline: markets",
]
ANSWERS = [
    "Council votes",
    "yes, a much longer answer than the question itself here",
    "Floods",
    "a medium answer",
    "Stocks fall sharply after the report",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _lm(arch: str) -> LoadedModel:
    return load_model(ModelConfig(name=f"tiny_random_{arch}", source="tiny_random", arch=arch,
                                  dtype="float32", device="cpu"))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request) -> LoadedModel:
    return _lm(request.param)


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return _lm("llama")


def _ids(lm: LoadedModel, question: str, answer: str, joint: bool = False) -> tuple[list[int], int]:
    q = lm.tokenizer(question)["input_ids"]
    if joint:  # one string, answer from len(tokens(question)) on
        return lm.tokenizer(question + answer)["input_ids"], len(q)
    a = lm.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    return q + a, len(q)


@torch.no_grad()
def _reference(lm: LoadedModel, question: str, answer: str, layer: int,
               joint: bool = False) -> dict[str, torch.Tensor]:
    """One unpadded forward pass; each site read independently, averaged over answer tokens.
    ``attn_residual`` = layer input (hidden_states[layer]) + attention output."""
    ids, start = _ids(lm, question, answer, joint)
    got: dict[str, torch.Tensor] = {}

    def rec(name):
        def hook(module, args, output):
            got[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    handles = [site_module(lm.model, layer, s).register_forward_hook(rec(s)) for s in ("attn", "mlp")]
    try:
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    acts = {
        "attn": got["attn"][0],
        "mlp": got["mlp"][0],
        "resid": out.hidden_states[layer + 1][0],
        "attn_residual": out.hidden_states[layer][0] + got["attn"][0],
    }
    assert all(a.shape[0] == len(ids) for a in acts.values())
    return {k: a[start:].mean(0) for k, a in acts.items()}


def _reference_stack(lm, questions, answers, layer, key, joint=False):
    return torch.stack([_reference(lm, q, a, layer, joint)[key] for q, a in zip(questions, answers)])


def test_answer_means_equal_unpadded_single_passes(lm: LoadedModel) -> None:
    seqs = [_ids(lm, q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    lengths = [len(ids) for ids, _ in seqs]
    assert len(set(lengths)) == len(lengths) and lengths != sorted(lengths, reverse=True)
    got = answer_means(lm, QUESTIONS, ANSWERS, LAYER, ["attn", "mlp", "resid"], batch_size=2,
                       progress=False)
    assert set(got) == {"attn", "mlp", "resid"}
    for site in ("attn", "mlp", "resid"):
        want = _reference_stack(lm, QUESTIONS, ANSWERS, LAYER, site)
        assert got[site].dtype == torch.float32 and got[site].shape == want.shape
        torch.testing.assert_close(got[site], want, rtol=1e-5, atol=1e-5)
    # The mean is over the answer tokens only: the whole-sequence mean is something else.
    ids, start = seqs[0]
    with torch.no_grad():
        hs = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert (hs[LAYER + 1][0].mean(0) - got["resid"][0]).abs().max() > 1e-3
    # Batch size does not change the values (one sequence per batch = no padding at all).
    alone = answer_means(lm, QUESTIONS, ANSWERS, LAYER, ["mlp"], batch_size=1, progress=False)
    torch.testing.assert_close(alone["mlp"], got["mlp"], rtol=1e-5, atol=1e-5)


def test_attn_read_residual_is_layer_input_plus_attention_output(lm: LoadedModel) -> None:
    res = answer_means(lm, QUESTIONS, ANSWERS, LAYER, ["attn", "mlp"], attn_read="residual",
                       batch_size=3, progress=False)
    out = answer_means(lm, QUESTIONS, ANSWERS, LAYER, ["attn"], attn_read="output",
                       batch_size=3, progress=False)
    want = _reference_stack(lm, QUESTIONS, ANSWERS, LAYER, "attn_residual")
    torch.testing.assert_close(res["attn"], want, rtol=1e-5, atol=1e-5)
    assert (res["attn"] - out["attn"]).abs().max() > 1e-2
    # attn_read only changes what attn reads
    torch.testing.assert_close(res["mlp"], _reference_stack(lm, QUESTIONS, ANSWERS, LAYER, "mlp"),
                               rtol=1e-5, atol=1e-5)


def test_joint_tokenization_is_question_plus_answer_as_one_string(lm: LoadedModel) -> None:
    seqs = tokenize_pair_texts(lm, QUESTIONS, ANSWERS, "joint")
    for (ids, start), q, a in zip(seqs, QUESTIONS, ANSWERS):
        assert ids == lm.tokenizer(q + a)["input_ids"] and start == len(lm.tokenizer(q)["input_ids"])
    assert seqs != tokenize_pair_texts(lm, QUESTIONS, ANSWERS, "separate")
    got = answer_means(lm, QUESTIONS, ANSWERS, LAYER, ["attn", "mlp"], attn_read="residual",
                       answer_tokenization="joint", batch_size=2, progress=False)
    for site, key in (("attn", "attn_residual"), ("mlp", "mlp")):
        want = _reference_stack(lm, QUESTIONS, ANSWERS, LAYER, key, joint=True)
        torch.testing.assert_close(got[site], want, rtol=1e-5, atol=1e-5)
        sep = _reference_stack(lm, QUESTIONS, ANSWERS, LAYER, key)
        assert (got[site] - sep).abs().max() > 1e-3


def test_joint_boundary_follows_the_question_token_count() -> None:
    """With a tokenizer whose tokens merge across the join, the answer is still every
    position from len(tokens(question)) on (the authors' slicing)."""

    class Words:  # one token per whitespace word, BOS first
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [([0] if add_special_tokens else []) + [len(w) for w in t.split()]
                                  for t in texts]}

    lm = LoadedModel(None, Words(), "fp", "words")
    (ids, start), = tokenize_pair_texts(lm, ["write the head"], ["line now"], "joint")
    assert ids == [0, 5, 3, 8, 3] and start == 4  # "headline" merged: one answer token
    (ids, start), = tokenize_pair_texts(lm, ["write the head"], ["line now"], "separate")
    assert ids == [0, 5, 3, 4, 4, 3] and start == 4


def _pairs() -> list[Pair]:
    return [
        Pair("u1", f"i{j}", QUESTIONS[j], ANSWERS[j], ANSWERS[(j + 2) % len(ANSWERS)] + " no", 0.0, 0)
        for j in range(len(QUESTIONS))
    ]


class _CountForwards:
    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1

    def remove(self):
        self.handle.remove()


def test_pair_vectors_recomputed_cached_and_keyed(llama: LoadedModel, tmp_path: Path) -> None:
    lm, pairs, sites = llama, _pairs(), ["attn", "mlp"]
    counter = _CountForwards(lm.model)
    try:
        first = pair_vectors(lm, pairs, LAYER, sites, batch_size=2, cache_dir=tmp_path, progress=False)
        n_first = counter.n
        counter.n = 0
        second = pair_vectors(lm, pairs, LAYER, sites, batch_size=2, cache_dir=tmp_path, progress=False)
        n_second = counter.n
    finally:
        counter.remove()
    assert n_first == 2 * 3  # chosen and rejected, 5 sequences each in batches of 2
    assert n_second == 0
    assert set(first) == set(second) == set(sites)
    for s in sites:
        assert torch.equal(first[s], second[s])
        want = torch.stack([_reference(lm, p.prompt, p.chosen, LAYER)[s]
                            - _reference(lm, p.prompt, p.rejected, LAYER)[s] for p in pairs])
        torch.testing.assert_close(first[s], want, rtol=1e-5, atol=1e-5)
        assert first[s].abs().max() > 1e-3

    (path,) = (tmp_path / "vectors").glob("*.safetensors")
    meta = vector_metadata(path)
    assert meta["model"] == lm.fingerprint
    assert meta["layer"] == LAYER and meta["sites"] == sorted(sites)
    assert meta["attn_read"] == "output"
    assert meta["hidden_size"] == 64 and meta["n_pairs"] == len(pairs)
    assert isinstance(meta["data_hash"], str) and meta["data_hash"]
    on_disk = load_vectors(path)
    assert all(torch.equal(on_disk[s], first[s]) for s in sites)

    # Any change of the inputs is another file (and other vectors).
    changed = list(pairs)
    changed[1] = Pair(**{**pairs[1].__dict__, "rejected": "something else entirely"})
    other = pair_vectors(lm, changed, LAYER, sites, batch_size=2, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "vectors").glob("*.safetensors"))) == 2
    assert not torch.allclose(other["attn"][1], first["attn"][1])
    assert torch.allclose(other["attn"][0], first["attn"][0], atol=1e-5)
    new_meta = [vector_metadata(p) for p in (tmp_path / "vectors").glob("*.safetensors") if p != path]
    assert new_meta[0]["data_hash"] != meta["data_hash"]

    deeper = pair_vectors(lm, pairs, LAYER + 1, sites, batch_size=2, cache_dir=tmp_path, progress=False)
    files = list((tmp_path / "vectors").glob("*.safetensors"))
    assert len(files) == 3
    assert {vector_metadata(p)["layer"] for p in files} == {LAYER, LAYER + 1}
    assert not torch.allclose(deeper["mlp"], first["mlp"])

    pair_vectors(lm, pairs, LAYER, sites, attn_read="residual", batch_size=2, cache_dir=tmp_path,
                 progress=False)
    files = list((tmp_path / "vectors").glob("*.safetensors"))
    assert len(files) == 4
    assert sorted(vector_metadata(p)["attn_read"] for p in files) == ["output"] * 3 + ["residual"]

    # The key: the recipe (`separate` adds nothing to it; one user's pairs per batch,
    # whose last bits differ from mixed batches', is in it) and the pairs; `joint` is
    # another file, and says so in its metadata.
    recipe = {"model": lm.fingerprint, "layer": LAYER, "sites": sorted(sites),
              "attn_read": "output", "answer_join": "space", "mean": "answer_tokens",
              "batches": "per_user"}
    assert path.name == f"{content_hash([recipe, meta['data_hash']])}.safetensors"
    assert meta["answer_tokenization"] == "separate"
    joint = pair_vectors(lm, pairs, LAYER, sites, answer_tokenization="joint", batch_size=2,
                         cache_dir=tmp_path, progress=False)
    files = list((tmp_path / "vectors").glob("*.safetensors"))
    assert len(files) == 5
    assert sorted(vector_metadata(p)["answer_tokenization"] for p in files) == ["joint"] + ["separate"] * 4
    assert not torch.allclose(joint["attn"], first["attn"])


def test_extraction_stops_after_the_requested_layer(llama: LoadedModel) -> None:
    lm, layer = llama, 1
    layers = decoder_layers(lm.model)
    ran: list[int] = []
    handles = [layers[i].register_forward_hook(lambda *a, i=i: ran.append(i)) for i in range(len(layers))]
    try:
        got = answer_means(lm, QUESTIONS, ANSWERS, layer, ["attn", "mlp", "resid"], batch_size=2,
                           progress=False)
        assert ran and max(ran) == layer  # 3 batches through layers 0..1, none deeper
        assert sorted(set(ran)) == [0, 1] and len(ran) == 2 * 3
    finally:
        for h in handles:
            h.remove()
    for site in ("attn", "mlp", "resid"):
        torch.testing.assert_close(got[site], _reference_stack(lm, QUESTIONS, ANSWERS, layer, site),
                                   rtol=1e-5, atol=1e-5)


def test_vectors_of_another_dtype_are_not_reused(tmp_path: Path) -> None:
    cfg = ModelConfig(name="tiny_random_llama", source="tiny_random", arch="llama", device="cpu")
    lm16 = load_model(replace(cfg, dtype="bfloat16"))
    lm32 = load_model(replace(cfg, dtype="float32"))
    v16 = pair_vectors(lm16, _pairs(), LAYER, ["attn"], cache_dir=tmp_path, progress=False)
    v32 = pair_vectors(lm32, _pairs(), LAYER, ["attn"], cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "vectors").glob("*.safetensors"))) == 2
    assert not torch.equal(v16["attn"], v32["attn"])


class _NoWhitespaceTokens:
    """A tokenizer that, like some real ones, gives no token for a whitespace-only text."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, texts, **kw):
        enc = self._tok(texts, **kw)
        if kw.get("add_special_tokens", True) is False:
            enc["input_ids"] = [[] if not t.strip() else ids for t, ids in zip(texts, enc["input_ids"])]
        return enc


def test_bad_requests_fail_loudly(llama: LoadedModel, tmp_path: Path) -> None:
    lm = LoadedModel(llama.model, _NoWhitespaceTokens(llama.tokenizer), llama.fingerprint, llama.name)
    with pytest.raises(SteeringError, match="answer 1 has no tokens"):
        answer_means(lm, ["q one", "q two"], ["fine", ""], LAYER, ["attn"], progress=False)
    with pytest.raises(SteeringError, match="unknown site"):
        answer_means(llama, QUESTIONS, ANSWERS, LAYER, ["ffn"], progress=False)
    with pytest.raises(SteeringError, match="unknown site"):
        pair_vectors(llama, _pairs(), LAYER, ["attn", "ffn"], cache_dir=tmp_path, progress=False)
    with pytest.raises(SteeringError, match="attn_read"):
        answer_means(llama, QUESTIONS, ANSWERS, LAYER, ["attn"], attn_read="foo", progress=False)
    with pytest.raises(SteeringError, match="attn_read"):
        pair_vectors(llama, _pairs(), LAYER, ["attn"], attn_read="foo", cache_dir=tmp_path,
                     progress=False)
    with pytest.raises(SteeringError, match="answer_tokenization"):
        answer_means(llama, QUESTIONS, ANSWERS, LAYER, ["attn"], answer_tokenization="glued",
                     progress=False)
    with pytest.raises(SteeringError, match="answer_tokenization"):
        pair_vectors(llama, _pairs(), LAYER, ["attn"], answer_tokenization="glued",
                     cache_dir=tmp_path, progress=False)
    with pytest.raises(SteeringError, match="outside the model"):
        answer_means(llama, QUESTIONS, ANSWERS, 4, ["attn"], progress=False)
    assert not (tmp_path / "vectors").exists() or not list((tmp_path / "vectors").iterdir())


def test_a_batch_never_mixes_groups_so_a_groups_means_are_its_own_to_the_bit(lm: LoadedModel) -> None:
    """groups (pair_vectors: each pair's user): every batch holds one group's sequences,
    and a group's means, bit for bit, are those of extracting that group alone (what
    keeps a user's vectors the same in every part of a sharded experiment)."""
    n = len(QUESTIONS)
    groups = ["b" if i % 2 else "a" for i in range(n)]
    batches: list[list[int]] = []

    def record(rows):
        batches.append(list(rows))
        return contextlib.nullcontext()

    both = answer_means(lm, QUESTIONS, ANSWERS, LAYER, ["mlp"], batch_size=8, progress=False,
                        groups=groups, row_context=record)
    assert batches and all(len({groups[i] for i in rows}) == 1 for rows in batches)
    assert sorted(i for rows in batches for i in rows) == list(range(n))
    for g in ("a", "b"):
        idx = [i for i in range(n) if groups[i] == g]
        alone = answer_means(lm, [QUESTIONS[i] for i in idx], [ANSWERS[i] for i in idx], LAYER,
                             ["mlp"], batch_size=8, progress=False)
        assert torch.equal(both["mlp"][idx], alone["mlp"])
