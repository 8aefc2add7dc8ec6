"""Import throughput of one disk image, side by side with `cp` of the same file and with the chunking pipeline
alone, printed as JSON.

    python benchmarks/image_import.py [--image FILE] [--size-mib 1024] [--runs 3] [--plot out.png]

Without `--image`, a disk-like file is made: random extents (half compressible text-like bytes, half
random) between zeroed free space, like a filesystem image. Each run, with the page cache warm for all:
- `cp`: the file copied to the scratch directory (`cp --sparse=always`), then fsynced: the physical limit;
- `pipeline`: zero runs found, content-defined cuts, BLAKE3 and zstd-3 of every chunk, in memory (no store);
- `import`: `images.importing.import_file` into an empty store (pack files fsynced, index committed);
- `reimport`: the same file again into that store (every chunk already there: what dedup skips).
MB/s are of the file's size, zeros included, as `cp`'s are.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zstandard
from harness import pyplot, save  # benchmarks/harness.py, beside this script

from images.chunks import cut
from images.importing import import_file, open_content
from images.store import ChunkStore


def make_disk(path: Path, size_mib: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(3, 12)) for _ in range(2000)]
    with open(path, "wb") as f:
        for _ in range(size_mib * 16):  # 64 KiB extents
            kind = rng.random()
            if kind < 0.4:
                f.write(bytes(65536))
            elif kind < 0.7:
                f.write(rng.randbytes(65536))
            else:
                text = b" ".join(rng.choice(words) for _ in range(12000))
                f.write(text[:65536].ljust(65536, b"\n"))


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def pipeline(path: Path) -> None:
    compressor = zstandard.ZstdCompressor(level=3)
    with open_content(path, path.parent) as (content, _):
        for piece in cut(content):
            if piece.id is not None:
                compressor.compress(content[piece.offset:piece.offset + piece.length])


def copy(path: Path, scratch: Path) -> None:
    target = scratch / "copy.raw"
    subprocess.run(["cp", "--sparse=always", str(path), str(target)], check=True)
    with open(target, "rb") as f:
        os.fsync(f.fileno())
    target.unlink()


def run(image: Path, runs: int, scratch: Path) -> dict[str, list[float]]:
    path = scratch / "image.raw"
    shutil.copyfile(image, path)
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    seconds: dict[str, list[float]] = {"cp": [], "pipeline": [], "import": [], "reimport": []}
    for i in range(runs):
        seconds["cp"].append(timed(lambda: copy(path, scratch)))
        seconds["pipeline"].append(timed(lambda: pipeline(path)))
        store = ChunkStore(scratch / f"store{i}")
        seconds["import"].append(timed(lambda: import_file(store, path)))  # noqa: B023 (called at once)
        seconds["reimport"].append(timed(lambda: import_file(store, path)))  # noqa: B023
        store.close()
        shutil.rmtree(scratch / f"store{i}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--plot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="image-import-", dir="/var/tmp") as tmp:
        scratch = Path(tmp)
        image = args.image
        if image is None:
            image = scratch / "made.raw"
            make_disk(image, args.size_mib)
        size = image.stat().st_size
        seconds = run(image, args.runs, scratch)
        with open_content(image, scratch) as (content, _):
            nonzero = sum(p.length for p in cut(content) if p.id is not None)
    result = {
        "benchmark": "image_import", "image": str(args.image or f"made, {args.size_mib} MiB"), "bytes": size,
        "nonzero_bytes": nonzero, "runs": args.runs, "load": os.getloadavg()[0],
        "mb_per_s": {k: round(size / 1e6 / statistics.median(v), 1) for k, v in seconds.items()},
        "seconds": {k: [round(s, 3) for s in v] for k, v in seconds.items()},
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    if args.plot:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(list(result["mb_per_s"]), list(result["mb_per_s"].values()))
        ax.set_ylabel("MB/s (of the file's size)")
        ax.set_title(f"import of a {size / 2**30:.2f} GiB image ({nonzero / size:.0%} non-zero)")
        save(fig, args.plot)


if __name__ == "__main__":
    main()
