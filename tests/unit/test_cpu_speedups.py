"""The CPU speed-up: glibc malloc tuning is applied once per process, a no-op off glibc."""

from __future__ import annotations

import ctypes

import pytest

import fints_repro.models.cpu as cpu


def test_tune_malloc_sets_both_thresholds_once(monkeypatch) -> None:
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, option: int, value: int) -> int:
            calls.append((option, value))
            return 1

    monkeypatch.setattr(cpu, "_MALLOC_TUNED", False)
    monkeypatch.setattr(cpu.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert cpu.tune_malloc() is True
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD 32 MiB, M_TRIM 1 GiB
    assert cpu.tune_malloc() is True and len(calls) == 2  # once per process


@pytest.mark.parametrize("system, libc", [("Darwin", ("", "")), ("Linux", ("musl", "1.2"))])
def test_tune_malloc_is_a_no_op_off_glibc(monkeypatch, system, libc) -> None:
    monkeypatch.setattr(cpu, "_MALLOC_TUNED", False)
    monkeypatch.setattr(cpu.platform, "system", lambda: system)
    monkeypatch.setattr(cpu.platform, "libc_ver", lambda: libc)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: pytest.fail("libc loaded off glibc"))
    assert cpu.tune_malloc() is False

