"""All prompt text the framework writes around a task's inputs: the zero-shot and RAG
prompts, and the pair generator's prompt and how its answer is read. Backbones, steering
methods and the pair builder call these; the templates themselves are dataset settings
(``dataset.*_template``)."""

from __future__ import annotations

from typing import Sequence

from fints_repro.config import DatasetConfig
from fints_repro.data.schema import HistoryItem
from fints_repro.text import pattern, search


def truncate_words(text: str, n: int | None) -> str:
    if n is None:
        return text
    words = text.split()
    return text if len(words) <= n else " ".join(words[:n]) + " ..."


def render_with_history(d: DatasetConfig, text: str, items: Sequence[HistoryItem]) -> str:
    """``text`` after ``items`` by the dataset's RAG templates (``{i}``: the item's 0-based
    position, the authors' "Historical sample i"); no items: ``text`` alone."""
    if not items:
        return text
    shown = [d.history_template.format(i=i, input=truncate_words(h.input, d.history_max_words),
                                       output=h.output)
             for i, h in enumerate(items)]
    return d.rag_prompt_template.format(history=d.history_separator.join(shown), input=text)


def zero_shot_prompt(d: DatasetConfig, text: str) -> str:
    """``text`` in ``dataset.zero_shot_template``; an input that starts with
    ``dataset.zero_shot_keep_prefix`` keeps its own opening (the template's text before
    ``{input}`` is left out)."""
    template = d.zero_shot_template
    if d.zero_shot_keep_prefix and text.startswith(d.zero_shot_keep_prefix):
        template = "{input}" + template.split("{input}", 1)[1]
    return template.format(input=text)


def _inner(text: str, template: str) -> str:
    """``text`` without the template's fixed beginning when it already has it (a training
    sample's full input, "Generate a headline for the following article: ..."), so the
    template does not add it twice."""
    prefix = template.split("{input}")[0] if "{input}" in template else ""
    return text[len(prefix):] if prefix and text.startswith(prefix) else text


def item_question(item: HistoryItem, dataset: DatasetConfig, layout: str = "compact") -> str:
    """An item's task question. ``compact``: ``dataset.question_template`` (an input that
    already is the whole question stays as it is); ``authors``: the item's input as it is
    when it starts with ``dataset.authors_keep_prefix`` (their ``startswith('Generate')``),
    else ``dataset.authors_question_template``."""
    if layout == "authors":
        keep = dataset.authors_keep_prefix
        if keep and item.input.startswith(keep):
            return item.input
        return dataset.authors_question_template.format(input=item.input)
    t = dataset.question_template
    return t.format(input=_inner(item.input, t))


def generator_prompt(others: Sequence[HistoryItem], item: HistoryItem, dataset: DatasetConfig,
                     layout: str = "compact") -> str:
    """The generator's user turn (before any chat template).

    ``compact``: the other users' items as ``Historical sample`` lines (as task questions,
    their inputs cut to ``dataset.history_max_words`` like RAG prompts), a blank line, then
    the item's question. ``authors``: ``dataset.pair_prompt_template`` with the item's task
    input and the other users' items by ``dataset.authors_history_template`` (raw inputs,
    untruncated, numbered from 0, joined by ``dataset.authors_history_separator``)."""
    if layout == "authors":
        history = dataset.authors_history_separator.join(
            dataset.authors_history_template.format(i=i, input=o.input, output=o.output)
            for i, o in enumerate(others))
        return dataset.pair_prompt_template.format(input=item_question(item, dataset, layout),
                                                   history=history)
    t = dataset.question_template
    lines = [
        f"Historical sample {i}:\n Q: "
        f"{t.format(input=truncate_words(_inner(o.input, t), dataset.history_max_words))}"
        f". \n A: {o.output}."
        for i, o in enumerate(others)
    ]
    return "\n".join(lines) + "\n\n" + item_question(item, dataset)


def extract_answer(generation: str, dataset: DatasetConfig, layout: str = "compact") -> str:
    """What a generation contributes as the ``rejected`` side ("" = no pair).

    ``compact``: the stripped generation. ``authors`` (their ``generate``): the stripped
    text after the last ``</think>``, then group 1 of the first ``dataset.pair_answer_regex``
    match, as it is ("" without a match; a null regex keeps the whole text)."""
    text = generation.strip()
    if layout != "authors":
        return text
    text = text.split("</think>")[-1]
    if dataset.pair_answer_regex is None:
        return text
    m = search(pattern(dataset.pair_answer_regex, "dataset.pair_answer_regex"), text)
    return m.group(1) if m else ""
