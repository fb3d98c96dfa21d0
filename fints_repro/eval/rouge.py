"""ROUGE-1 / ROUGE-L by the LaMP convention, through the package's local `evaluate` module.

The metric script lives in ``lamp_rouge/lamp_rouge.py`` (see it for the convention) and
is loaded from that local path, so no hub access is needed. ``evaluate`` is imported on
first use only: importing it pulls in transformers and takes seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

MODULE_PATH = Path(__file__).parent / "lamp_rouge" / "lamp_rouge.py"


@functools.cache
def load_rouge() -> evaluate.EvaluationModule:
    """The LaMP ROUGE `evaluate` module from its local path, loaded once per process.

    ``keep_in_memory`` keeps `evaluate` from writing Arrow cache files, so concurrent
    processes (e.g. a multi-run sweep) do not share on-disk state.
    """
    import evaluate

    return evaluate.load(str(MODULE_PATH), keep_in_memory=True)


@dataclass(frozen=True)
class RougeResult:
    """Per-sample F-measures and the aggregate.

    ``aggregate`` holds ``rouge1`` and ``rougeL`` (plain means) and, when a bootstrap was
    asked for, ``rouge1_bootstrap`` and ``rougeL_bootstrap`` (median of the bootstrap means).
    """

    rouge1: list[float]
    rougeL: list[float]
    aggregate: dict[str, float]


def rouge(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> RougeResult:
    """ROUGE-1 / ROUGE-L F of each prediction against its reference (LaMP convention).

    ``bootstrap`` is the number of resamples of the mean F (0 skips the bootstrap);
    ``seed`` seeds ``numpy.random.default_rng`` for it. Raises ValueError when the two
    lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up"
        )
    if not predictions:
        raise ValueError("rouge needs at least one prediction")
    out = load_rouge().compute(
        predictions=list(predictions),
        references=list(references),
        bootstrap=bootstrap,
        seed=seed,
        per_sample=True,
    )
    rouge1 = out.pop("rouge1_per_sample")
    rougeL = out.pop("rougeL_per_sample")
    return RougeResult(rouge1=rouge1, rougeL=rougeL, aggregate=out)
