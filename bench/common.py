"""Shared bits of the benchmarks: machine name, medians."""
from __future__ import annotations

import statistics

from specrt.measure import machine  # noqa: F401  (the name the bench scripts use)


def median(xs):
    return statistics.median(xs)
