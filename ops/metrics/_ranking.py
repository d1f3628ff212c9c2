"""The exact AUC the membership-inference metrics report (loss-based, the four attacks, privleak)."""

from __future__ import annotations

from bisect import bisect_left, bisect_right


def auc(members: list[float], others: list[float]) -> float:
    """P(m > o) + ½·P(m = o) over all pairs of a member's and a non-member's score, counted
    exactly (the Mann-Whitney statistic), by binary search in the sorted non-member scores."""
    ranked = sorted(others)
    greater = ties = 0
    for s in members:
        lo, hi = bisect_left(ranked, s), bisect_right(ranked, s)
        greater += lo
        ties += hi - lo
    return (greater + ties / 2) / (len(members) * len(ranked))
