"""Generation engines: what turns prompts into tokens (docs/engines.md).

An engine is one module of this package holding an ``Engine`` subclass registered in
``ENGINES`` (optionally with its typed settings: the config node ``engine.<name>.*``).
It declares what it supports (``supports``, names from ``CAPABILITIES``) and generates
complete model inputs batch by batch, yielding ``(indices, generations)`` as
``models.generation.generate_batches`` does, so that every caller writes its cache and
its rows as they come (a killed run resumes).

Every caller asks ``engine_for(lm, needs)``: the run's engine when it supports what the
rows need, else transformers' (``hf``) when ``engine.steered=hf``, else a ConfigError.
``check_engine`` applies the same rule to every method at start-up, before any model
time. ``hf`` is the reference engine: its cache keys carry no engine part; any other
engine's identity (its name, version and the settings that decide its tokens) is part of
every generation cache key it writes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from fints_repro.cache import GenerationStore, content_hash
from fints_repro.config import EngineConfig
from fints_repro.errors import ConfigError
from fints_repro.models.chat import clip_chat_prompts
from fints_repro.models.engines.base import CAPABILITIES, ENGINES, Engine, RowAdapter
from fints_repro.models.engines.hf import HFEngine
from fints_repro.models.generation import DecodingParams
from fints_repro.models.inspect import shape_of
from fints_repro.models.loading import LoadedModel

log = logging.getLogger(__name__)

__all__ = ["CAPABILITIES", "ENGINES", "Engine", "RowAdapter", "build_engine", "check_engine", "close_engine",
           "engine_for", "engine_schema", "generate_cached", "greedy_cached", "rows_need", "with_engine"]

def engine_schema() -> type:
    """``EngineConfig`` with one node per engine that has settings (``engine.vllm``)."""
    return ENGINES.schema(EngineConfig, __name__)


def __getattr__(name: str) -> Any:
    if name == "EngineSchema":
        return engine_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_engine(cfg: EngineConfig, adapter_rank: int = 0) -> Engine:
    return ENGINES.get(cfg.name, "engine.name")(cfg, adapter_rank=adapter_rank)


def with_engine(lm: LoadedModel, cfg: EngineConfig, adapter_rank: int = 0) -> LoadedModel:
    """``lm`` whose rows ``cfg``'s engine generates (built now, its model loaded on first
    use); ``adapter_rank``: the largest LoRA rank of the adapters its rows bring (0: none)."""
    return dataclasses.replace(lm, engine=build_engine(cfg, adapter_rank))


def rows_need(backbone: Any, steered: bool, n_candidates: int = 1) -> set[str]:
    """What a method's rows need of the engine: the backbone's own needs (per-row
    adapters), per-row steering when some row is steered, N samples for more than one
    candidate. ``backbone``: its class or instance (``needs``)."""
    needs = set(getattr(backbone, "needs", ()))
    if steered:
        needs.add("per_row_steering")
    if n_candidates > 1:
        needs.add("n_samples")
    return needs


def missing_capabilities(engine: type[Engine], needs: Iterable[str]) -> list[str]:
    unknown = sorted(set(needs) - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"unknown engine capabilities {unknown}; known: {list(CAPABILITIES)}")
    return sorted(set(needs) - engine.supports)


def refusal(engine: str, what: str, missing: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"engine={engine} cannot generate {what}: it lacks {', '.join(missing)}. "
        f"engine.steered=hf generates such rows with transformers and the hooks (and the "
        f"rest with {engine}); engine=hf generates everything with transformers")


def check_engine(cfg: EngineConfig, needs_by_method: dict[str, set[str]]) -> None:
    """At start-up: under ``engine.steered=refuse``, a method whose rows need what the
    engine lacks is a ConfigError naming the method, the engine and the capability."""
    engine = ENGINES.get(cfg.name, "engine.name")
    engine.check_available()
    if cfg.steered != "refuse":
        return
    for method, needs in needs_by_method.items():
        missing = missing_capabilities(engine, needs)
        if missing:
            raise refusal(cfg.name, f"the rows of method {method!r}", missing)


def engine_for(lm: LoadedModel, needs: Iterable[str] = (), what: str = "these rows") -> Engine:
    """The engine that generates rows needing ``needs`` for ``lm`` (see the module doc)."""
    engine: Engine = lm.engine if lm.engine is not None else _HF
    missing = missing_capabilities(type(engine), needs)
    if not missing:
        return engine
    if engine.cfg.steered == "hf":
        return _HF
    raise refusal(engine.name, what, missing)


def close_engine(lm: LoadedModel) -> None:
    if lm.engine is not None:
        lm.engine.close()


def generate_cached(lm: LoadedModel, texts: Sequence[str], params: DecodingParams, *,
                    store_path: Callable[[str], Path], batch_size: int, progress: bool,
                    desc: str, needs: Iterable[str] = ()) -> tuple[list[str], int]:
    """One generation per text (greedy or seeded sampling), through ``lm``'s engine,
    cached per prompt in the ``GenerationStore`` at ``store_path(key)``; ``key`` hashes
    the model, the decoding, the batch size and the engine. Returns the generations and
    how many were generated (not read from the store)."""
    engine = engine_for(lm, needs, desc)
    key = content_hash([lm.fingerprint, dataclasses.asdict(params), batch_size,
                        *engine_key(engine)])
    store = GenerationStore(store_path(key))
    keys = [store.key(t) for t in texts]
    done = {i: store.items[k] for i, k in enumerate(keys) if k in store.items}
    n_new = len(texts) - len(done)
    log.info("%s: %d/%d generations reused from %s", desc, len(done), len(texts), store.path)
    for idx, gens in engine.generate(lm, texts, params, batch_size=batch_size,
                                     sort_by_length=True, skip=set(done),
                                     progress=progress, desc=desc):
        store.add([(keys[i], g) for i, g in zip(idx, gens)])
        done.update(zip(idx, gens))
    return [done[i] for i in range(len(texts))], n_new


def engine_key(engine: Engine) -> list[Any]:
    """The engine's part of a cache key: nothing for transformers (the reference)."""
    return [] if engine.name == "hf" else engine.cache_identity()


_MODELS = object()  # greedy_cached's default: the model's own system prompt


def greedy_cached(lm: LoadedModel, user_texts: Sequence[str], max_new_tokens: int, *,
                  store_dir: Path, seed: int, batch_size: int, overlength: str, progress: bool,
                  desc: str, describe: Callable[[int, int], Exception],
                  system_prompt: str | None | object = _MODELS) -> tuple[list[str], int]:
    """Greedy generations of ``lm`` for the user turns ``user_texts`` (chat-rendered with
    ``system_prompt``, default the model's), through its engine, cached per prompt under
    ``store_dir``: what a method writes with the run's LLM besides its outputs
    (reward-model personas and judge verdicts, SteerX's preference descriptions). A
    prompt too long for the context with ``max_new_tokens`` is the error
    ``describe(index, n_tokens)`` or, under ``overlength="truncate"``, cut in its middle.
    Returns the generations and how many were generated (not read from the store)."""
    system = lm.system_prompt if system_prompt is _MODELS else system_prompt
    texts, over = clip_chat_prompts(lm.tokenizer, list(user_texts), system,  # type: ignore[arg-type]
                                   shape_of(lm.model).max_positions, max_new_tokens,
                                   overlength, describe)
    if over:
        log.warning("%d %s prompt(s) longer than the context were cut in the middle", len(over), desc)
    params = DecodingParams(max_new_tokens=max_new_tokens, do_sample=False, seed=seed)
    return generate_cached(lm, texts, params, store_path=lambda key: Path(store_dir) / f"{key}.jsonl",
                           batch_size=batch_size, progress=progress, desc=desc)


_HF = HFEngine(EngineConfig())
