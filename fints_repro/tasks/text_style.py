"""Headlines scored for their user's style as well as against the gold text (the style demo,
``dataset=demo_style``): ``text_gen`` plus the ``style`` metric (fints_repro/eval/style.py),
whose fluency guard reads each prediction's per-token NLL under the unsteered model.

That NLL is a model-time value: the task names it in ``model_values``, the pipeline computes
it once per (model, prompt, prediction) (``stages.model_values``, cached on disk) and hands
it to ``score``; each row keeps it among its scores (``nll``), so a merge of a sharded
experiment scores again without the model.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from fints_repro.data.schema import Sample
from fints_repro.errors import DataError
from fints_repro.eval import compute_metrics
from fints_repro.tasks.base import TASKS, Scores
from fints_repro.tasks.text_gen import TextGenTask


@TASKS.register("text_style")
class TextStyleTask(TextGenTask):
    name = "text_style"
    # per-sample values a model computes for the predictions (stages.model_values)
    model_values = ("nll",)

    def __init__(self, dataset, generation, evaluation, seed=0):
        super().__init__(dataset, generation, evaluation, seed)
        if "style" not in dataset.metrics:
            raise DataError(f"dataset {dataset.name}: task_type=text_style scores with the style "
                            f"metric; dataset.metrics={list(dataset.metrics)} does not name it")
        self.metric_names += ("nll",)
        self.primary_metric = "style"

    def score_predictions(self, predictions: Sequence[str], samples: Sequence[Sample], seed: int,
                          values: Optional[Mapping[str, Sequence[Optional[float]]]] = None
                          ) -> Scores:
        missing = [s.id for s in samples if s.meta.get("preference") is None]
        if missing:
            raise DataError(f"dataset {self.dataset.name}: sample {missing[0]!r} has no "
                            f"meta['preference'] ({len(missing)} in all); the style metric "
                            "needs the style demo's samples", record=missing[0])
        nll = list((values or {}).get("nll") or [None] * len(samples))
        agg, per_sample = compute_metrics(
            list(self.dataset.metrics), list(predictions), [s.target for s in samples],
            bootstrap=self.evaluation.bootstrap, seed=seed,
            preferences=[s.meta["preference"] for s in samples], values={"nll": nll},
            max_nll=self.dataset.style_max_nll)
        for row, v in zip(per_sample, nll):
            row["nll"] = v
        return Scores(dict(agg), per_sample)
