"""Where an image's copies go: REPLICAS holders over at least MIN_SITES sites by default (a site lost, the
image is still whole elsewhere), new copies going first to sites that hold none.

Pure: given the catalogue entry and the live members, it names the nodes that should pull. The service
asks them (`image.replicate`); upkeep asks again when a holder is gone.
"""

from __future__ import annotations

import hashlib

from images.messages import ImageEntry

REPLICAS = 3
MIN_SITES = 2


def targets(entry: ImageEntry, live: dict[str, str], copies: int = REPLICAS) -> list[str]:
    """The live nodes (of `live`: node -> site) that should pull `entry` so that it has `copies` live holders,
    spread over as many sites as possible (at least MIN_SITES when there are that many): nodes of sites
    without a live holder first, then the others; ties broken by a hash of image and node, so that images
    spread over the nodes of a site instead of piling on the first name."""
    holding = {n for n in entry.holders if n in live}
    sites = {live[n] for n in holding}
    wanted = copies - len(holding)
    chosen: list[str] = []
    candidates = sorted((n for n in live if n not in holding),
                        key=lambda n: hashlib.blake2b(f"{entry.digest}/{n}".encode(), digest_size=8).digest())
    while len(chosen) < wanted and candidates:
        fresh = [n for n in candidates if live[n] not in sites]
        pick = fresh[0] if fresh else candidates[0]
        chosen.append(pick)
        sites.add(live[pick])
        candidates.remove(pick)
    return chosen
