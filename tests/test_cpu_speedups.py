"""The CPU speed-up: glibc malloc tuning is applied once per process, a no-op off glibc."""

from __future__ import annotations

import platform

from fints_repro.models.cpu import tune_malloc


def test_tune_malloc_is_idempotent() -> None:
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tune_malloc() is expected
    assert tune_malloc() is expected

