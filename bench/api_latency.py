"""The API's own answer times for one route, from its /metrics histogram (read with prometheus-client's parser).

They tell a slow answer from a request that waited outside the app (socket, scheduler, the load tool), which a
client-side latency alone cannot. Set PROMETHEUS_MULTIPROC_DIR for `uvicorn --workers N`, so /metrics sums the
processes.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

HISTOGRAM = "grove_http_request_duration_seconds"


def slower_shares(base: str, route: str, limits: tuple[float, ...]) -> tuple[float, dict[float, float]]:
    """(answers, {limit in seconds: percent of answers slower than it}) of the route's GET 200s so far."""
    counts: dict[float, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        if family.name != HISTOGRAM:
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name == f"{HISTOGRAM}_bucket" and (
                labels.get("method"),
                labels.get("route"),
                labels.get("status"),
            ) == ("GET", route, "200"):
                counts[float(labels["le"])] = sample.value
    total = counts.get(float("inf"), 0.0)
    shares = {limit: 100 * (total - counts[limit]) / total for limit in limits if total and limit in counts}
    return total, shares


def describe(base: str, route: str, limits: tuple[float, ...] = (0.025, 0.05, 0.1)) -> str:
    total, shares = slower_shares(base, route, limits)
    if not total:
        return "no samples"
    return f"{total:.0f} answers, " + ", ".join(
        f"{limit * 1000:.0f} ms+ {share:.2f} %" for limit, share in shares.items()
    )
