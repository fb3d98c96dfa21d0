"""User selection, per-user limits, sparse histories and the time split."""

from __future__ import annotations

import logging

import pytest

from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.data.splits import limit_per_user, select_users, sparsify_history, time_split, users_in_both
from fints_repro.errors import DataError


def _items(n: int, user: str = "u", start: float | None = 0.0) -> tuple[HistoryItem, ...]:
    return tuple(
        HistoryItem(f"{user}-h{i}", f"in {i}", f"out {i}", None if start is None else start + i) for i in range(n)
    )


def _samples(users: int = 6, per_user: int = 3, history: int = 10) -> list[Sample]:
    return [
        Sample(f"u{u}-s{j}", f"u{u}", f"question {j}", f"answer {j}", _items(history, f"u{u}"))
        for u in range(users)
        for j in range(per_user)
    ]


def test_users_in_both() -> None:
    train = [Sample("a", "alice", "", None), Sample("b", "bob", "", None)]
    test = [Sample("c", "bob", "", None), Sample("d", "carol", "", None)]
    assert users_in_both(train, test) == {"bob"}
    assert users_in_both(train, []) == set()


def test_select_users_is_deterministic_and_keeps_whole_users() -> None:
    samples = _samples()
    picked = select_users(samples, 2, seed=3)
    assert picked == select_users(samples, 2, seed=3)
    users = {s.user for s in picked}
    assert len(users) == 2
    assert picked == [s for s in samples if s.user in users]  # all their samples, input order
    assert len({frozenset(s.user for s in select_users(samples, 2, seed)) for seed in range(20)}) > 1


def test_select_users_none_and_too_many(caplog: pytest.LogCaptureFixture) -> None:
    samples = _samples(users=3)
    assert select_users(samples, None, seed=0) == samples
    with caplog.at_level(logging.WARNING, logger="fints_repro.data.splits"):
        assert select_users(samples, 10, seed=0) == samples
    assert "only 3" in caplog.text
    with pytest.raises(ValueError):
        select_users(samples, 0, seed=0)


def test_limit_per_user() -> None:
    samples = _samples(users=4, per_user=5)
    limited = limit_per_user(samples, 2, seed=1)
    assert limited == limit_per_user(samples, 2, seed=1)
    assert sorted(s.user for s in limited) == sorted([f"u{u}" for u in range(4)] * 2)
    assert limited == [s for s in samples if s in limited]  # input order
    assert limit_per_user(samples, None, seed=1) == samples
    assert limit_per_user(samples, 9, seed=1) == samples
    assert len({tuple(s.id for s in limit_per_user(samples, 2, seed)) for seed in range(10)}) > 1


@pytest.mark.parametrize(
    ("fraction", "n", "kept"),
    [(0.05, 20, 1), (0.15, 20, 3), (0.25, 20, 5), (0.5, 20, 10), (0.05, 3, 1), (0.5, 3, 2), (0.25, 1, 1),
     (1.0, 7, 7), (0.07, 100, 7)],
)
def test_sparsify_counts_and_order(fraction: float, n: int, kept: int) -> None:
    (s,) = sparsify_history([Sample("s", "u", "q", "a", _items(n))], fraction, seed=0)
    assert len(s.history) == kept
    positions = [int(h.id.split("h")[1]) for h in s.history]
    assert positions == sorted(positions)
    assert set(s.history) <= set(_items(n))


def test_sparsify_same_user_same_subset_and_seeded() -> None:
    history = _items(20)
    samples = [Sample(f"s{j}", "u", f"q{j}", "a", history) for j in range(3)]
    other = Sample("o", "v", "q", "a", history)
    out = sparsify_history([*samples, other], 0.25, seed=5)
    assert out[0].history == out[1].history == out[2].history
    assert out == sparsify_history([*samples, other], 0.25, seed=5)
    # keyed on the user and the item, not on the list: a shorter history keeps the common items
    (shorter,) = sparsify_history([Sample("x", "u", "q", "a", history[:10])], 0.5, seed=5)
    (longer,) = sparsify_history([Sample("y", "u", "q", "a", history)], 0.25, seed=5)
    assert set(longer.history) & set(history[:10]) <= set(shorter.history)
    assert len({sparsify_history(samples[:1], 0.25, seed)[0].history for seed in range(10)}) > 1
    assert samples[0].history == history  # inputs untouched
    # two users with the same item ids do not share one choice
    pairs = [sparsify_history([samples[0], other], 0.25, seed) for seed in range(10)]
    assert any(a.history != b.history for a, b in pairs)


def test_sparsify_empty_history_and_bad_fraction() -> None:
    (s,) = sparsify_history([Sample("s", "u", "q", None)], 0.05, seed=0)
    assert s.history == ()
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            sparsify_history([], bad, seed=0)


def test_time_split_is_strict() -> None:
    sample = Sample("s", "u", "q", "a", _items(6, start=10.0), timestamp=13.0)
    (out,) = time_split([sample])
    assert [h.timestamp for h in out.history] == [10.0, 11.0, 12.0]  # 13.0 is not strictly earlier
    assert (out.id, out.target, out.timestamp) == ("s", "a", 13.0)
    (empty,) = time_split([Sample("e", "u", "q", "a", (), timestamp=1.0)])
    assert empty.history == ()
    (first,) = time_split([Sample("f", "u", "q", "a", _items(3, start=5.0), timestamp=5.0)])
    assert first.history == ()


def test_time_split_needs_timestamps() -> None:
    with pytest.raises(DataError, match=r"record s7\].*sample has no timestamp"):
        time_split([Sample("s7", "u", "q", "a", _items(2))])
    undated = Sample("s8", "u", "q", "a", _items(2, start=None), timestamp=3.0)
    with pytest.raises(DataError, match=r"record s8\].*u-h0, u-h1"):
        time_split([undated])
