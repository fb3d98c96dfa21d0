"""User selection and history settings (normal, sparse, fast-changing) on lists of samples.

Pure functions: each returns new lists and is deterministic given its seed. Random
choices are keyed on the seed and the user (and item id), never on global state, so a
user's choice does not depend on which other users are in the list.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict

from fints_repro.data.schema import Sample
from fints_repro.errors import DataError

log = logging.getLogger(__name__)


def users_in_both(train: list[Sample], test: list[Sample]) -> set[str]:
    """Users that have samples in both lists."""
    return {s.user for s in train} & {s.user for s in test}


def draw_users(users: set[str], n: int | None, seed: int) -> set[str]:
    """``n`` of ``users`` drawn at random (None, or n at least their number: all)."""
    if n is None or n >= len(users):
        return set(users)
    return set(random.Random(seed).sample(sorted(users), n))


def select_users(samples: list[Sample], n_users: int | None, seed: int) -> list[Sample]:
    """All samples of ``n_users`` users drawn at random (None: every user), in input order."""
    if n_users is None:
        return list(samples)
    if n_users < 1:
        raise ValueError(f"n_users must be at least 1 or None, got {n_users}")
    users = {s.user for s in samples}
    if n_users > len(users):
        log.warning("asked for %d users but only %d are available; keeping all", n_users, len(users))
    chosen = draw_users(users, n_users, seed)
    return [s for s in samples if s.user in chosen]


def limit_per_user(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    """At most ``n`` samples per user, drawn at random (None: all), in input order."""
    if n is None:
        return list(samples)
    if n < 1:
        raise ValueError(f"n must be at least 1 or None, got {n}")
    by_user: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_user[s.user].append(i)
    keep: set[int] = set()
    for user, indices in by_user.items():
        keep.update(indices if len(indices) <= n else random.Random(f"{seed}|{user}").sample(indices, n))
    return [s for i, s in enumerate(samples) if i in keep]


def sparsify_history(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    """Keep ceil(``fraction`` · len) of each history (at least 1 of a non-empty one), in order.

    Each item gets a random rank keyed on (seed, user, item id) and the lowest ranks are
    kept, so one user's samples keep the same items wherever their histories agree.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rank: dict[tuple[str, str], float] = {}

    def item_rank(user: str, item_id: str) -> float:
        if (user, item_id) not in rank:
            rank[user, item_id] = random.Random(f"{seed}|{user}|{item_id}").random()
        return rank[user, item_id]

    out = []
    for s in samples:
        n = len(s.history)
        k = max(1, math.ceil(round(fraction * n, 9))) if n else 0  # round: 0.07 * 100 is 7.000000000000001
        keys = [item_rank(s.user, h.id) for h in s.history]
        order = sorted(range(n), key=keys.__getitem__)  # stable: ties keep history order
        out.append(s.with_history([s.history[i] for i in sorted(order[:k])]))
    return out


def time_split(samples: list[Sample]) -> list[Sample]:
    """Keep in each history only the items strictly earlier than the sample itself."""
    out = []
    for s in samples:
        if s.timestamp is None:
            raise DataError("sample has no timestamp; a time split needs one on every sample", record=s.id)
        undated = [h.id for h in s.history if h.timestamp is None]
        if undated:
            raise DataError(
                f"history items without timestamps ({', '.join(undated[:5])}); "
                "a time split needs one on every history item",
                record=s.id,
            )
        cutoff = s.timestamp
        out.append(s.with_history([h for h in s.history if h.timestamp is not None and h.timestamp < cutoff]))
    return out
