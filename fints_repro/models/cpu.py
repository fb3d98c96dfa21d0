"""Two CPU speed-ups for batched generation. Neither changes what is computed, only how
fast: the same fp32 products, with the rounding of a different GEMM blocking (as any
change of batch size already brings).

- :func:`tune_malloc` (called by ``load_model`` for a CPU model): glibc ``malloc`` keeps
  freed buffers of up to 32 MiB in its heap instead of handing each one back to the
  kernel. Without it every large activation of a batched prefill (8 x 130 tokens x 1536
  floats = 6 MiB) is a fresh ``mmap`` whose pages fault in zeroed; measured: batch-8
  prefill of the demo's zero-shot prompts 1.25 s -> 1.09 s on 2 cores.
- :func:`packed_linears` (entered by ``generate_batches``): while inside, each fp32
  ``nn.Linear`` on the CPU whose input has exactly ``rows`` rows (a decoding step of a
  batch of ``rows``) multiplies with MKL's packed GEMM (``torch.ops.mkl._mkl_linear``, the
  kernel torch.compile's CPU backend uses) on a copy of its weight packed once for that M.
  An unpacked small-M GEMM re-packs the whole weight matrix at every call; for SmolLM2's
  linears at M = 8 the packed kernel takes 28 ms per step instead of 41 ms (19 ms at M = 1).

The packed copies take about the model's size again in memory (skipped where that would
pass a quarter of the RAM); a ``LoadedModel`` keeps them between generate calls. A weight
changed in place is seen: inside a block by its ``data_ptr`` and version counter (that
layer goes back to ``F.linear``), and when a kept copy is taken up again also by the sum
of its content, which catches changes through ``weight.data`` that bypass the version
counter (PEFT's merge); the layer is then packed again. Autograd, other input
sizes, and modules whose ``forward`` someone else already wraps (accelerate's offload
hooks) use ``F.linear`` too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Make glibc keep large freed buffers for reuse (once per process). Returns whether
    the allocator is tuned; a no-op off glibc."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        ok = False
    if ok:
        log.debug("glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB")
    _MALLOC_TUNED = ok
    return ok


def packed_gemm_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _packable(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (isinstance(mod, nn.Linear) and "forward" not in mod.__dict__ and w is not None
            and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
            and w.layout == torch.strided)


def _total(w: torch.Tensor) -> float:
    return float(w.sum())


class _Packed:
    """The packed weight of one linear, checked against the live weight at every call."""

    def __init__(self, mod: nn.Linear, rows: int):
        self.mod, self.rows = mod, rows
        w = mod.weight.detach()
        self.ptr, self.version, self.total = w.data_ptr(), w._version, _total(w)
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), rows)
        self.calls = 0

    def current(self) -> bool:
        """The weight is the one packed, as far as PyTorch tracks it (checked per call)."""
        w = self.mod.weight
        return w.data_ptr() == self.ptr and w._version == self.version

    def unchanged(self) -> bool:
        """Also its content: an in-place change through ``weight.data`` (as PEFT's
        ``merge_adapter`` makes) bypasses the version counter. Checked when a kept copy is
        taken up again (a sum: ~17 ms for all of SmolLM2's linears)."""
        return self.current() and _total(self.mod.weight.detach()) == self.total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mod = self.mod
        if (x.dim() >= 2 and x.numel() == self.rows * x.shape[-1] and x.dtype == torch.float32
                and not torch.is_grad_enabled() and self.current()):
            self.calls += 1
            return torch.ops.mkl._mkl_linear(x, self.packed, mod.weight, mod.bias, self.rows)
        return F.linear(x, mod.weight, mod.bias)


class PackedWeights:
    """The packed copies of one model's linears for one row count, kept between
    :func:`packed_linears` blocks (each generate_batches call) so that packing, about
    0.15 s for SmolLM2-135M, happens once per model rather than once per call. A copy
    whose weight has changed since is packed again."""

    def __init__(self) -> None:
        self.rows = 0
        self.layers: dict[str, _Packed] = {}


def _fits_in_memory(mods: list[nn.Module]) -> bool:
    """Packed copies double the linears' memory: only where they take under a quarter of
    the machine's RAM."""
    need = sum(m.weight.numel() * m.weight.element_size() for m in mods)
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    if need > ram // 4:
        log.warning("packed CPU weights skipped: they would take %.1f GiB of %.1f GiB RAM",
                    need / 2**30, ram / 2**30)
        return False
    return True


@contextlib.contextmanager
def packed_linears(model: nn.Module, rows: int,
                   keep: PackedWeights | None = None) -> Iterator[dict[str, _Packed]]:
    """Inside the block, fp32 CPU linears of ``model`` run inputs of exactly ``rows`` rows
    through MKL's packed GEMM. Yields the packed layers by name (empty where nothing
    applies: GPU, other dtypes, no MKL, ``rows`` < 2, too little RAM). The model is
    restored on exit, also after an exception; ``keep`` holds the packed copies for the
    next block."""
    packed: dict[str, _Packed] = {}
    mods = [(n, m) for n, m in model.named_modules() if _packable(m)] if rows >= 2 else []
    if not mods or not packed_gemm_available() or not _fits_in_memory([m for _, m in mods]):
        yield packed
        return
    kept = keep.layers if keep is not None and keep.rows == rows else {}
    try:
        for name, mod in mods:
            p = kept.get(name)
            if p is None or p.mod is not mod or not p.unchanged():
                p = _Packed(mod, rows)
            packed[name] = p
            mod.forward = p.forward  # an instance attribute: popping it restores the class's
        yield packed
    finally:
        for p in packed.values():
            p.mod.__dict__.pop("forward", None)
        if keep is not None:
            keep.rows, keep.layers = rows, packed
