"""A task owns what differs between benchmarks' *shapes* of problem (LaMP-style text
generation, function calling, ...), so that the pipeline, backbones, steering and reports
are written once:

- the target type of its samples (``target_type``);
- the prompt pieces: the question an input becomes, the retrieval query of a sample, the
  document a history item is retrieved as (backbones and steering use these);
- how a generation is parsed into a prediction (``parse``);
- how predictions are scored: per sample a dict of named scores, aggregated per run and
  per sample type (``score``); the names it reports (``metric_names``) and the one that
  ranks methods (``primary_metric``), which reports, sweeps and plots read;
- the criterion that accepts a contrastive pair (``accept_pair``).

Adding a task is one file here (a class registered in ``TASKS``) and the datasets that
name it (``dataset.task_type``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from fints_repro.config import DatasetConfig, EvalConfig, GenerationConfig, PairsConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.registry import Registry
from fints_repro.tasks.prompts import extract_answer, generator_prompt
from fints_repro.text import pattern, search, valid_unicode


@dataclass(frozen=True)
class PairVerdict:
    """Whether a (chosen, rejected) pair is kept, and the score that decided it."""

    keep: bool
    score: float


@dataclass
class Scores:
    """``aggregate``: named numbers (or strings saying how they were computed) for the run,
    with ``<type>/<name>`` entries per sample type where samples have types;
    ``per_sample``: one dict of named scores per sample, in sample order."""

    aggregate: dict[str, Any]
    per_sample: list[dict[str, Any]]


class Task:
    """Base class: the shared behaviour of every task; subclasses fill in the rest."""

    name: str = ""
    target_type: type = str
    # Scores each sample gets, and the one that ranks methods (reports, sweeps, plots).
    metric_names: tuple[str, ...] = ()
    primary_metric: str = ""
    # What a per-user adapter learns from under backbone.lora.train_on=auto: `history`
    # (the user's history items) or `train_samples` (the user's training tasks, gold outputs)
    lora_train_on: str = "history"

    def __init__(self, dataset: DatasetConfig, generation: GenerationConfig, evaluation: EvalConfig,
                 seed: int = 0):
        # seed: the run's (a generated dataset, e.g. the demos, depends on it)
        self.dataset, self.generation, self.evaluation = dataset, generation, evaluation
        self.seed = seed

    def check_inputs(self) -> None:
        """Before any model time: the files the task itself needs beyond the dataset (a
        ConfigError naming a missing one)."""

    # ---- prompt pieces -------------------------------------------------------------
    def question(self, item_input: str) -> str:
        """The task question a history item's input becomes (pairs, extraction)."""
        return self.dataset.question_template.format(input=item_input)

    def retrieval_query(self, sample: Sample) -> str:
        """The sample's input without the task's instruction prefix, or the first group of
        ``dataset.query_regex`` (the whole input where it does not match)."""
        if self.dataset.query_regex:
            m = search(pattern(self.dataset.query_regex, "dataset.query_regex", dotall=True),
                       sample.input)
            return m.group(1).strip() if m else sample.input
        prefix = self.dataset.query_strip_prefix
        if prefix and sample.input.startswith(prefix):
            return sample.input[len(prefix):].strip()
        return sample.input

    def history_document(self, item: HistoryItem) -> str:
        """What retrieval matches a query against (``dataset.history_document_template``)."""
        return self.dataset.history_document_template.format(input=item.input, output=item.output)

    # ---- outputs ---------------------------------------------------------------------
    def read(self, generation: str) -> str:
        """What the task reads of a generation: its first ``eval.max_read_chars``
        characters, valid Unicode (a lone surrogate, which a crafted cache entry may hold,
        as U+FFFD). Every parse, pair and reward input goes through it, so each stage's
        time is bounded and no writer or tokenizer meets a lone surrogate, whatever a
        model or a cache holds."""
        return valid_unicode(generation[: self.evaluation.max_read_chars])

    def parse(self, generation: str) -> Any:
        """The prediction a generation gives (of what ``read`` returns)."""
        raise NotImplementedError

    def reward_text(self, generation: str) -> str:
        """What a reward model or an LLM judge reads of a candidate generation, in the
        form the pairs' sides have (text tasks: the parsed prediction)."""
        return str(self.parse(generation))

    # Per-sample values a model computes for the predictions before they are scored
    # (``stages.model_values``: ``nll``, the per-token NLL under the unsteered model).
    model_values: tuple[str, ...] = ()

    def score_predictions(self, predictions: Sequence[Any], samples: Sequence[Sample],
                          seed: int, values: Mapping[str, Sequence[Any]] | None = None) -> Scores:
        raise NotImplementedError

    def score(self, predictions: Sequence[Any], samples: Sequence[Sample], seed: int,
              values: Mapping[str, Sequence[Any]] | None = None) -> Scores:
        """Per-sample and aggregate scores; adds per-type means where samples have types.
        ``values``: the ``model_values`` the task names, one per prediction."""
        scores = self.score_predictions(predictions, samples, seed, values)
        types = sorted({s.type for s in samples if s.type is not None})
        for t in types:
            rows = [sc for s, sc in zip(samples, scores.per_sample) if s.type == t]
            scores.aggregate[f"{t}/n"] = len(rows)
            for name in self.metric_names:
                vals = [r[name] for r in rows if isinstance(r.get(name), (int, float))]
                if vals:
                    scores.aggregate[f"{t}/{name}"] = statistics.fmean(vals)
        return scores

    def accept_pair(self, chosen: str, rejected: str, pairs: PairsConfig | None = None
                    ) -> PairVerdict:
        """Whether a (chosen, rejected) pair is contrastive enough to keep; ``pairs`` is
        the run's ``steering.pairs`` (e.g. which ROUGE implementation judges it)."""
        raise NotImplementedError

    def accept_pairs(self, triples: Sequence[tuple[str, str, HistoryItem]],
                     pairs: PairsConfig | None = None) -> list[PairVerdict]:
        """``accept_pair`` for many (chosen, rejected, item) at once (a task that executes
        calls batches them)."""
        return [self.accept_pair(c, r, pairs) for c, r, _ in triples]

    # ---- how the pair generator is prompted (preferences/pairs.py) ---------------------
    def pair_pool(self, items: Mapping[str, Sequence[HistoryItem]]) -> Mapping[str, Sequence[HistoryItem]]:
        """Per user, the items a generator prompt draws *other* users' items from
        (default: the items pairs are made from)."""
        return items

    def pair_prompt(self, others: Sequence[HistoryItem], item: HistoryItem, layout: str) -> str:
        """The generator's user turn for ``item`` with ``others`` (other users' items)."""
        return generator_prompt(others, item, self.dataset, layout)

    def pair_answer(self, generation: str, layout: str) -> str:
        """What a generation contributes as the rejected side ("" = no pair)."""
        return extract_answer(self.read(generation), self.dataset, layout)

    def task_text(self, item: HistoryItem) -> str:
        """An item's own text, undecorated (``steering.pairs.extraction_prompt=task_text``)."""
        return item.input

    def pair_sides(self, chosen: str, rejected: str, pairs: PairsConfig | None = None
                   ) -> tuple[str, str]:
        """The two sides as extraction reads them (default: as they are)."""
        return chosen, rejected

    def describe(self) -> dict[str, Any]:
        """What reports need to know (written into every run's metrics.json)."""
        return {"name": self.name, "metrics": list(self.metric_names),
                "primary": self.primary_metric}


TaskFactory = Callable[..., Task]
TASKS: Registry[TaskFactory] = Registry("task", package="fints_repro.tasks")


def build_task(dataset: DatasetConfig, generation: GenerationConfig, evaluation: EvalConfig,
               seed: int = 0) -> Task:
    return TASKS.get(dataset.task_type, "dataset.task_type")(dataset, generation, evaluation, seed)
