"""Text generation scored against a gold text: LaMP-4 / LaMP-5, LongLaMP abstracts and the
embedded demo. A generation is post-processed (``generation.postprocess``) into the
prediction; ``dataset.metrics`` (ROUGE by the LaMP convention, METEOR) score it; a
contrastive pair is kept when ROUGE-L F(rejected, chosen) is below
``dataset.pair_rouge_threshold``."""

from __future__ import annotations

import functools
from typing import Sequence

from fints_repro.config import PairsConfig
from fints_repro.data.schema import Sample
from fints_repro.eval import compute_metrics
from fints_repro.eval.postprocess import POSTPROCESS
from fints_repro.tasks.base import TASKS, PairVerdict, Scores, Task

# Per-sample score names each metric reports (the aggregate adds bootstrap medians etc.).
_METRIC_SCORES = {"rouge": ("rouge1", "rougeL"), "meteor": ("meteor",),
                  "style": ("style", "casual", "positive", "fluent")}


@TASKS.register("text_gen")
class TextGenTask(Task):
    name = "text_gen"
    target_type = str
    scores_with_metric_functions = True  # dataset.metrics names functions of eval/metrics.py

    def __init__(self, dataset, generation, evaluation, seed=0):
        super().__init__(dataset, generation, evaluation, seed)
        self.metric_names = tuple(n for m in dataset.metrics for n in _METRIC_SCORES.get(m, (m,)))
        self.primary_metric = "rougeL" if "rougeL" in self.metric_names else self.metric_names[0]
        self._post = POSTPROCESS.get(generation.postprocess, "generation.postprocess")

    def parse(self, generation: str) -> str:
        return self._post(self.read(generation))

    def score_predictions(self, predictions: Sequence[str], samples: Sequence[Sample],
                          seed: int, values=None) -> Scores:
        targets = [s.target for s in samples]
        if any(t is None for t in targets):  # an unlabelled split: predictions only
            return Scores({"n": len(samples)}, [{} for _ in samples])
        agg, per_sample = compute_metrics(list(self.dataset.metrics), list(predictions), targets,
                                          bootstrap=self.evaluation.bootstrap, seed=seed)
        return Scores(dict(agg), per_sample)

    @functools.cached_property
    def _rouge_score_l(self):
        from rouge_score import rouge_scorer

        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def accept_pair(self, chosen: str, rejected: str, pairs: PairsConfig | None = None) -> PairVerdict:
        """Kept when ROUGE-L F(rejected, chosen) < ``dataset.pair_rouge_threshold``, by
        ``steering.pairs.rouge_impl``: ``rouge_score`` (the LaMP convention) or ``rouge``
        (the `rouge` package, as the authors' code; a text it cannot score gives no pair)."""
        impl = pairs.rouge_impl if pairs is not None else "rouge_score"
        if impl == "rouge":
            from fints_repro.eval.rouge_pkg import rouge_l_f

            score = rouge_l_f(rejected, chosen)
            if score is None:
                return PairVerdict(False, float("nan"))
        else:
            score = self._rouge_score_l.score(chosen, rejected)["rougeL"].fmeasure
        return PairVerdict(score < self.dataset.pair_rouge_threshold, score)
