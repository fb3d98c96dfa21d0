"""ROUGE-1 / ROUGE-L by the LaMP convention, as an `evaluate` metric script.

The LaMP evaluation scores each prediction against its one reference with
``rouge_score.rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)`` and its
default tokenizer (lowercase, every run of characters outside ``[a-z0-9]`` becomes a
space, split), and reports the F-measure. The official script reports the median of an
unseeded 1000-sample bootstrap of the mean F; this script reports the plain mean and,
on request, the median of a bootstrap seeded with ``numpy.random.default_rng(seed)``.

Load it offline from its local path:
``evaluate.load("<dir>/lamp_rouge")`` or ``evaluate.load("<dir>/lamp_rouge/lamp_rouge.py")``.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer

_KEYS = ("rouge1", "rougeL")

_DESCRIPTION = """ROUGE-1 and ROUGE-L F-measure by the LaMP convention (rouge_score, no stemmer,
default tokenizer, one reference per prediction); plain mean and optional seeded bootstrap
median of the mean."""

_CITATION = """@inproceedings{lin-2004-rouge,
  title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
  author = "Lin, Chin-Yew",
  booktitle = "Text Summarization Branches Out",
  year = "2004",
  pages = "74--81",
}
@article{salemi2023lamp,
  title = {LaMP: When Large Language Models Meet Personalization},
  author = {Salemi, Alireza and Mysore, Sheshera and Bendersky, Michael and Zamani, Hamed},
  journal = {arXiv preprint arXiv:2304.11406},
  year = {2023},
}"""

_INPUTS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    bootstrap: number of bootstrap samples of the mean F (0, the default, skips it).
    seed: seed of ``numpy.random.default_rng`` for the bootstrap.
    per_sample: also return the per-sample F lists.
Returns:
    rouge1, rougeL: mean F-measure over the samples.
    rouge1_bootstrap, rougeL_bootstrap: median of the bootstrap means (when bootstrap > 0).
    rouge1_per_sample, rougeL_per_sample: per-sample F (when per_sample is true).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class LampRouge(evaluate.Metric):
    """ROUGE-1 and ROUGE-L F by the LaMP convention."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://arxiv.org/abs/2304.11406"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        bootstrap: int = 0,
        seed: int = 0,
        per_sample: bool = False,
    ) -> dict[str, float | list[float]]:
        if not predictions:
            raise ValueError("lamp_rouge needs at least one prediction")
        if bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
        scorer = rouge_scorer.RougeScorer(list(_KEYS), use_stemmer=False)
        # f[i, j]: F-measure of sample i for _KEYS[j].
        f = np.array(
            [[s[k].fmeasure for k in _KEYS] for s in map(scorer.score, references, predictions)],
            dtype=np.float64,
        )
        result: dict[str, float | list[float]] = {
            k: float(f[:, j].mean()) for j, k in enumerate(_KEYS)
        }
        if bootstrap:
            rng = np.random.default_rng(seed)
            n = len(f)
            # Both keys share each resample of the rows, as rouge_score's BootstrapAggregator does.
            means = np.stack([f[rng.integers(0, n, size=n)].mean(axis=0) for _ in range(bootstrap)])
            medians = np.median(means, axis=0)
            result.update({f"{k}_bootstrap": float(medians[j]) for j, k in enumerate(_KEYS)})
        if per_sample:
            result.update({f"{k}_per_sample": f[:, j].tolist() for j, k in enumerate(_KEYS)})
        return result
