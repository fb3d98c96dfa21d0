"""One entry point for all metrics, over a registry of metric functions.

A metric function takes the predictions, the references (same length, non-empty, no
None) and the :class:`MetricOptions`, and returns ``(aggregate, per_sample)``:
``aggregate`` maps names to numbers (or a string describing how it was computed) and
``per_sample`` maps names to one value per sample. Adding a metric is one decorated
function::

    @register_metric("facc")
    def _facc(predictions, references, options):
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from fints_repro.registry import Registry

from .meteor import meteor
from .rouge import rouge

Aggregate = dict[str, float | str]
PerSample = dict[str, list[float]]


@dataclass(frozen=True)
class MetricOptions:
    """Settings shared by the metric functions; each reads the ones it needs."""

    bootstrap: int = 1000
    seed: int = 0


MetricFn = Callable[[Sequence[str], Sequence[str], MetricOptions], tuple[Aggregate, PerSample]]

METRICS: Registry[MetricFn] = Registry("metric", package="fints_repro.eval")


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator adding a metric function to :data:`METRICS` under ``name``.

    Raises ValueError when ``name`` is already registered.
    """
    return METRICS.register(name)


@register_metric("rouge")
def _rouge(
    predictions: Sequence[str], references: Sequence[str], options: MetricOptions
) -> tuple[Aggregate, PerSample]:
    """ROUGE-1 / ROUGE-L F, LaMP convention: means and seeded bootstrap medians."""
    result = rouge(predictions, references, bootstrap=options.bootstrap, seed=options.seed)
    return dict(result.aggregate), {"rouge1": result.rouge1, "rougeL": result.rougeL}


@register_metric("meteor")
def _meteor(
    predictions: Sequence[str], references: Sequence[str], options: MetricOptions
) -> tuple[Aggregate, PerSample]:
    """NLTK METEOR, mean over samples, with the matching stages used."""
    result = meteor(predictions, references)
    return dict(result.aggregate), {"meteor": result.scores}


def compute_metrics(
    names: list[str],
    predictions: Sequence[str],
    references: Sequence[str | None],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, float | str], list[dict[str, float]]]:
    """Compute the named metrics; return ``(aggregate, per_sample_rows)``.

    ``aggregate`` always holds ``n``, the number of samples. With no predictions the
    result is ``({"n": 0}, [])``. Raises ValueError for an unknown or repeated name, a
    length mismatch, a None prediction or reference (naming its index), or two metrics
    that report the same key.
    """
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {METRICS.names()}")
    if len(set(names)) != len(names):
        raise ValueError(f"metric names repeat: {names}")
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up"
        )
    for kind, seq in (("prediction", predictions), ("reference", references)):
        missing = [i for i, x in enumerate(seq) if x is None]
        if missing:
            raise ValueError(f"{kind} is None at index {missing[0]} ({len(missing)} in all)")
    n = len(predictions)
    aggregate: dict[str, float | str] = {"n": n}
    if n == 0:
        return aggregate, []
    checked_references = cast(Sequence[str], references)  # None was ruled out above
    options = MetricOptions(bootstrap=bootstrap, seed=seed)
    columns: PerSample = {}
    for name in names:
        agg, per_sample = METRICS.get(name)(predictions, checked_references, options)
        clash = (agg.keys() & aggregate.keys()) | (per_sample.keys() & columns.keys())
        if clash:
            raise ValueError(f"metric {name!r} reports keys already reported: {sorted(clash)}")
        aggregate.update(agg)
        columns.update(per_sample)
    return aggregate, [{k: v[i] for k, v in columns.items()} for i in range(n)]
