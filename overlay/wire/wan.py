"""The emulated WAN of one-machine clusters and simulations: site names and the RTT between them.

A local cluster (`discovery cluster up`) and the overlay simulation both need plausible geography
without real sites; the transport turns these RTTs into a delay per call (`overlay.wire.rpc`).
"""

from __future__ import annotations

SITES = ["rennes", "lyon", "nancy", "grenoble", "lille", "sophia"]
SITE_RTT_MS = {  # plausible RTTs between French sites, in ms; symmetric
    ("rennes", "lyon"): 14, ("rennes", "nancy"): 12, ("rennes", "grenoble"): 16, ("rennes", "lille"): 10,
    ("rennes", "sophia"): 20, ("lyon", "nancy"): 10, ("lyon", "grenoble"): 4, ("lyon", "lille"): 12,
    ("lyon", "sophia"): 8, ("nancy", "grenoble"): 12, ("nancy", "lille"): 8, ("nancy", "sophia"): 16,
    ("grenoble", "lille"): 14, ("grenoble", "sophia"): 8, ("lille", "sophia"): 18,
}


def rtt_matrix(sites: list[str], local_rtt_ms: float = 0.0) -> dict[str, dict[str, float]]:
    """Emulated RTT between the sites; `local_rtt_ms` between two nodes of one site (loopback otherwise)."""
    matrix: dict[str, dict[str, float]] = {a: ({a: local_rtt_ms} if local_rtt_ms else {}) for a in sites}
    for (a, b), ms in SITE_RTT_MS.items():
        if a in matrix and b in matrix:
            matrix[a][b] = matrix[b][a] = float(ms)
    return matrix
