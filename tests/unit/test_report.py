"""The multirun report on a tiny 2 × 2 sweep run through Hydra's own multirun launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from fints_repro.report import write_report


def _job(seed: int, method: str, rougeL: float) -> dict:
    return {"status": "ok", "seed": seed, "method": method, "rougeL": rougeL}


def test_seed_table_means_and_paired_differences_as_computed_by_hand() -> None:
    import statistics

    from fints_repro.report import seed_columns, seed_table

    rows = [_job(0, "rag", 0.40), _job(1, "rag", 0.50), _job(2, "rag", 0.30),
            _job(0, "rag+caa", 0.42), _job(1, "rag+caa", 0.49), _job(2, "rag+caa", 0.35),
            _job(0, "lora", 0.10), _job(1, "lora", 0.20),
            _job(0, "lora+caa", 0.13), _job(1, "lora+caa", 0.26),
            {"status": "failed", "seed": 2, "method": "lora", "rougeL": None}]
    table = {t["method"]: t for t in seed_table(rows, [], ["rougeL"])}
    sd = statistics.stdev
    assert table["rag"]["rougeL"] == f"{0.4:.4f} ± {sd([0.4, 0.5, 0.3]):.4f}"
    assert table["rag"]["seeds"] == 3 and "Δ vs" not in table["rag"]
    # paired per seed: (0.42-0.40, 0.49-0.50, 0.35-0.30)
    d = [0.02, -0.01, 0.05]
    assert table["rag+caa"]["Δ vs"] == "rag"
    assert table["rag+caa"]["ΔrougeL"] == f"{statistics.mean(d):.4f} ± {sd(d):.4f}"
    # lora's failed seed-2 job: two seeds, both paired
    assert table["lora+caa"]["seeds"] == 2
    assert table["lora+caa"]["ΔrougeL"] == f"{0.045:.4f} ± {sd([0.03, 0.06]):.4f}"

    # several backbones: one "Δ vs" column naming each row's backbone
    printed, cols = seed_columns(list(table.values()), [], ["rougeL"])
    assert cols == ["method", "seeds", "rougeL", "Δ vs", "ΔrougeL"]
    assert [(t["method"], t.get("Δ vs")) for t in printed] == [
        ("rag", None), ("rag+caa", "rag"), ("lora", None), ("lora+caa", "lora")]
    # one backbone: the column names say which
    one = seed_table([r for r in rows if r["method"].startswith("rag")], [], ["rougeL"])
    printed, cols = seed_columns(one, [], ["rougeL"])
    assert cols == ["method", "seeds", "rougeL", "ΔrougeL vs rag"]
    assert printed[1]["ΔrougeL vs rag"] == table["rag+caa"]["ΔrougeL"] and "Δ vs" not in printed[1]


def test_report_of_a_function_calling_sweep_has_per_type_columns_and_a_result_heatmap(tmp_path: Path) -> None:
    """Metric names come from the task: a seed sweep of function calling tabulates function
    and result accuracy and their per-type means; a layer x strength sweep draws the
    heatmap of the primary metric (overall result accuracy)."""
    import json

    task = {"name": "function_calling", "metrics": ["function_accuracy", "result_accuracy"],
            "primary": "result_accuracy"}

    def job(root: Path, i: int, over: list[str], methods: dict) -> None:
        d = root / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in over))
        (d / "metrics.json").write_text(json.dumps({"task": task, "methods": methods}))

    def m(f, r, rs):
        return {"n": 2, "function_accuracy": f, "result_accuracy": r, "search/n": 1,
                "search/function_accuracy": f, "search/result_accuracy": rs}

    seeds = tmp_path / "seeds"
    job(seeds, 0, ["seed=0"], {"rag": m(0.5, 0.2, 0.4), "rag+caa": m(1.0, 0.3, 0.5)})
    job(seeds, 1, ["seed=1"], {"rag": m(0.5, 0.4, 0.6), "rag+caa": m(0.5, 0.4, 0.8)})
    text = write_report(seeds)["seeds"].read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert header.split(" | ")[2:5] == ["function_accuracy", "result_accuracy", "search/function_accuracy"]
    assert "Δsearch/result_accuracy vs rag" in header
    row = next(line for line in text.splitlines() if line.startswith("| rag+caa"))
    # the last column, Δsearch/result_accuracy: (0.5 - 0.4, 0.8 - 0.6) paired per seed
    assert row.split(" | ")[-1] == "0.1500 ± 0.0707 |"

    grid = tmp_path / "grid"
    for i, (layer, scale) in enumerate([(1, 0.5), (1, 1), (2, 0.5), (2, 1)]):
        job(grid, i, [f"steering.layer={layer}", f"steering.scale={scale}"],
            {"rag": m(0.5, 0.2, 0.4), "rag+fine_grained": m(0.5, 0.1 * i, 0.4)})
    out = write_report(grid)
    assert out["heatmap"].name == "heatmap_result_accuracy.png" and out["heatmap"].stat().st_size > 0


def test_the_heatmap_takes_a_strength_and_the_one_other_swept_parameter(tmp_path: Path) -> None:
    """A layer is the row when swept; otherwise the one other swept parameter (SteerX's
    tau, -inf included) is; with two candidates for the row, or no strength, no heatmap."""
    import json

    from fints_repro.report import heatmap_axes

    assert heatmap_axes(["steering.layer", "steering.scale"]) == ("steering.layer", "steering.scale")
    assert heatmap_axes(["steering.scale", "steering.steerx.token_threshold"]) == ("steering.steerx.token_threshold", "steering.scale")
    assert heatmap_axes(["steering.layer", "steering.scale", "steering.k"]) == ("steering.layer", "steering.scale")
    assert heatmap_axes(["steering.scale", "steering.k", "steering.steerx.token_threshold"]) is None
    assert heatmap_axes(["steering.layer", "steering.k"]) is None
    assert heatmap_axes(["steering.scale"]) is None

    task = {"name": "generation", "metrics": ["rougeL"], "primary": "rougeL"}
    i = 0
    for seed in (0, 1):
        for tau in ("-inf", "0"):
            for scale in (0.5, 1):
                d = tmp_path / str(i)
                (d / ".hydra").mkdir(parents=True)
                (d / ".hydra" / "overrides.yaml").write_text(
                    f"- steering.steerx.token_threshold={tau}\n- steering.scale={scale}\n- seed={seed}\n")
                (d / "metrics.json").write_text(json.dumps({"task": task, "methods": {
                    "rag": {"n": 2, "rougeL": 0.4}, "rag+steerx": {"n": 2, "rougeL": 0.1 * i}}}))
                i += 1
    out = write_report(tmp_path)
    assert out["heatmap"].name == "heatmap_rougeL.png" and out["heatmap"].stat().st_size > 0
    assert "steering.steerx.token_threshold" in out["seeds"].read_text().splitlines()[4]
    # each cell: the mean over the 2 seeds of that (tau, scale); job i has rougeL 0.1 i and
    # seed 1's jobs are 4 after seed 0's
    from fints_repro.report import collect, heatmap_grid

    rows_, cols, grid = heatmap_grid(collect(tmp_path), "rag+steerx", "steering.steerx.token_threshold",
                                     "steering.scale", "rougeL")
    assert rows_ == ["-inf", "0"] and cols == ["0.5", "1"]
    assert [pytest.approx(r) for r in [[0.2, 0.3], [0.4, 0.5]]] == grid


def test_a_folder_readme_states_the_recorded_provenance_and_every_table(tmp_path: Path) -> None:
    from fints_repro.report import write_folder_readme

    (tmp_path / "b.md").write_text("| x |\n|---|\n| 2 |\n")
    (tmp_path / "a.md").write_text("| y |\n|---|\n| 1 |\n")
    prov = {"commit": "abc123", "date": "2026-12-07 12:00 UTC",
            "machine": {"cpu": "CPU X", "cpu_cores": 2, "torch": "2.13.0+cpu", "threads": 2}}
    out = write_folder_readme(tmp_path, "python scripts/s.py --out x", prov, note="A note.")
    assert out.read_text() == (
        f"# {tmp_path.name}\n\n- command: `python scripts/s.py --out x`\n- commit: abc123\n"
        "- date: 2026-12-07 12:00 UTC\n- machine: CPU X (2 cores), torch 2.13.0+cpu, 2 threads\n\n"
        "A note.\n\n## a.md\n\n| y |\n|---|\n| 1 |\n\n## b.md\n\n| x |\n|---|\n| 2 |\n")


def test_readme_cli_outside_git_says_the_run_recorded_no_commit(tmp_path: Path) -> None:
    from fints_repro.report import main

    (tmp_path / "t.md").write_text("table\n")
    main(["readme", str(tmp_path), "--command", "make x"])
    assert (tmp_path / "README.md").read_text().splitlines()[:5] == [
        f"# {tmp_path.name}", "", "- command: `make x`", "- commit: not recorded by the run",
        "- machine: not recorded by the run"]


def test_every_results_folder_has_a_readme() -> None:
    results = Path(__file__).resolve().parents[2] / "results"
    assert [d.name for d in sorted(results.iterdir()) if d.is_dir()
            and not (d / "README.md").exists()] == []
