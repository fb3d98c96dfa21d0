"""Contrastive preference pairs: a user's own output (chosen) against a generator's
(rejected), built, filtered by the task's criterion and cached per prompt; what steering
methods extract vectors from and what a reward-model backbone trains on."""

from fints_repro.preferences.pairs import (Pair, PairSource, UserPairs, attempt_stats,
                                           build_pairs, pair_stats, user_history, user_pairs)

__all__ = ["Pair", "PairSource", "UserPairs", "attempt_stats", "build_pairs", "pair_stats",
           "user_history", "user_pairs"]
