"""Metrics of fints_repro.eval, each checked against a recomputation written here."""

from __future__ import annotations

import warnings
from fractions import Fraction
from types import SimpleNamespace

import nltk
import numpy as np
import pytest

from fints_repro.eval import compute_metrics, metrics
from fints_repro.eval import meteor as meteor_mod
from fints_repro.eval.meteor import meteor, tokenize
from fints_repro.eval.postprocess import fints_first_line, postprocess
from fints_repro.eval.rouge import MODULE_PATH, load_rouge, rouge


def f_measure(matches: int, n_pred: int, n_ref: int) -> Fraction:
    """F1 from a match count: P = m/|pred|, R = m/|ref|, F = 2PR/(P+R)."""
    if matches == 0:
        return Fraction(0)
    p, r = Fraction(matches, n_pred), Fraction(matches, n_ref)
    return 2 * p * r / (p + r)


# Tokens by the rouge_score default rule: lowercase, non-[a-z0-9] -> space, split; no stemming.
# Each case: prediction, reference, hand-counted ROUGE-1 F, hand-counted ROUGE-L F.
ROUGE_CASES = [
    # pred [mat on the cat] (4), ref [the cat on the mat] (5).
    # Unigram overlap (clipped counts): mat, on, the, cat = 4.
    # LCS: "on the" or "the cat" = 2 ("mat" comes first in pred, last in ref).
    ("mat on the cat", "the cat on the mat", f_measure(4, 4, 5), f_measure(2, 4, 5)),
    # pred [covid 19 cases rise] (4), ref [covid 19 cases fall sharply] (5): the hyphen and
    # the capitals vanish. Overlap covid, 19, cases = 3, LCS = 3.
    ("COVID-19 Cases Rise!", "covid 19 cases fall sharply", f_measure(3, 4, 5), f_measure(3, 4, 5)),
    # pred [dogs running fast] (3), ref [the dog runs fast] (4): no stemmer, so dogs/dog and
    # running/runs do not match. Overlap fast = 1, LCS = 1.
    ("Dogs running fast.", "The dog runs fast", f_measure(1, 3, 4), f_measure(1, 3, 4)),
]
PREDS = [c[0] for c in ROUGE_CASES]
REFS = [c[1] for c in ROUGE_CASES]
HAND_R1 = [float(c[2]) for c in ROUGE_CASES]
HAND_RL = [float(c[3]) for c in ROUGE_CASES]


def test_rouge_per_sample_and_mean_match_hand_counts() -> None:
    result = rouge(PREDS, REFS, bootstrap=0)
    assert result.rouge1 == pytest.approx(HAND_R1, abs=1e-12)
    assert result.rougeL == pytest.approx(HAND_RL, abs=1e-12)
    assert result.aggregate == pytest.approx(
        {"rouge1": sum(HAND_R1) / 3, "rougeL": sum(HAND_RL) / 3}, abs=1e-12
    )
    # The cases were chosen so that ROUGE-1 and ROUGE-L differ on the first one.
    assert result.rouge1[0] != pytest.approx(result.rougeL[0])


def test_rouge_bootstrap_is_median_of_seeded_resampled_means() -> None:
    seed, n_boot = 7, 200
    rng = np.random.default_rng(seed)
    f = np.array([HAND_R1, HAND_RL]).T
    means = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(f), size=len(f))
        means.append(f[idx].mean(axis=0))
    expected = np.median(np.array(means), axis=0)

    agg = rouge(PREDS, REFS, bootstrap=n_boot, seed=seed).aggregate
    assert agg["rouge1_bootstrap"] == pytest.approx(expected[0], abs=1e-12)
    assert agg["rougeL_bootstrap"] == pytest.approx(expected[1], abs=1e-12)
    # Same seed, same answer.
    assert rouge(PREDS, REFS, bootstrap=n_boot, seed=seed).aggregate == agg


def test_evaluate_module_loaded_from_directory_agrees_with_rouge() -> None:
    import evaluate

    module = evaluate.load(str(MODULE_PATH.parent), keep_in_memory=True)
    out = module.compute(predictions=PREDS, references=REFS, bootstrap=100, seed=3, per_sample=True)
    result = rouge(PREDS, REFS, bootstrap=100, seed=3)
    assert out["rouge1_per_sample"] == result.rouge1
    assert out["rougeL_per_sample"] == result.rougeL
    assert {k: v for k, v in out.items() if not k.endswith("_per_sample")} == result.aggregate
    # Without the options the module returns the plain means only.
    assert set(module.compute(predictions=PREDS, references=REFS)) == {"rouge1", "rougeL"}
    assert load_rouge() is load_rouge()


# METEOR closed form: P = m/|hyp|, R = m/|ref|, Fmean = 10PR/(R+9P),
# penalty = 0.5 * (chunks/m)^3, score = (1 - penalty) * Fmean.
def meteor_closed_form(m: int, n_hyp: int, n_ref: int, chunks: int) -> float:
    p, r = Fraction(m, n_hyp), Fraction(m, n_ref)
    fmean = 10 * p * r / (r + 9 * p)
    return float((1 - Fraction(1, 2) * Fraction(chunks, m) ** 3) * fmean)


def test_meteor_matches_closed_form() -> None:
    # hyp [big red dog barked loudly] (5) vs ref [a big red dog barked at night] (7):
    # exact matches big red dog barked (case folded) = 4, in one chunk.
    hyp, ref = "Big red dog barked loudly", "a big red dog barked at night"
    expected = meteor_closed_form(4, 5, 7, 1)
    # hyp [a cat sat on mat] (5) vs ref [the cat was sitting on the mat] (7): cat, on, mat
    # match; sat/sitting share no Porter stem; hyp 1,3,4 vs ref 1,4,6 -> 3 chunks.
    hyp2, ref2 = "a cat sat on mat", "the cat was sitting on the mat"
    expected2 = meteor_closed_form(3, 5, 7, 3)

    result = meteor([hyp, hyp2], [ref, ref2])
    assert result.scores == pytest.approx([expected, expected2], abs=1e-12)
    assert result.aggregate["meteor"] == pytest.approx((expected + expected2) / 2, abs=1e-12)
    assert meteor([hyp, hyp2], [ref, ref2]) == result  # deterministic


def test_meteor_stem_matching() -> None:
    # hyp [the dog runs] vs ref [the dog is running]: the, dog exact; runs ~ running by the
    # Porter stem "run". hyp 0,1,2 vs ref 0,1,3 -> 2 chunks.
    result = meteor(["the dog runs"], ["the dog is running"])
    assert result.scores[0] == pytest.approx(meteor_closed_form(3, 3, 4, 2), abs=1e-12)
    # Without the stem match it would be 2 matches, 1 chunk: a different number.
    assert result.scores[0] != pytest.approx(meteor_closed_form(2, 3, 4, 1))


def test_meteor_reports_matching_stages_by_wordnet_presence() -> None:
    try:
        nltk.data.find("corpora/wordnet.zip")
        installed = True
    except LookupError:
        try:
            nltk.data.find("corpora/wordnet")
            installed = True
        except LookupError:
            installed = False
    expected = "exact+stem+wordnet" if installed else "exact+stem"
    assert meteor(["a"], ["a"]).aggregate["meteor_matching"] == expected


def test_meteor_uses_the_wordnet_object_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    lemma = SimpleNamespace(name=lambda: "fast")
    synset = SimpleNamespace(lemmas=lambda: [lemma])
    fake = SimpleNamespace(synsets=lambda w: [synset] if w == "quick" else [])
    monkeypatch.setattr(meteor_mod, "wordnet_matcher", lambda: (fake, "exact+stem+wordnet"))
    # hyp [quick car] vs ref [fast car]: car exact, quick ~ fast by the synonym: 2 matches, 1 chunk.
    result = meteor(["quick car"], ["fast car"])
    assert result.scores[0] == pytest.approx(meteor_closed_form(2, 2, 2, 1), abs=1e-12)
    assert result.aggregate["meteor_matching"] == "exact+stem+wordnet"


def test_meteor_tokenizer_splits_sentence_final_periods() -> None:
    tokens = tokenize("We study models. The results improve.")
    assert tokens == ["We", "study", "models", ".", "The", "results", "improve", "."]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "headline: Storm hits coast\nStorm hits the coast hard\nmore",
            "Storm hits the coast hard",
        ),
        ("\nx\nHere is a title for it\n  Real output line  \nsecond", "Real output line"),
        # Matched case-sensitively, as in the authors' code.
        ("A TITLE in capitals\nnext", "A TITLE in capitals"),
        ("abstract:\nWe propose a method.", "We propose a method."),
        ("   single line   ", "single line"),
        # No line qualifies: empty, as in the authors' code.
        ("the title:\n\nabstract", ""),
        ("  x  ", "x"),
        # Length is measured before stripping, as in the Fints code: " a" qualifies.
        (" a\nlonger line", "a"),
    ],
)
def test_fints_first_line(text: str, expected: str) -> None:
    assert fints_first_line(text) == expected


def test_postprocess_modes_and_unknown_mode() -> None:
    texts = ["  title: x\nGood line \n", " plain "]
    assert postprocess(texts, "strip") == ["title: x\nGood line", "plain"]
    assert postprocess(texts, "fints_first_line") == ["Good line", "plain"]
    with pytest.raises(ValueError, match="unknown post-processing mode"):
        postprocess(texts, "first_line")


def test_compute_metrics_aggregate_and_rows() -> None:
    agg, rows = compute_metrics(["rouge", "meteor"], PREDS, REFS, bootstrap=50, seed=1)
    assert agg["n"] == 3
    assert agg["rouge1"] == pytest.approx(sum(HAND_R1) / 3, abs=1e-12)
    assert {"rouge1_bootstrap", "rougeL_bootstrap", "meteor", "meteor_matching"} <= agg.keys()
    assert [r["rouge1"] for r in rows] == pytest.approx(HAND_R1, abs=1e-12)
    assert [r["rougeL"] for r in rows] == pytest.approx(HAND_RL, abs=1e-12)
    assert agg["meteor"] == pytest.approx(sum(r["meteor"] for r in rows) / 3, abs=1e-12)


def test_compute_metrics_empty_predictions() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_metrics(["rouge", "meteor"], [], []) == ({"n": 0}, [])


def test_compute_metrics_errors() -> None:
    with pytest.raises(ValueError, match="reference is None at index 1"):
        compute_metrics(["rouge"], ["a", "b"], ["a", None])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["rouge"], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["bleu"], ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        meteor(["a", "b"], ["a"])


def test_registry_adds_one_function_and_rejects_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "METRICS", metrics.METRICS.copy())

    @metrics.register_metric("exact")
    def _exact(predictions, references, options):  # type: ignore[no-untyped-def]
        hits = [float(p == r) for p, r in zip(predictions, references, strict=True)]
        return {"exact": sum(hits) / len(hits)}, {"exact": hits}

    agg, rows = compute_metrics(["exact"], ["a", "b"], ["a", "c"])
    assert agg == {"n": 2, "exact": 0.5}
    assert rows == [{"exact": 1.0}, {"exact": 0.0}]
    with pytest.raises(ValueError, match=r"metric 'rouge' is registered twice: by "
                                         r"fints_repro\.eval\.metrics\._rouge and by "
                                         r"tests\.unit\.test_metrics\.test_registry\S*\._exact$"):
        metrics.register_metric("rouge")(_exact)
