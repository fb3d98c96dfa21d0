"""From a dataset config to the list of samples a run evaluates.

Real data is read from ``dataset.path`` (under ``data.root``, default ``data/``,
``$FINTS_DATA_ROOT`` overrides it). When files are missing the run stops at once and says
which files it looked for and how to get them; it never falls back to other data. The
synthetic demo data is generated into the cache in the official LaMP-4 format and read
back through the same LaMP loader as the real data.

Each ``dataset.loader`` is a function in the ``LOADERS`` registry; a new data source is one
more ``@LOADERS.register("name")`` function.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from fints_repro.cache import FILE_MODE, make_dir, write_error
from fints_repro.config import DatasetConfig
from fints_repro.data import splits
from fints_repro.data.schema import Sample
from fints_repro.errors import CacheError, ConfigError, DataError, MissingDataError
from fints_repro.registry import Registry

log = logging.getLogger(__name__)

_DOWNLOAD = {"lamp4": "lamp4", "lamp5": "lamp5", "longlamp_abstract": "longlamp_abstract"}


def _missing(cfg: DatasetConfig, looked_for: list[str | Path]) -> MissingDataError:
    names = "\n  ".join(str(p) for p in looked_for)
    if cfg.benchmark == "pwab":
        from fints_repro.data.pwab import HINT

        return MissingDataError(
            f"dataset {cfg.name!r}: data files not found. Looked for:\n  {names}\n{HINT}; "
            f"then point the run at them with data.root=<data root> (or FINTS_DATA_ROOT).\n"
            f"To try the task without real data: python -m fints_repro.run +exp=demo_pwab")
    task = _DOWNLOAD.get(cfg.benchmark, cfg.benchmark)
    return MissingDataError(
        f"dataset {cfg.name!r}: data files not found. Looked for:\n  {names}\n"
        f"Get them (on a machine with internet) with:\n"
        f"  python scripts/download_data.py {task} --root <data root>\n"
        f"then point the run at them with data.root=<data root> (or FINTS_DATA_ROOT).\n"
        f"To try the framework without real data: python -m fints_repro.run +exp=demo"
    )


# dataset.loader -> a function (dataset config, seed) -> the split's samples, before any
# user or history selection.
LOADERS: Registry[Callable[[DatasetConfig, int], list[Sample]]] = Registry(
    "data loader", package="fints_repro.data")


@LOADERS.register("lamp")
def _read_lamp(cfg: DatasetConfig, seed: int) -> list[Sample]:
    """LaMP-4/5 from ``dataset.path``, in either layout ``lamp_candidates`` knows."""
    from fints_repro.data.lamp import lamp_candidates, lamp_paths, load_lamp

    questions, outputs = lamp_paths(Path(cfg.path), cfg.split, cfg.benchmark)
    if not questions.exists():
        raise _missing(cfg, [f"{q} (with {o.name} beside it)"
                             for q, o in lamp_candidates(Path(cfg.path), cfg.split, cfg.benchmark)])
    return load_lamp(questions, outputs if outputs.exists() else None, task=cfg.benchmark)


@LOADERS.register("longlamp")
def _read_longlamp(cfg: DatasetConfig, seed: int) -> list[Sample]:
    """LongLaMP from the file ``dataset.path``, or ``{split}.jsonl|.json|.parquet`` in it."""
    from fints_repro.data.longlamp import load_longlamp_abstract

    base = Path(cfg.path)
    candidates = [base] if base.is_file() else [
        base / f"{cfg.split}{ext}" for ext in (".jsonl", ".json", ".parquet")
    ]
    for path in candidates:
        if path.is_file():
            return load_longlamp_abstract(path)
    raise _missing(cfg, candidates)


def _generate_once(out: Path, done: Path, write: Callable[[Path], int], what: str) -> None:
    """Generated data written once into ``out``: into a temporary folder renamed into
    place, so that parallel jobs (a joblib sweep) never read a half-written file: the
    first rename wins, the others use it. ``done``: the file whose presence means ``out``
    is complete; ``write(folder)`` writes the files and returns a count for the log."""
    if done.exists():
        return
    make_dir(out.parent, f"dataset.path (where the {what} is generated)")
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
        try:
            n = write(tmp)
            for path in tmp.iterdir():
                os.chmod(path, FILE_MODE)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must be readable
            try:
                os.replace(tmp, out)
                log.info("wrote SYNTHETIC %s (%d records) to %s", what, n, out)
            except OSError as e:
                if not done.exists():  # not another job's finished copy: a real failure
                    raise CacheError(f"could not write the demo data into {out} ({e}); delete "
                                     f"it (rm -r {out}) and run again", path=str(out)) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a full disk, no permission
        raise write_error(out, f"the {what}", e) from e


def _spec_dir(cfg: DatasetConfig, spec: dict) -> Path:
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.path) / key


@LOADERS.register("demo")
def _read_demo(cfg: DatasetConfig, seed: int) -> list[Sample]:
    """The synthetic demo data, generated once per spec into ``dataset.path/<spec hash>``."""
    from fints_repro.data.demo import generate_demo_news, write_lamp_format
    from fints_repro.data.lamp import lamp_paths, load_lamp

    spec = {**asdict(cfg.demo), "seed": seed}
    out = _spec_dir(cfg, spec)
    questions, outputs = lamp_paths(out, "dev")

    def write(folder: Path) -> int:
        samples = generate_demo_news(**spec)
        write_lamp_format(samples, folder)
        return len(samples)

    _generate_once(out, questions, write, "demo data")
    return load_lamp(questions, outputs, task="lamp4")


@LOADERS.register("demo_style")
def _read_demo_style(cfg: DatasetConfig, seed: int) -> list[Sample]:
    """The synthetic style demo, generated once per spec into ``dataset.path/<spec hash>``;
    each sample's kind, preference and topic (``dev_styles.json``) into its meta, its type
    as ``demo_style.sample_type`` names it."""
    from fints_repro.data.demo_style import STYLES_FILE, generate_demo_style, sample_type, write_demo_style
    from fints_repro.data.lamp import lamp_paths, load_lamp, read_json

    spec = {**asdict(cfg.demo_style), "seed": seed}
    out = _spec_dir(cfg, spec)
    questions, outputs = lamp_paths(out, "dev")
    _generate_once(out, questions, lambda folder: write_demo_style(generate_demo_style(**spec), folder),
                   "style demo data")
    styles_path = out / STYLES_FILE
    styles = read_json(styles_path, hint="delete the folder and run again to regenerate it")
    samples = []
    for s in load_lamp(questions, outputs, task="lamp4"):
        style = styles.get(s.id) if isinstance(styles, dict) else None
        if not isinstance(style, dict) or not {"kind", "preference", "topic"} <= style.keys():
            raise DataError(f"sample {s.id!r} has no kind, preference and topic", file=str(styles_path),
                            record=s.id)
        samples.append(replace(s, meta={**s.meta, **style},
                               type=sample_type(style["kind"], style["preference"])))
    return samples


def pwab_root(cfg: DatasetConfig, seed: int) -> Path:
    """The folder with the PersonalWAB-format files: ``dataset.path`` (``pwab``), or the
    SYNTHETIC demo generated once per spec into ``dataset.path/<spec hash>`` (``demo_pwab``)."""
    if cfg.loader != "demo_pwab":
        return Path(cfg.path)
    from fints_repro.data.demo_pwab import write_demo_pwab

    spec = {**asdict(cfg.demo_pwab), "seed": seed}
    out = _spec_dir(cfg, spec)
    _generate_once(out, out / cfg.pwab.instructions_file,
                   lambda folder: write_demo_pwab(folder, **spec), "PersonalWAB-format demo data")
    return out


@functools.lru_cache(maxsize=4)
def _read_pwab_cached(root: str, instructions: str, history: str, products: str):
    from fints_repro.data.pwab import read_pwab

    return read_pwab(root, instructions, history, products)


def pwab_files(cfg: DatasetConfig, seed: int):
    """The validated PersonalWAB files of the dataset (read once per process)."""
    root = pwab_root(cfg, seed)
    if not (root / cfg.pwab.instructions_file).is_file():
        raise _missing(cfg, [root / cfg.pwab.instructions_file, root / cfg.pwab.history_glob,
                             root / cfg.pwab.products_glob])
    w = cfg.pwab
    return _read_pwab_cached(str(root), w.instructions_file, w.history_glob, w.products_glob)


@LOADERS.register("pwab")
@LOADERS.register("demo_pwab")
def _read_pwab(cfg: DatasetConfig, seed: int) -> list[Sample]:
    """PersonalWAB single-turn tasks of ``dataset.split`` (fints_repro/data/pwab.py)."""
    from fints_repro.data.pwab import pwab_samples

    w = cfg.pwab
    return pwab_samples(pwab_files(cfg, seed), cfg.split, product_info_template=w.product_info_template,
                        min_train_tasks=w.min_train_tasks, max_sequence=w.max_sequence,
                        user_turn_suffix=w.user_turn_suffix)


def _read_raw(cfg: DatasetConfig, seed: int) -> list[Sample]:
    if cfg.loader not in LOADERS.names():
        raise ConfigError(f"dataset {cfg.name}: unknown dataset.loader={cfg.loader!r} "
                          f"({' | '.join(LOADERS.names())})")
    return LOADERS.get(cfg.loader)(cfg, seed)


class SplitReader:
    """Reads each split once for its holder (a run: the training split serves both the
    user selection and the pairs; LaMP-4's holds gigabytes of articles)."""

    def __init__(self) -> None:
        self._splits: dict[str, list[Sample]] = {}

    def read(self, cfg: DatasetConfig, seed: int) -> list[Sample]:
        key = json.dumps([asdict(whole_split(cfg)), seed], sort_keys=True, default=str)
        if key not in self._splits:
            self._splits[key] = _read_raw(cfg, seed)
        return list(self._splits[key])


def whole_split(cfg: DatasetConfig, split: str | None = None) -> DatasetConfig:
    """``cfg`` reading every sample of ``split`` (default its own) as it is: no user or
    history selection."""
    return replace(cfg, split=split or cfg.split, users=None, n_users=None,
                   users_from="eval_split", n_seen_users=None, max_samples_per_user=None,
                   history_fraction=1.0, time_split=False)


def evaluated_users(cfg: DatasetConfig, samples: list[Sample], seed: int,
                    reader: SplitReader) -> set[str]:
    """The users ``dataset.n_users`` is drawn from (``dataset.users_from``, see config.py)."""
    users = {s.user for s in samples}
    if cfg.users_from == "eval_split":
        return users
    train = {s.user for s in reader.read(whole_split(cfg, cfg.train_split), seed)}
    both = users & train
    if cfg.users_from == "both_splits":
        if not both:
            raise DataError(
                f"dataset {cfg.name}: dataset.users_from=both_splits, and no user of split "
                f"{cfg.split!r} ({len(users)} users) has a sample in split {cfg.train_split!r} "
                f"({len(train)} users). A user-based split keeps its users apart; use a split "
                "whose users are in both (LaMP's time-based one), or dataset.users_from=eval_split",
                file=cfg.path)
        return both
    return users - splits.draw_users(both, cfg.n_seen_users, seed)  # unseen


def load_samples(cfg: DatasetConfig, *, seed: int, reader: SplitReader | None = None) -> list[Sample]:
    """Read, then select users and history as configured (docs/fidelity.md: Fidelity to the authors'
    code). ``reader``: the run's, so that a split is read once however often it is used."""
    reader = reader or SplitReader()
    samples = reader.read(cfg, seed)
    if cfg.users is not None:
        present = {s.user for s in samples}
        unknown = [u for u in cfg.users if u not in present]
        if unknown:
            raise DataError(f"dataset {cfg.name}: dataset.users names users that are not in "
                            f"the data: {unknown[:10]}", file=cfg.path)
        wanted = set(cfg.users)
        samples = [s for s in samples if s.user in wanted]
    if cfg.users_from != "eval_split":
        pool = evaluated_users(cfg, samples, seed, reader)
        samples = [s for s in samples if s.user in pool]
    if cfg.time_split:
        samples = splits.time_split(samples)
    samples = splits.select_users(samples, cfg.n_users, seed)
    samples = splits.limit_per_user(samples, cfg.max_samples_per_user, seed)
    if cfg.history_fraction < 1.0:
        samples = splits.sparsify_history(samples, cfg.history_fraction, seed)
    return samples
