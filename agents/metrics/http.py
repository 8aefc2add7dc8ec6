"""Just enough HTTP/1.x, with no I/O, for a Prometheus server to scrape an agent: a request head in, a reply out.

A scrape is `GET /metrics` (a query string is ignored, `HEAD` answers the headers alone); anything else gets
a short error reply, never an exception: the bytes come from whoever reaches the port. A head is at most
MAX_HEAD bytes, its request line and headers ASCII; bodies, keep-alive and chunked encoding are not
spoken (every reply closes its connection, which a scraper reopens at its next scrape).
`agents.metrics.exporter` reads the head from the socket and writes the reply.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD = 8192
"""Bytes a request head (request line and headers) may take; a longer one is refused with 431."""
PATH = "/metrics"
END = b"\r\n\r\n"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Scrape:
    """A well-formed request for the metrics: `accept` chooses the format (`prometheus_client`'s negotiation)."""

    accept: str
    head_only: bool


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    head_only: bool = False

    def encode(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}", f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}", "Connection: close"]
        if self.status == 405:
            lines.append("Allow: GET, HEAD")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return head if self.head_only else head + self.body


def error(status: int, why: str) -> Reply:
    return Reply(status, f"{why}\n".encode())


def head_complete(data: bytes) -> bool:
    """Whether `data` holds a whole request head (it may be followed by more)."""
    return END in data


def parse(data: bytes) -> Scrape | Reply:
    """The request whose head starts `data`: a `Scrape`, or the error `Reply` that answers it."""
    head, found, _ = data.partition(END)
    if not found:
        return error(431, "request head too large") if len(data) >= MAX_HEAD else error(400, "incomplete request")
    if len(head) > MAX_HEAD:
        return error(431, "request head too large")
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return error(400, "request head is not ASCII")
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return error(400, "expected: METHOD PATH HTTP/1.x")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return error(400, "malformed header line")
        headers[name.lower()] = value.strip()
    if method not in ("GET", "HEAD"):
        return error(405, f"method {method[:16]!r} not allowed: GET {PATH}")
    if target.partition("?")[0] != PATH:
        return error(404, f"nothing here but {PATH}")
    return Scrape(headers.get("accept", ""), method == "HEAD")
