"""The project against a reference of the authors' code (KounianhuaDu/Fints), written here
from a reading of it and independent of the project's hooks:

- ``_TheirAttn`` / ``_TheirBlock`` wrap a decoder layer the way their
  ``ChatModels/model_wrapper.py`` does (``AttnWrapper``, ``BlockOutputWrapper``): the
  attention wrapper keeps the attention output; with internal decodings on, the block
  wrapper adds the layer input to that same tensor *in place* (so what they store as the
  "attn" activation is the mid-block residual) and re-runs the MLP on it for the "mlp"
  activation. Injection: the block runs, then ``α·v_attn`` is added to the attention
  output (at every position: ``add_vector_from_position`` with no start position), the MLP
  re-runs on the steered stream, ``β·v_mlp`` is added to its output, and the layer output
  is rebuilt as input + steered attention + steered MLP.
- Their extraction (``train.py``, ``PerSteer.get_vectors``): question + answer tokenised as
  one string, the mean over positions >= len(tokens(question)), chosen minus rejected,
  one unpadded sequence at a time.
- Their prompt strings (``instruction.py``: ``build_rag_instruction``, ``get_his``;
  ``data_collect_para.py``: ``get_random_sample``, the ``print("...")`` extraction, the
  ``rouge`` package's ROUGE-L) against the dataset configs and ``pairs.py``.

Checked: the vectors the project extracts (``attn_read=residual`` and ``output``,
``answer_tokenization=joint``) equal the reference's; greedy generation under the
project's ``steer()`` gives the reference's tokens; the paper presets' prompts are theirs.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fints_repro.config import DatasetConfig, ModelConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.models.loading import LoadedModel, load_model
from fints_repro.preferences.pairs import Pair
from fints_repro.steering.extract import pair_vectors
from fints_repro.steering.hooks import steer
from fints_repro.tasks.prompts import extract_answer, generator_prompt, item_question

from tests.conftest import compose

LAYER = 2
PAIRS = [
    ("Generate a headline for the following article: the council met on Monday",
     "Council Votes On Budget", "a very different and much longer rejected answer"),
    ("Q: rivers?", "Floods rise", "Nothing happened at all today"),
    ("Generate a headline: markets", "Stocks fall sharply after the report", "Up"),
]

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------
# The reference: their wrappers, as read from their code
# ----------------------------------------------------------------------------------------

class _TheirAttn(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn
        self.activations = None

    def forward(self, *args, **kwargs):
        out = self.attn(*args, **kwargs)
        self.activations = out[0]  # the attention output tensor itself, not a copy
        return out


def _their_add(matrix: torch.Tensor, vector: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``add_vector_from_position`` with ``from_pos=None``: every position >= min - 1, in place."""
    mask = (position_ids >= position_ids.min().item() - 1).unsqueeze(-1)
    matrix += mask.float() * vector
    return matrix


class _TheirBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        block.self_attn = _TheirAttn(block.self_attn)
        self.post_attention_layernorm = block.post_attention_layernorm
        self.save_internal_decodings = False
        self.reset()

    def reset(self):
        self.add_resid = self.add_attn = self.add_mlp = None
        self.activations = self.mlp_output = None
        self.block.self_attn.activations = None

    def forward(self, *args, **kwargs):
        output = self.block(*args, **kwargs)
        # transformers 4 layers returned a tuple, transformers 5 a tensor
        as_tuple = isinstance(output, tuple)
        hidden = output[0] if as_tuple else output
        self.activations = hidden
        if self.add_resid is not None:
            hidden = _their_add(hidden, self.add_resid, kwargs["position_ids"])
        if self.add_attn is not None:
            attn = self.block.self_attn.activations
            steered_attn = _their_add(attn, self.add_attn, kwargs["position_ids"])
            mlp_out = self.block.mlp(self.post_attention_layernorm(steered_attn + args[0]))
            if self.add_mlp is not None:
                mlp_out = _their_add(mlp_out, self.add_mlp, kwargs["position_ids"])
            hidden = args[0] + steered_attn + mlp_out
        elif self.add_mlp is not None:
            attn = self.block.self_attn.activations
            mlp_out = self.block.mlp(self.post_attention_layernorm(attn + args[0]))
            hidden = args[0] + attn + _their_add(mlp_out, self.add_mlp, kwargs["position_ids"])
        output = (hidden,) + tuple(output[1:]) if as_tuple else hidden
        if not self.save_internal_decodings:
            return output
        attn_output = self.block.self_attn.activations
        attn_output += args[0]  # the quirk: the stored "attn" activation becomes input + attention
        self.mlp_output = self.block.mlp(self.post_attention_layernorm(attn_output))
        return output


def _their_model(lm: LoadedModel) -> nn.Module:
    model = copy.deepcopy(lm.model)
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = _TheirBlock(layer)
    return model


@torch.no_grad()
def _their_means(model, tok, question: str, answer: str, internal: bool) -> dict[str, torch.Tensor]:
    """One pass of question + answer as one string; each site's mean over the answer."""
    ids = tok(question + answer)["input_ids"]
    start = len(tok(question)["input_ids"])
    block = model.model.layers[LAYER]
    for layer in model.model.layers:
        layer.reset()
        layer.save_internal_decodings = internal
    model(torch.tensor([ids]))
    got = {"attn": block.block.self_attn.activations[0, start:].mean(0),
           "resid": block.activations[0, start:].mean(0)}
    if internal:
        got["mlp"] = block.mlp_output[0, start:].mean(0)
    return got


def _their_vectors(model, tok, internal: bool) -> dict[str, torch.Tensor]:
    rows = [{k: c[k] - r[k] for k in c}
            for c, r in ((_their_means(model, tok, q, ch, internal),
                          _their_means(model, tok, q, rj, internal)) for q, ch, rj in PAIRS)]
    return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model(ModelConfig(name="tiny_random_llama", source="tiny_random", arch="llama",
                                  dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def theirs(lm) -> nn.Module:
    return _their_model(lm)


def _pairs() -> list[Pair]:
    return [Pair("u", f"i{j}", q, c, r, 0.0, 0) for j, (q, c, r) in enumerate(PAIRS)]


@pytest.fixture(scope="module")
def ours(lm, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    cache = tmp_path_factory.mktemp("vectors")
    return {read: pair_vectors(lm, _pairs(), LAYER, ["attn", "mlp", "resid"], attn_read=read,
                               answer_tokenization="joint", batch_size=2, cache_dir=cache,
                               progress=False)
            for read in ("residual", "output")}


def test_extracted_vectors_equal_the_reference(lm, theirs, ours, tmp_path) -> None:
    internal = _their_vectors(theirs, lm.tokenizer, internal=True)
    plain = _their_vectors(theirs, lm.tokenizer, internal=False)
    # Their "attn" with internal decodings on (the setting of their attn runs) is the
    # mid-block residual; with them off it is the true attention output.
    torch.testing.assert_close(ours["residual"]["attn"], internal["attn"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["output"]["attn"], plain["attn"], rtol=1e-5, atol=1e-5)
    for read in ("residual", "output"):
        torch.testing.assert_close(ours[read]["mlp"], internal["mlp"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[read]["resid"], internal["resid"], rtol=1e-5, atol=1e-5)
    # The two readings are different vectors (so the comparisons above can fail) ...
    assert (internal["attn"] - plain["attn"]).abs().max() > 1e-2
    # ... and their tokenisation matters: " " + answer tokenised apart gives other vectors.
    sep = pair_vectors(lm, _pairs(), LAYER, ["attn"], attn_read="residual",
                       answer_tokenization="separate", batch_size=2, cache_dir=tmp_path,
                       progress=False)
    assert (sep["attn"] - internal["attn"]).abs().max() > 1e-3


PROMPTS = ["Generate a headline for the following article: rain floods the valley",
           "Generate a headline: a new bridge opens downtown after years of delay"]


@torch.no_grad()
def _their_generate(model, tok, prompt: str, v_attn, v_mlp, n: int) -> list[int]:
    block = model.model.layers[LAYER]
    for layer in model.model.layers:
        layer.reset()
        layer.save_internal_decodings = False
    block.add_attn, block.add_mlp = v_attn, v_mlp
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False)
    block.reset()
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def _our_generate(lm: LoadedModel, prompt: str, vectors, n: int) -> list[int]:
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    with steer(lm.model, vectors, positions="all"):
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("read", ["residual", "output"])
def test_steered_greedy_generation_matches_the_reference(lm, theirs, ours, read) -> None:
    n = 12
    alpha, beta = 6.0, 4.0
    v_attn, v_mlp = ours[read]["attn"].mean(0), ours[read]["mlp"].mean(0)
    changed = 0
    for prompt in PROMPTS:
        want = _their_generate(theirs, lm.tokenizer, prompt, alpha * v_attn, beta * v_mlp, n)
        got = _our_generate(lm, prompt, {(LAYER, "attn"): alpha * v_attn,
                                         (LAYER, "mlp"): beta * v_mlp}, n)
        assert got == want
        plain = _their_generate(theirs, lm.tokenizer, prompt, None, None, n)
        assert plain == _our_generate(lm, prompt, {}, n)
        changed += plain != want
        # Steering the MLP on the unsteered stream (no re-run) is something else.
        mlp_only = _their_generate(theirs, lm.tokenizer, prompt, None, beta * v_mlp, n)
        assert mlp_only == _our_generate(lm, prompt, {(LAYER, "mlp"): beta * v_mlp}, n)
    assert changed  # the vectors do change the output, so equality is not vacuous

    # One forward pass, compared on the logits (finer than greedy tokens).
    ids = torch.tensor([lm.tokenizer(PROMPTS[1])["input_ids"]])
    block = theirs.model.layers[LAYER]
    for layer in theirs.model.layers:
        layer.reset()
    block.add_attn, block.add_mlp = alpha * v_attn, beta * v_mlp
    with torch.no_grad():
        want = theirs(ids).logits
        block.reset()
        with steer(lm.model, {(LAYER, "attn"): alpha * v_attn, (LAYER, "mlp"): beta * v_mlp}):
            got = lm.model(ids).logits
        plain = lm.model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_the_reference_wrapper_is_a_faithful_no_op_when_idle(lm, theirs) -> None:
    ids = torch.tensor([lm.tokenizer(PROMPTS[0])["input_ids"]])
    for layer in theirs.model.layers:
        layer.reset()
        layer.save_internal_decodings = True
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, lm.model(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# Their prompt strings (instruction.py / data_collect_para.py), typed from their code
# ----------------------------------------------------------------------------------------

def _their_lines(items: list[tuple[str, str]]) -> str:
    return "\n".join(f"Historical sample {idx}:\n Q: {q}. \n A: {a}." for idx, (q, a) in enumerate(items))


PY_FORMAT = "\nFormat the output in python code like this:\n```python\nprint(\"Your generated {} here\")\n```"


def _their_instruction(task: str, form: str, prompt: str, his: str) -> str:
    """build_rag_instruction for LaMP_4 / LaMP_5 / abstract_generation, forms raw and python."""
    if task == "LaMP_4":
        inp = prompt if prompt.startswith("Generate") else f"Generate a headline for the following article: {prompt}"
        if his:
            inp += f"\nFor your reference, here are the user's past QA pairs:\n {his}\n"
        return inp + ("Please only generate the most suitable one headline, except which no extra "
                      "text is needed." if form == "raw" else PY_FORMAT.format("headline"))
    if task == "LaMP_5":
        inp = f"Generate a title for the following abstract of a paper: {prompt}"
        if his:
            inp += f"For your reference, here are the user's past QA pairs:\n {his}\n"
        return inp + ("Please only generate the most suitable one abstract, except which no extra "
                      "text is needed." if form == "raw" else PY_FORMAT.format("title"))
    inp = prompt if prompt.startswith("Generate") else f"Generate an abstract for the title: {prompt}"
    inp += f"\nFor your reference, here are the user's past QA pairs:\n {his}\n"
    return inp + ("\nPlease only generate the most suitable one abstract, except which no extra "
                  "text is needed." if form == "raw" else PY_FORMAT.format("abstract"))


@pytest.fixture(scope="module")
def datasets() -> dict[str, DatasetConfig]:
    out = {}
    for name in ("lamp_news", "lamp_scholarly", "longlamp_abstract", "demo_news"):
        out[name] = OmegaConf.to_object(compose([f"dataset={name}"])).dataset
    return out


TASK = {"lamp_news": "LaMP_4", "demo_news": "LaMP_4", "lamp_scholarly": "LaMP_5",
        "longlamp_abstract": "abstract_generation"}
OTHERS = [HistoryItem("o1", "Generate a headline for the following article: Dogs {bark} at night",
                      "Night \"Barking\" Study"),
          HistoryItem("o2", "A title: with a colon", "An abstract. Two sentences.")]


@pytest.mark.parametrize("name", sorted(TASK))
@pytest.mark.parametrize("item_input", [
    "Generate a headline for the following article: a storm hits the coast",
    "Generate an abstract for the title \"Sparse Routers\" using the following items: 1. moe",
    "Plain Title Of A Paper",
])
def test_generator_prompt_is_theirs(datasets, name, item_input) -> None:
    d = datasets[name]
    item = HistoryItem("x", item_input, "out")
    his = _their_lines([(o.input, o.output) for o in OTHERS])
    want = _their_instruction(TASK[name], "python", item_input, his)
    assert generator_prompt(OTHERS, item, d, "authors") == want
    # the task line alone is what their code puts first
    assert want.startswith(item_question(item, d, "authors"))


@pytest.mark.parametrize("name", ["lamp_news", "longlamp_abstract"])
def test_paper_presets_rag_prompt_is_theirs(name) -> None:
    from fints_repro.backbones.prompting import RAG

    d = OmegaConf.to_object(compose([f"+exp={name}"])).dataset
    rag = RAG.__new__(RAG)  # render reads the dataset config only
    rag.dataset = d
    items = [HistoryItem("h1", "An article about a long river " * 40, "River Story"),
             HistoryItem("h2", "Second text.", "Second Title"),
             HistoryItem("h3", "Third", "Third")]
    sample = Sample("s", "u", "Generate an abstract for the title \"X\"" if "abstract" in name
                    else "Generate a headline for the following article: today", None, tuple(items))
    want = _their_instruction(TASK[name], "raw", sample.input,
                              _their_lines([(h.input, h.output) for h in items]))
    assert rag.render(sample, items) == want  # untruncated, numbered from 0


def test_demo_rag_prompt_is_unchanged(datasets) -> None:
    from fints_repro.backbones.prompting import RAG

    rag = RAG.__new__(RAG)
    rag.dataset = d = datasets["demo_news"]
    items = [HistoryItem("h1", "w " * 60, "T1"), HistoryItem("h2", "short {i} text", "T2")]
    sample = Sample("s", "u", "Generate a headline for the following article: x", None, tuple(items))
    shown = ", and ".join(f'"{h.output}" is the title for "{h.input if len(h.input.split()) <= 40 else " ".join(h.input.split()[:40]) + " ..."}"'
                          for h in items)
    assert rag.render(sample, items) == f"{shown}.\n\n{sample.input}"
    assert d.history_max_words == 40


@pytest.mark.parametrize("generation", [
    '```python\nprint("Storm Hits Coast")\n```',
    "<think>let me think: print('no')</think>\nprint('Storm Hits Coast')",
    'Sure! print("A") and print("B")',
    "print(\"unterminated",
    'print("")',
    'print("multi\nline")',
    "The headline is: Storm Hits Coast",
])
def test_answer_extraction_is_theirs(datasets, generation) -> None:
    # their generate(): strip; keep what follows the last </think>; first print("...") group
    out = generation.replace("<|eot_id|>", "").replace("<|end_of_text|>", "").strip()
    if "</think>" in out:
        out = out.split("</think>")[-1]
    m = re.search(r'print\(["\'](.*?)["\']\)', out)
    want = m.group(1) if m else ""
    assert extract_answer(generation, datasets["lamp_news"], "authors") == want


@pytest.mark.parametrize("rejected, chosen", [
    ("floods hit the valley today", "Floods Hit The Valley"),
    ("Council votes. Budget passes", "Budget passes after council votes."),
    ("a b c d e f g", "g f e d c b a"),
    ("Stocks, fall; sharply!", "stocks fall sharply"),
])
def test_rouge_option_is_their_rouge_call(rejected, chosen) -> None:
    from rouge import Rouge

    from fints_repro.eval.rouge_pkg import rouge_l_f

    assert rouge_l_f(rejected, chosen) == Rouge().get_scores(rejected, chosen)[0]["rouge-l"]["f"]
