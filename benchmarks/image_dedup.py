"""Which chunker for the image store: dedup, shift resistance and speed of each candidate on real Debian images,
printed as JSON (issue 13).

    python benchmarks/image_dedup.py [--plot docs/image_dedup.png] [--chunkers fixed-4k,cdc-8k,...]

The images are `images.debian`'s minbase, ssh and ssh-next (built first if not cached), 1 GiB raw ext4 each.
They are imported into one store per chunker in that order; a chunk is stored once, all-zero chunks not at all
(they are holes in a manifest). For each chunker:

- `stored_bytes` and `stored_zstd3` (each unique chunk compressed alone at level 3), and `saving`: 1 - stored
  bytes / the images' non-zero 4 KiB blocks (what a copy of the three sparse files holds, "no dedup");
  `saving_zstd3` is the same against the three images compressed whole at level 3 (no dedup, compressed);
- `reuse_c_from_b`: the share of ssh-next's unique non-zero chunk bytes that ssh already has;
- `chunks` (unique, stored), `refs` (non-zero chunk references in the three manifests), and `id_bytes_per_gib`:
  32-byte blake3 ids per GiB of non-zero content;
- `shifted`: 1 and 100 bytes inserted into ssh-next at an unaligned offset (`SHIFT_AT`, in its inode tables),
  then the share of its non-zero chunk bytes the store already holds: fixed blocks collapse, content-defined
  chunks do not;
- `mb_s_hash` and `mb_s_hash_zstd3`: ssh-next's 1 GiB file chunked and hashed (then every non-zero chunk also
  compressed) per second, page cache warm, against `cp` of the same file (`cp_mb_s`, best of 3).

The chunkers: fixed blocks; pyfastcdc at several averages (min = avg/4 and max = 4 avg unless named);
`zeroblocks-cdc`: zero 4 KiB blocks elided first, CDC inside each run of non-zero blocks; `anchored-zZ-cdc`:
a cut wherever a run of at least Z zero bytes ends (where a file's zero-padded last block gives way to the
next file), CDC inside the pieces; `anchored-zZ-grid-4k`: the same cuts, then 4 KiB blocks from each;
`phase-grid-4k`: 4 KiB blocks on the phase most of the last 16 anchors agree on. The `qcow2` section imports
the qcow2 copies' file bytes instead of the guest-visible content, with a few of the chunkers, and
`qcow2_compressed` the same images converted with `qemu-img convert -c`; both against the raw baseline.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import mmap
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pyfastcdc
import zstandard
from harness import pyplot, save  # beside this script

from images import debian
from images.chunks import cut as store_cut

BLOCK = 4096
GIB = 1 << 30
VARIANTS = ("minbase", "ssh", "ssh-next")
SHIFT_AT = (1 << 20) + 123
"""Where the shift test inserts bytes into ssh-next: 1 MiB in, not on any 4 KiB or 8-byte boundary."""
SHIFTS = (1, 100)
RECOMMENDED = "store"
"""The chunker of `images.chunks` (anchored at zero runs of 256 bytes, FastCDC 2/8/32 KiB, zero runs as holes)."""
QCOW2_CHUNKERS = ("fixed-4k", "cdc-8k", RECOMMENDED)


class Content:
    """A buffer and which of its 4 KiB blocks hold a non-zero byte: zero chunks are told without hashing them."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.view, self.size = buf, memoryview(buf), len(buf)
        self.bytes = np.frombuffer(buf, np.uint8)
        full = self.size // BLOCK
        blocks = np.frombuffer(buf, np.uint64, count=full * BLOCK // 8).reshape(full, BLOCK // 8).any(axis=1)
        if self.size % BLOCK:
            blocks = np.append(blocks, self.bytes[full * BLOCK:].any())
        self.nonzero_blocks = blocks
        self._count = np.concatenate(([0], np.cumsum(blocks)))

    def nonzero_bytes(self) -> int:
        return int(self._count[-1]) * BLOCK

    def is_zero(self, start: int, end: int) -> bool:
        first, last = -(-start // BLOCK), end // BLOCK  # the whole blocks inside [start, end)
        if first >= last:
            return not self.bytes[start:end].any()
        return (self._count[last] == self._count[first] and not self.bytes[start:first * BLOCK].any()
                and not self.bytes[last * BLOCK:end].any())

    def chunks(self, cuts: np.ndarray) -> Iterator[tuple[bytes, int, int]]:
        """(blake3 id, offset, length) of each non-zero chunk between consecutive `cuts` (0 first, size last)."""
        bounds = cuts.tolist()
        for start, end in zip(bounds, bounds[1:], strict=False):
            if not self.is_zero(start, end):
                yield blake3.blake3(self.view[start:end]).digest(), start, end - start


Chunker = Callable[[Content], np.ndarray]
"""Content → its cut points: 0, then every chunk's end, the last one the content's size."""


def fixed(size: int) -> Chunker:
    return lambda content: np.append(np.arange(0, content.size, size), content.size)


def _cdc_cuts(cdc: pyfastcdc.FastCDC, content: Content, start: int, end: int) -> list[int]:
    """The ends of the FastCDC chunks of [start, end); one chunk if it is no longer than the minimum."""
    if end - start <= cdc.min_size:
        return [end]
    return [start + chunk.offset + chunk.length for chunk in cdc.cut_buf(content.view[start:end])]


def fastcdc(avg: int, min_size: int | None = None, max_size: int | None = None) -> Chunker:
    cdc = pyfastcdc.FastCDC(avg_size=avg, min_size=min_size, max_size=max_size)
    return lambda content: np.array([0, *_cdc_cuts(cdc, content, 0, content.size)])


def _pieces(points: list[int], size: int) -> Iterator[tuple[int, int]]:
    bounds = [0, *points, size]
    return zip(bounds, bounds[1:], strict=False)


def zero_blocks_cdc(avg: int) -> Chunker:
    """Zero 4 KiB blocks elided first (each run of them one chunk), FastCDC inside each run of non-zero blocks."""
    cdc = pyfastcdc.FastCDC(avg_size=avg)

    def cut(content: Content) -> np.ndarray:
        flips = np.flatnonzero(np.diff(content.nonzero_blocks.astype(np.int8))) + 1
        points = [min(int(p) * BLOCK, content.size) for p in flips]
        cuts = [0]
        for start, end in _pieces(points, content.size):
            cuts += [end] if content.is_zero(start, end) else _cdc_cuts(cdc, content, start, end)
        return np.array(cuts)

    return cut


def zero_run_ends(content: Content, min_run: int) -> np.ndarray:
    """Anchors: every offset whose byte is non-zero and follows a run of at least `min_run` (<= 4096) zero bytes.

    Content-defined: the same bytes anywhere give the same anchors. Only the runs of non-zero 4 KiB blocks are
    scanned (after a zero block, a run's first non-zero byte is an anchor), on 8-byte words first: a run of
    `min_run` zero bytes holds at least (min_run - 7) // 8 whole aligned zero words."""
    data, size = content.bytes, content.size
    flips = np.flatnonzero(np.diff(np.concatenate(([0], content.nonzero_blocks.astype(np.int8), [0]))))
    found = []
    for first, last in zip(flips[0::2].tolist(), flips[1::2].tolist(), strict=True):
        low, high = first * BLOCK, min(last * BLOCK, size)
        words = np.frombuffer(content.buf, np.uint64, count=(high - low) // 8, offset=low)
        flags = np.zeros(len(words) + 3, np.int8)  # a 0 on either side, and word -1: the zero block before
        flags[1] = low > 0
        flags[2:-1] = words == 0
        edges = np.flatnonzero(np.diff(flags)) - 1  # word indexes: where zero runs start, then end
        starts, ends = edges[0::2], edges[1::2]
        keep = (ends - starts >= max((min_run - 7) // 8, 1)) | (starts < 0)
        starts, ends = low + starts[keep] * 8, low + ends[keep] * 8
        for _ in range(7):  # the zero bytes of the partial words on either side
            ends = ends + ((ends < high) & (data[np.minimum(ends, size - 1)] == 0))
            starts = starts - ((starts > low) & (data[np.maximum(starts - 1, 0)] == 0))
        found.append(ends[(ends < high) & ((ends - starts >= min_run) | (starts < low))])
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def anchored_cdc(min_run: int, avg: int) -> Chunker:
    """A cut at every anchor (end of a zero run of `min_run`+ bytes), FastCDC inside the pieces between."""
    cdc = pyfastcdc.FastCDC(avg_size=avg)

    def cut(content: Content) -> np.ndarray:
        cuts = [0]
        for start, end in _pieces(zero_run_ends(content, min_run).tolist(), content.size):
            cuts += _cdc_cuts(cdc, content, start, end)
        return np.array(cuts)

    return cut


def anchored_grid(min_run: int) -> Chunker:
    """A cut at every anchor, then every 4 KiB from it until the next."""

    def cut(content: Content) -> np.ndarray:
        grids = [np.arange(start, end, BLOCK)
                 for start, end in _pieces(zero_run_ends(content, min_run).tolist(), content.size)]
        return np.concatenate([*grids, [content.size]])

    return cut


def phase_grid(min_run: int, window: int) -> Chunker:
    """4 KiB blocks on a content-defined phase: the most common anchor offset mod 4 KiB among the last `window`
    anchors (ext4's file data is block-aligned, so most anchors agree); a change of phase cuts at its anchor."""

    def cut(content: Content) -> np.ndarray:
        switches, phase = [(0, 0)], 0
        recent: collections.deque[int] = collections.deque(maxlen=window)
        for anchor in zero_run_ends(content, min_run).tolist():
            recent.append(anchor % BLOCK)
            votes = collections.Counter(recent)
            best = max(votes, key=lambda candidate: (votes[candidate], candidate == phase))
            if votes[best] > votes[phase]:
                phase = best
                switches.append((anchor, phase))
        grids = []
        for (start, phase), (end, _) in zip(switches, [*switches[1:], (content.size, 0)], strict=False):
            grids.append(np.arange(start + (phase - start) % BLOCK, end, BLOCK))
            grids.append(np.array([start]))
        return np.unique(np.concatenate([*grids, [content.size]]))

    return cut


CHUNKERS: dict[str, Chunker] = {
    "fixed-4k": fixed(4096),
    "fixed-64k": fixed(65536),
    "cdc-64k": fastcdc(65536),
    "cdc-16k": fastcdc(16384),
    "cdc-8k": fastcdc(8192),
    "cdc-4k": fastcdc(4096),
    "cdc-4k-min512": fastcdc(4096, min_size=512),
    "zeroblocks-cdc-8k": zero_blocks_cdc(8192),
    "anchored-z64-cdc-8k": anchored_cdc(64, 8192),
    "anchored-z256-cdc-4k": anchored_cdc(256, 4096),
    "anchored-z256-cdc-8k": anchored_cdc(256, 8192),
    "anchored-z256-cdc-16k": anchored_cdc(256, 16384),
    "anchored-z64-grid-4k": anchored_grid(64),
    "phase-grid-4k": phase_grid(256, 16),
    "store": lambda content: np.array([0, *(p.end for p in store_cut(content.view))]),  # images.chunks, as imported
}


@functools.cache
def _compressor() -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=3)


@dataclass
class Store:
    """Unique chunks by id: their length and offset in the content that brought them."""

    chunks: dict[bytes, tuple[Content, int, int]]

    def add(self, content: Content, cuts: np.ndarray) -> tuple[dict[bytes, int], int]:
        """Import one image: its unique non-zero chunks (id → length), and how many non-zero chunks it has."""
        mine: dict[bytes, int] = {}
        refs = 0
        for chunk_id, offset, length in content.chunks(cuts):
            mine[chunk_id] = length
            refs += 1
            self.chunks.setdefault(chunk_id, (content, offset, length))
        return mine, refs

    def zstd_bytes(self) -> int:
        return sum(len(_compressor().compress(content.view[offset:offset + length]))
                   for content, offset, length in self.chunks.values())


@dataclass(frozen=True)
class Baseline:
    """No dedup: the raw images' non-zero 4 KiB blocks, and the images compressed whole (zstd-3)."""

    nonzero_bytes: int
    zstd3_bytes: int


def study(contents: list[Content], chunker: Chunker, baseline: Baseline, shift: bool) -> dict[str, Any]:
    """Import `contents` in order into an empty store; its figures (see the module's docstring)."""
    store = Store({})
    refs, per_image = 0, []
    for content in contents:
        mine, count = store.add(content, chunker(content))
        per_image.append(mine)
        refs += count
    stored = sum(length for _, _, length in store.chunks.values())
    compressed = store.zstd_bytes()
    ours, theirs = per_image[-1], per_image[-2]
    result: dict[str, Any] = {"stored_bytes": stored, "stored_zstd3": compressed,
              "saving": round(1 - stored / baseline.nonzero_bytes, 4),
              "saving_zstd3": round(1 - compressed / baseline.zstd3_bytes, 4),
              "reuse_c_from_b": round(sum(n for i, n in ours.items() if i in theirs) / sum(ours.values()), 4),
              "chunks": len(store.chunks), "refs": refs, "mean_chunk": round(stored / len(store.chunks)),
              "id_bytes_per_gib": round(32 * refs / (baseline.nonzero_bytes / GIB))}
    if shift:
        result["shifted"] = {f"+{n}": _shifted_hits(contents[-1], n, chunker, store) for n in SHIFTS}
    return result


def _shifted_hits(content: Content, inserted: int, chunker: Chunker, store: Store) -> float:
    shifted = bytearray(content.view[:SHIFT_AT])
    shifted += bytes(range(1, inserted + 1))
    shifted += content.view[SHIFT_AT:]
    moved = Content(shifted)
    found = total = 0
    for chunk_id, _, length in moved.chunks(chunker(moved)):
        total += length
        found += length if chunk_id in store.chunks else 0
    return round(found / total, 4)


def throughput(content: Content, chunker: Chunker, runs: int = 3) -> dict[str, float]:
    """Chunk + hash, then chunk + hash + zstd-3 of every non-zero chunk, of the whole file: best of `runs`."""

    def seconds(compress: bool) -> float:
        start = time.perf_counter()
        again = Content(content.buf)
        for _, offset, length in again.chunks(chunker(again)):
            if compress:
                _compressor().compress(again.view[offset:offset + length])
        return time.perf_counter() - start

    hashed, compressed = (min(seconds(compress) for _ in range(runs)) for compress in (False, True))
    return {"s_hash": round(hashed, 2), "mb_s_hash": round(content.size / hashed / 1e6),
            "s_hash_zstd3": round(compressed, 2), "mb_s_hash_zstd3": round(content.size / compressed / 1e6)}


def cp_seconds(path: Path, runs: int = 3) -> float:
    """`cp` of `path` to a file beside it, best of `runs`, page cache warm (the file was just read)."""
    best = float("inf")
    with tempfile.TemporaryDirectory(dir=path.parent.parent) as tmp:
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(["cp", str(path), f"{tmp}/copy"], check=True)
            best = min(best, time.perf_counter() - start)
            Path(f"{tmp}/copy").unlink()
    return round(best, 3)


def no_dedup(contents: list[Content]) -> Baseline:
    """The baseline: each image compressed whole, one zstd-3 stream, 64 MiB at a time."""
    step, compressed = 64 << 20, 0
    for content in contents:
        writer = _compressor().compressobj()
        compressed += sum(len(writer.compress(content.view[at:at + step])) for at in range(0, content.size, step))
        compressed += len(writer.flush())
    return Baseline(sum(content.nonzero_bytes() for content in contents), compressed)


def compressed_qcow2(raw: Path, out: Path) -> Content:
    """`qemu-img convert -c`: the qcow2 a user may well bring, each cluster deflated on its own."""
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(out)], check=True)
    return mapped(out)


def mapped(path: Path) -> Content:
    with path.open("rb") as file:
        return Content(mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ))


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    plt = pyplot()
    names = list(results)
    fig, (share, ids) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    x = np.arange(len(names))
    series = [("saving", "saving vs no dedup"), ("saving_zstd3", "saving after zstd-3 vs images zstd-3"),
              ("reuse_c_from_b", "ssh-next's bytes already in ssh")]
    for k, (key, label) in enumerate(series):
        share.bar(x + (k - 1.5) * 0.2, [100 * results[n][key] for n in names], 0.2, label=label)
    share.bar(x + 1.5 * 0.2, [100 * results[n]["shifted"]["+1"] for n in names], 0.2, label="shifted by 1 byte: found")
    share.set_ylabel("%")
    share.set_ylim(0, 125)
    share.legend(fontsize=8, loc="upper center", ncol=4)
    share.set_title("Three Debian images (minbase, ssh, ssh-next), 1 GiB raw ext4 each")
    ids.bar(x, [results[n]["id_bytes_per_gib"] / 2**20 for n in names], 0.5)
    ids.set_ylabel("MiB of chunk ids per GiB")
    ids.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", help="PNG: savings, reuse and shift resistance, ids per GiB, by chunker")
    parser.add_argument("--chunkers", default=",".join(CHUNKERS), help="comma-separated, of: " + ", ".join(CHUNKERS))
    args = parser.parse_args()
    names = args.chunkers.split(",")
    unknown = [name for name in names if name not in CHUNKERS]
    if unknown:
        raise SystemExit(f"unknown chunker(s) {', '.join(unknown)}: choose among {', '.join(CHUNKERS)}")
    raws = [debian.build(variant) for variant in VARIANTS]
    contents = [mapped(raw) for raw in raws]
    baseline = no_dedup(contents)
    report: dict[str, Any] = {
        "images": {variant: {"raw": str(raw), "nonzero_bytes": content.nonzero_bytes()}
                   for variant, raw, content in zip(VARIANTS, raws, contents, strict=True)},
        "no_dedup": asdict(baseline), "shift_at": SHIFT_AT, "cp_s": (cp := cp_seconds(raws[-1])),
        "cp_mb_s": round(raws[-1].stat().st_size / cp / 1e6),
        "recommended": RECOMMENDED, "chunkers": {}, "qcow2": {}}
    for name in names:
        report["chunkers"][name] = {**study(contents, CHUNKERS[name], baseline, shift=True),
                                    **throughput(contents[-1], CHUNKERS[name])}
    qcow2s = [mapped(raw.with_name("disk.qcow2")) for raw in raws]
    for name in [name for name in QCOW2_CHUNKERS if name in names]:  # against the raw images' baseline
        report["qcow2"][name] = study(qcow2s, CHUNKERS[name], baseline, shift=False)
    with tempfile.TemporaryDirectory(dir=raws[0].parent.parent) as tmp:
        compressed = [compressed_qcow2(raw, Path(tmp) / f"{variant}.qcow2") for variant, raw in zip(VARIANTS, raws,
                                                                                                      strict=True)]
        report["qcow2_compressed"] = {RECOMMENDED: study(compressed, CHUNKERS[RECOMMENDED], baseline, shift=False)}
    print(json.dumps(report, indent=2))
    if args.plot:
        plot(report["chunkers"], args.plot)


if __name__ == "__main__":
    main()
