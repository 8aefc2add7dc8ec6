"""The `image.*` RPCs an agent serves (`images.service`), with who may call them.

- People (clients and operators) import, pull, replicate, remove, verify and collect: an import is an
  upload session (`image.upload`, then `image.offer` for which chunks the agent lacks, `image.put` for
  those, `image.commit` with the manifest), so the CLI chunks the file where it is and sends only what
  the store does not hold (casync/desync's way), and nothing lands until the commit.
- Anyone reads the catalogue and fetches manifests and chunks (`image.manifest`, `image.chunks`): a pull
  between agents and a CLI export use the same two calls; bytes are checked against their ids on arrival,
  so a holder cannot pass off other bytes.
- Agents only: `image.drop` (a holder stops holding an image that was removed).
Chunk ids travel as 32 raw bytes; a batch of chunks stays under BATCH_BYTES so that a reply fits a frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from overlay.messages import NoArgs
from overlay.wire.codec import limit
from overlay.wire.rpc import AGENTS, ANYONE, PEOPLE, Method, RequestError

NAME_LIMIT = 128
BATCH_BYTES = 2 << 20
"""Most chunk bytes (compressed) one `image.chunks` or `image.put` carries: half a frame."""
SERVE_BYTES = BATCH_BYTES + (BATCH_BYTES >> 1)
"""Most frame bytes a holder returns for one `image.chunks`: a request sized BATCH_BYTES by the chunks' sizes
comes back a little larger when they do not compress (each zstd frame adds a few bytes), never near a frame."""
MAX_IDS = 4096
"""Most chunk ids one `image.offer` or `image.chunks` names (4096 x 32 bytes = 128 KiB)."""
MAX_COPIES = 16


def check_image_name(name: str) -> str:
    """NAME or NAME:TAG (tag `latest` when absent), NAME one or more '/'-separated parts (as in OCI repositories:
    a VE's shipped snapshots are `snap/<ve>/<vm>:<tag>`, `discovery.ve.shipped`), each part and the tag of
    letters, digits, '.', '_', '-', starting with a letter or digit; returns NAME:TAG."""
    base, sep, tag = name.partition(":")
    tag = tag or ("" if sep else "latest")
    ok = all(part and len(part) <= 64 and all(c.isalnum() or c in "._-" for c in part) and part[0].isalnum()
             for part in (*base.split("/"), tag))
    if not ok or name.count(":") > 1 or len(base) + 1 + len(tag) > NAME_LIMIT:
        raise RequestError(f"image name {name!r}: NAME[:TAG] of at most {NAME_LIMIT} characters, NAME of "
                           "'/'-separated parts, each part and TAG of letters, digits, '.', '_', '-'")
    return f"{base}:{tag}"


def tagged(image: str) -> str:
    """An image name as the catalogue keys it: NAME:TAG, `latest` when no tag is given."""
    return image if ":" in image else f"{image}:latest"


def _check_ids(ids: list[bytes]) -> None:
    if any(len(cid) != 32 for cid in ids):
        raise RequestError("a chunk id is 32 bytes (BLAKE3)")


@dataclass(frozen=True)
class ImageName:
    name: str = field(metadata=limit(NAME_LIMIT))

    def __post_init__(self) -> None:
        check_image_name(self.name)


@dataclass(frozen=True)
class Copies(ImageName):
    """Image `name`, to be kept on `copies` live holders: an upload session to open (`image.upload`), or an
    image to replicate (`image.replicate`)."""

    copies: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.copies <= MAX_COPIES:
            raise RequestError(f"copies must be between 1 and {MAX_COPIES}")


@dataclass(frozen=True)
class Session:
    session: str = field(metadata=limit(64))


@dataclass(frozen=True)
class Offer:
    """Which of these chunks does the agent lack? Answered with their positions in `ids`."""

    session: str = field(metadata=limit(64))
    ids: list[bytes] = field(metadata=limit(MAX_IDS))

    def __post_init__(self) -> None:
        _check_ids(self.ids)


@dataclass(frozen=True)
class Put:
    """Chunks as zstd frames: [id, frame, size] each; the agent verifies each before writing it."""

    session: str = field(metadata=limit(64))
    chunks: list[tuple[bytes, bytes, int]] = field(metadata=limit(MAX_IDS))

    def __post_init__(self) -> None:
        _check_ids([c[0] for c in self.chunks])
        if sum(len(c[1]) for c in self.chunks) > BATCH_BYTES + (64 << 10):
            raise RequestError(f"a put carries at most {BATCH_BYTES} bytes of chunks")


@dataclass(frozen=True)
class Commit:
    """The end of an upload: the manifest's last slice (`image.manifest_put` sent the others, in order)."""

    session: str = field(metadata=limit(64))
    manifest: bytes = field(metadata=limit(BATCH_BYTES))


@dataclass(frozen=True)
class ManifestPut:
    """A slice of a manifest larger than one request can carry, appended to the upload's before its commit."""

    session: str = field(metadata=limit(64))
    data: bytes = field(metadata=limit(BATCH_BYTES))


@dataclass(frozen=True)
class ManifestSlice:
    """`BATCH_BYTES` of the encoded manifest `digest` from `offset`."""

    digest: str = field(metadata=limit(64))
    offset: int = 0


@dataclass(frozen=True)
class ManifestPart:
    data: bytes = field(metadata=limit(BATCH_BYTES))
    total: int = 0


@dataclass(frozen=True)
class Chunks:
    ids: list[bytes] = field(metadata=limit(MAX_IDS))

    def __post_init__(self) -> None:
        _check_ids(self.ids)


@dataclass(frozen=True)
class ChunkBatch:
    """The chunks asked for that this holder has, [id, zstd frame, size] each (it stops before BATCH_BYTES);
    `queue`: requests waiting at the holder, `service_time`: seconds it spent on this one (C3's feedback)."""

    chunks: list[tuple[bytes, bytes, int]]
    queue: int
    service_time: float


@dataclass(frozen=True)
class Digest:
    digest: str = field(metadata=limit(64))


@dataclass(frozen=True)
class ImageEntry:
    """A catalogue entry (`images.catalogue`) as stored in the DHT and shown: image `name` (NAME:TAG) is the
    manifest `digest`; `holders`: node -> site of every node that holds it whole."""

    name: str
    digest: str
    size: int
    chunks: int
    stored: int
    """Compressed bytes of its distinct chunks, as the importing store held them."""
    owner: str
    created: float
    holders: dict[str, str]
    copies: int = 3
    """Live holders wanted (`image replicate --copies`); upkeep restores them (`images.service.upkeep`)."""
    version: int = 1


@dataclass(frozen=True)
class Imported:
    name: str
    digest: str
    size: int
    chunks: int
    new_chunks: int
    new_bytes: int
    """What the agent's store grew by."""


@dataclass(frozen=True)
class Pulled:
    name: str
    digest: str
    node: str
    fetched_chunks: int
    fetched_bytes: int
    duplicate_bytes: int
    sources: dict[str, int]
    """Bytes received from each holder."""
    dropped: list[str]
    """Holders given up on (dead, or sending bytes that did not match their ids)."""
    seconds: float


@dataclass(frozen=True)
class Verified:
    name: str
    digest: str
    chunks: int
    corrupt: int
    refetched: int


IMAGE_UPLOAD = Method("image.upload", Copies, PEOPLE, Session)
IMAGE_OFFER = Method("image.offer", Offer, PEOPLE, list[int])
IMAGE_PUT = Method("image.put", Put, PEOPLE, int)
IMAGE_MANIFEST_PUT = Method("image.manifest_put", ManifestPut, PEOPLE, int)
IMAGE_COMMIT = Method("image.commit", Commit, PEOPLE, Imported)
IMAGE_LIST = Method("image.list", NoArgs, ANYONE, list[ImageEntry])
IMAGE_SHOW = Method("image.show", ImageName, ANYONE, ImageEntry)
IMAGE_MANIFEST = Method("image.manifest", ManifestSlice, ANYONE, ManifestPart)
IMAGE_CHUNKS = Method("image.chunks", Chunks, ANYONE, ChunkBatch)
IMAGE_PULL = Method("image.pull", ImageName, PEOPLE | AGENTS, Pulled)
IMAGE_REPLICATE = Method("image.replicate", Copies, PEOPLE, ImageEntry)
IMAGE_RM = Method("image.rm", ImageName, PEOPLE, ImageEntry)
IMAGE_VERIFY = Method("image.verify", ImageName, PEOPLE, Verified)
IMAGE_GC = Method("image.gc", NoArgs, PEOPLE, dict[str, int])
IMAGE_DROP = Method("image.drop", Digest, AGENTS, bool)
