"""The runner's requests to guests (`discovery.campaign.runner`): a load a guest refuses, or never answers, is
recorded as refused without cancelling the requests to the other guests."""

import http.server
import threading

import pytest

from discovery.campaign import runner
from discovery.campaign.runner import Runner


class _Guest(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        ok = self.path.startswith("/cgi-bin/load")
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"DISCOVERY-GUEST-LOAD cpu=50\n" if ok else b"no\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def guest():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Guest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


async def test_a_guest_that_burns_is_not_refused_one_that_answers_otherwise_is_at_once(guest):
    refused: list[str] = []
    await Runner._burn(f"{guest}cgi-bin/load?cpu=50", refused)
    assert refused == []
    await Runner._burn(f"{guest}elsewhere", refused)
    assert refused == [f"{guest}elsewhere: 404 Not Found"]


async def test_a_guest_that_never_answers_is_refused_after_the_wait(monkeypatch):
    monkeypatch.setattr(runner, "LOAD_WAIT", 0.5)
    refused: list[str] = []
    await Runner._burn("http://127.0.0.1:9/cgi-bin/load?cpu=50", refused)  # the discard port: nothing listens
    assert refused == ["http://127.0.0.1:9/cgi-bin/load?cpu=50: no answer within 0.5 s"]
