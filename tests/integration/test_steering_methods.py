"""steering methods: small runs (the unit checks: tests.unit.test_steering_methods)."""

from __future__ import annotations
import pytest
pytestmark = pytest.mark.usefixtures("one_thread")
from tests.unit.test_steering_methods import SHORT, _predictions, _run, _without_n_users  # noqa: E402


def test_a_lone_user_is_generated_exactly_like_the_unsteered_backbone(tiny_overrides, tmp_path) -> None:
    methods = ("methods=[{backbone: rag},{backbone: rag, steering: caa},"
               "{backbone: rag, steering: fine_grained}]")
    _, summary = _run(["+exp=demo_compare", *_without_n_users(tiny_overrides), "dataset.demo.n_users=1",
                       *SHORT, methods, "steering.alpha=50", "steering.beta=50"], tmp_path / "run")
    n = summary["n_samples"]
    assert summary["n_users"] == 1 and n == 2
    rag = _predictions(tmp_path / "run", "rag")
    assert "steering" not in rag[0]
    for name in ("rag+caa", "rag+fine_grained"):
        m = summary["methods"][name]
        assert m["steering_n_samples_unsteered"] == n and m["steering_n_samples_steered"] == 0
        assert m["steering_n_pairs"] == 0
        assert m["n_generated"] + m["n_cached"] == n
        rows = _predictions(tmp_path / "run", name)
        assert [r["generation"] for r in rows] == [r["generation"] for r in rag]
        assert [r["prompt"] for r in rows] == [r["prompt"] for r in rag]
        assert all(r["steering"]["steered"] is False for r in rows)
    # Unsteered rows are exactly the plain generations: they come from rag's cache.
    assert summary["methods"]["rag+caa"]["n_cached"] == n
    assert summary["methods"]["rag+fine_grained"]["n_cached"] == n


def test_steered_predictions_carry_their_pairs_and_strong_steering_changes_them(
    tiny_overrides, tmp_path
) -> None:
    from fints_repro.data.load import load_samples

    methods = "methods=[{backbone: rag},{backbone: rag, steering: fine_grained}]"
    # fidelity=ours: a random tiny model writes no print("...") line, so the authors'
    # generator layout would give it no pairs
    cfg, summary = _run(["+exp=demo", "fidelity=ours", *tiny_overrides, *SHORT, methods,
                         "steering.alpha=50",
                         "steering.beta=50", "steering.fine_grained.top_k=3"], tmp_path / "run")
    assert summary["n_users"] == 3
    history = {s.user: {h.id for h in s.history} for s in load_samples(cfg.dataset, seed=cfg.seed)}
    rag = _predictions(tmp_path / "run", "rag")
    fg = _predictions(tmp_path / "run", "rag+fine_grained")
    m = summary["methods"]["rag+fine_grained"]
    assert m["steering_n_pairs"] > 0
    assert m["steering_n_samples_steered"] + m["steering_n_samples_unsteered"] == len(fg)
    n_steered = 0
    for r in fg:
        st = r["steering"]
        if not st["steered"]:
            assert st["pairs"] == [] and st["weights"] == []
            continue
        n_steered += 1
        assert 1 <= len(st["pairs"]) <= 3 and len(st["weights"]) == len(st["pairs"])
        assert len(set(st["pairs"])) == len(st["pairs"])
        assert sum(st["weights"]) == pytest.approx(1.0, abs=1e-5)
        for p in st["pairs"]:
            item_id, attempt = p.rsplit("#", 1)
            assert item_id in history[r["user"]] and attempt == "0"
    assert n_steered == m["steering_n_samples_steered"] > 0
    assert [r["prompt"] for r in fg] == [r["prompt"] for r in rag]
    steered_ids = {r["id"] for r in fg if r["steering"]["steered"]}
    diff = [r["id"] for r, q in zip(fg, rag) if r["generation"] != q["generation"]]
    assert diff and set(diff) <= steered_ids
