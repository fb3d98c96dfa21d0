"""How long each stage takes on the texts a model (or a crafted cache) can hand it.

    python scripts/bench_untrusted_text.py [--out results/bench-untrusted-text]

1. ``parse_call`` (both modes) on adversarial shapes of 1 MiB: the slowest is the bound
   docs/reliability.md states;
2. the shapes that broke the readings they replaced (``raw_decode`` at every ``{`` and a
   lazy regular expression for fences; Python's ``re`` for config patterns and the judge's
   verdict; written out below) at growing sizes, before and now in one run;
3. every stage through its task (which reads ``eval.max_read_chars`` of a generation):
   parse, score, pair answer and filter, reward text, for text generation and function
   calling.

Writes ``bench.json`` and ``bench.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20
CALL = '{"name": "add_product_review", "arguments": {"review": "ok"}}'


def shapes(n: int) -> dict[str, str]:
    rnd = random.Random(0)
    return {
        "braces": "{" * n,
        "brackets": "[" * n,
        "fence + spaces": "```" + " " * n,
        "nested objects, unclosed": '{"a":' * (n // 5),
        "unclosed strings": '{"a":"' * (n // 6),
        "brace-quote": '{"' * (n // 2),
        "quotes": '"' * n,
        "escaped quotes": '\\"' * (n // 2),
        "small objects": '{"a":1}' * (n // 7),
        "one big object": "{" + '"a":1,' * (n // 6) + '"b":2}',
        "objects in an array": "[" + '{"a":{"b":[1,{"c":2}]}},' * (n // 25) + "1]",
        "structural soup": "".join(rnd.choices('{}[]":,\\ a1', k=n)),
        "print( repeated": 'print("' * (n // 7),
    }


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def old_lenient(text: str) -> None:
    """The reading parse_call replaced (lenient mode), without its call checks."""
    dec = json.JSONDecoder()
    for chunk in (text.strip(), *(m.group(1).strip() for m in _FENCE.finditer(text))):
        try:
            json.loads(chunk)
        except (ValueError, RecursionError):
            pass
    for m in re.finditer(r"\{", text):
        try:
            dec.raw_decode(text, m.start())
        except (ValueError, RecursionError):
            continue


def fastest(repeats: int, fn, *args) -> float:
    """The fastest of ``repeats`` calls (one when a call takes over 5 s): the machine's
    noise (other processes, frequency) only ever adds time."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
        if best > 5:
            break
    return best


def main(argv: list[str] | None = None) -> None:
    from fints_repro.compose import compose_run
    from fints_repro.config import DatasetConfig, EvalConfig, GenerationConfig, PairsConfig
    from fints_repro.data.pwab import pwab_samples, read_pwab
    from fints_repro.data.schema import HistoryItem, Sample
    from fints_repro.provenance import command_line, provenance
    from fints_repro.report import markdown, write_folder_readme
    from fints_repro.tasks import build_task
    from fints_repro.backbones.reward_judge import parse_verdict
    from fints_repro.tasks.function_calling import parse_call
    from fints_repro.text import pattern, search

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench-untrusted-text")
    ap.add_argument("--repeats", type=int, default=3, help="report the fastest of this many calls")
    args = ap.parse_args(argv)

    def timed(fn, *a) -> float:
        return fastest(args.repeats, fn, *a)

    rows = []
    for name, text in shapes(MIB).items():
        rows.append({"shape": name, "chars": len(text),
                     "lenient_s": round(timed(parse_call, text, "lenient"), 3),
                     "strict_s": round(timed(parse_call, text, "strict"), 3)})
        print(rows[-1], flush=True)

    answer = "print\\([\"'](.*?)[\"']\\)"  # the paper presets' dataset.pair_answer_regex
    python_verdict = re.compile(r"\s*(?i:(?:the\s+)?(?:better\s+)?answer(?:\s+is)?\s*[:\-]?\s*)?"
                                r"[\"'*(\[]*([AB])(?![A-Za-z0-9])")
    readers = {  # shape -> (what read it before, what reads it now)
        "braces": (old_lenient, lambda t: parse_call(t, "lenient")),
        "fence + spaces": (old_lenient, lambda t: parse_call(t, "lenient")),
        "nested objects, unclosed": (old_lenient, lambda t: parse_call(t, "lenient")),
        "print( repeated": (lambda t: re.search(answer, t),
                            lambda t: search(pattern(answer, "bench"), t)),
        "answer + spaces": (python_verdict.match, parse_verdict),
    }
    growth = []
    for name, (before, now) in readers.items():
        # the verdict's regex took 7 s on 16,000 spaces before: it stops there
        for n in (1024, 4096, 16384) if name == "answer + spaces" else (4096, 16384, 65536):
            text = "answer" + " " * n + "x" if name == "answer + spaces" else shapes(n)[name]
            old, new = timed(before, text), timed(now, text)
            growth.append({"shape": name, "chars": len(text), "before_s": round(old, 4),
                           "now_s": round(new, 4), "ratio": round(old / max(new, 1e-6), 1)})
            print(growth[-1], flush=True)

    text_dataset = DatasetConfig(name="demo_news", loader="demo", task="demo_news", path="-",
                                 metrics=["rouge", "meteor"])
    target = "City council approves new budget for schools. The vote was close"
    sample = Sample("s", "u", "Generate a headline for: x", target,
                    (HistoryItem("h", "An article.", target),))
    text_task = build_task(text_dataset, GenerationConfig(), EvalConfig(bootstrap=1000))
    d = compose_run(["dataset=pwab"]).dataset
    d = dataclasses.replace(d, path=str(ROOT / "tests" / "fixtures" / "pwab"))
    call_task = build_task(d, GenerationConfig(), EvalConfig())
    samples = pwab_samples(read_pwab(d.path), "test", product_info_template="\n{product}")[:1]
    call_task.score([call_task.parse(CALL)], samples, 0)  # builds the tools once

    def text_stages(g: str) -> None:
        text_task.score([text_task.parse(g)], [sample], 0)
        for layout in ("compact", "authors"):
            rejected = text_task.pair_answer(g, layout)
            for impl in ("rouge_score", "rouge"):
                text_task.accept_pair(target, rejected, PairsConfig(rouge_impl=impl))

    def call_stages(g: str) -> None:
        call_task.score([call_task.parse(g)], samples, 0)
        call_task.reward_text(g)

    text_stages("A short headline."), call_stages(CALL)  # load NLTK, ROUGE, MiniLM once
    stages = []
    for name, text in shapes(MIB).items():
        stages.append({"shape": name, "text_generation_s": round(timed(text_stages, text), 3),
                       "function_calling_s": round(timed(call_stages, text), 3)})
        print(stages[-1], flush=True)

    out = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "python": platform.python_version(), "repeats": args.repeats, "parse_1mib": rows, "before_vs_now": growth,
           "stages_1mib": stages,
           "slowest_parse_1mib_s": max(max(r["lenient_s"], r["strict_s"]) for r in rows),
           "slowest_stage_1mib_s": max(max(r["text_generation_s"], r["function_calling_s"])
                                       for r in stages)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(out, indent=2) + "\n")
    text = ("# Model output as data: time per call\n\n"
            "`python scripts/bench_untrusted_text.py` (" + out["machine"] + ", Python "
            + out["python"] + f"; the fastest of {args.repeats} calls, seconds)\n\n"
            "## parse_call on 1 MiB\n\n"
            + markdown(rows, ["shape", "chars", "lenient_s", "strict_s"])
            + "\n## The readings they replaced against them, same texts\n\n"
            + markdown(growth, ["shape", "chars", "before_s", "now_s", "ratio"])
            + "\n## Every stage through its task (reads 65,536 characters), on 1 MiB\n\n"
            + markdown(stages, ["shape", "text_generation_s", "function_calling_s"]))
    (args.out / "bench.md").write_text(text)
    write_folder_readme(args.out, command_line(), provenance())
    print(text)


if __name__ == "__main__":
    main()
