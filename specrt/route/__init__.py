"""Routing head: prompt features -> task cluster -> drafter (see :mod:`specrt.route.router`)."""
from specrt.route.router import MLPRouter, router_latency

__all__ = ["MLPRouter", "router_latency"]
