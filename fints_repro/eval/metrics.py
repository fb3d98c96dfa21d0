"""One entry point for all metrics, over a registry of metric functions.

A metric function takes the predictions, the references (same length, non-empty, no
None) and the :class:`MetricOptions` (settings, and what a metric may need of each sample
beyond its reference: its preference, model-time values such as the unsteered model's
NLL), and returns ``(aggregate, per_sample)``:
``aggregate`` maps names to numbers (or a string describing how it was computed) and
``per_sample`` maps names to one value per sample. Adding a metric is one decorated
function::

    @register_metric("facc")
    def _facc(predictions, references, options):
        ...
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional, cast

from fints_repro.registry import Registry

from . import style
from .meteor import meteor
from .rouge import rouge

Aggregate = dict[str, float | str]
PerSample = dict[str, list[float]]


@dataclass(frozen=True)
class MetricOptions:
    """What the metric functions get besides predictions and references; each reads what
    it needs. ``preferences``: per sample, the style its user wants on it (the style
    demo's ``meta["preference"]``); ``values``: per-sample numbers a model computed for the
    predictions (``nll``: per-token NLL under the unsteered model; None where it has none);
    ``max_nll``: the style metric's fluency limit on ``nll`` (None: no NLL guard)."""

    bootstrap: int = 1000
    seed: int = 0
    preferences: Optional[Sequence[str]] = None
    values: Mapping[str, Sequence[Optional[float]]] = field(default_factory=dict)
    max_nll: Optional[float] = None


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


@register_metric("style")
def _style(
    predictions: Sequence[str], references: Sequence[str], options: MetricOptions
) -> tuple[Aggregate, PerSample]:
    """Per sample: ``style`` 1 when the prediction is fluent and has its preference
    (eval/style.py), ``casual`` / ``positive`` 1 when fluent and casual / positive,
    ``fluent`` 1 when neither degenerate nor (with ``max_nll``) its ``nll`` above it;
    aggregates are means (``nll``: over the samples that have one)."""
    prefs = options.preferences
    if prefs is None or len(prefs) != len(predictions):
        raise ValueError("the style metric needs each sample's preference (meta['preference'] "
                         "of dataset=demo_style's samples)")
    nll = options.values.get("nll")
    if options.max_nll is not None and (nll is None or len(nll) != len(predictions)):
        raise ValueError("the style metric's fluency guard (max_nll) needs each prediction's "
                         "per-token NLL under the unsteered model (values['nll'])")
    nll = nll if nll is not None else [None] * len(predictions)

    def fluent(text: str, value: Optional[float]) -> bool:
        if style.is_degenerate(text):
            return False
        return options.max_nll is None or (value is not None and value <= options.max_nll)

    ok = [fluent(p, v) for p, v in zip(predictions, nll)]
    rows: PerSample = {
        "style": [float(f and style.has_style(p, pref)) for p, pref, f in zip(predictions, prefs, ok)],
        "casual": [float(f and style.is_casual(p)) for p, f in zip(predictions, ok)],
        "positive": [float(f and style.is_positive(p)) for p, f in zip(predictions, ok)],
        "fluent": [float(f) for f in ok],
    }
    agg: Aggregate = {k: statistics.fmean(v) for k, v in rows.items()}
    known = [v for v in nll if v is not None]
    if known:
        agg["nll"] = statistics.fmean(known)
    return agg, rows


def compute_metrics(
    names: list[str],
    predictions: Sequence[str],
    references: Sequence[str | None],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    preferences: Sequence[str] | None = None,
    values: Mapping[str, Sequence[float | None]] | None = None,
    max_nll: float | None = None,
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
    options = MetricOptions(bootstrap=bootstrap, seed=seed, preferences=preferences,
                            values=dict(values or {}), max_nll=max_nll)
    columns: PerSample = {}
    for name in names:
        agg, per_sample = METRICS.get(name)(predictions, checked_references, options)
        clash = (agg.keys() & aggregate.keys()) | (per_sample.keys() & columns.keys())
        if clash:
            raise ValueError(f"metric {name!r} reports keys already reported: {sorted(clash)}")
        aggregate.update(agg)
        columns.update(per_sample)
    return aggregate, [{k: v[i] for k, v in columns.items()} for i in range(n)]
