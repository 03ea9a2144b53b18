"""The HTTP origin the pipeline downloads from, exercised over real sockets."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.client import IncompleteRead

import pytest
import urllib3
from urllib3.exceptions import ProtocolError

from docstokg_idem.pipeline.origin import Fault, Origin

pytestmark = pytest.mark.integration

SIZE = 100_000
PDF = "paper.pdf"
ORIGIN_LOGGER = "docstokg_idem.pipeline.origin"


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin({PDF: SIZE, "page.html": 2_000, "meta.xml": 300}, seed=7) as server:
        yield server


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    with urllib3.PoolManager(retries=False) as pool:
        yield pool


def get(
    http: urllib3.PoolManager, url: str, **headers: str
) -> urllib3.BaseHTTPResponse:
    return http.request("GET", url, headers=headers)


def test_head_headers(origin: Origin, http: urllib3.PoolManager) -> None:
    """HEAD announces length, strong ETag, Last-Modified, ranges and type."""
    exp = origin.expected(PDF)

    r = http.request("HEAD", origin.url(PDF))

    assert r.status == 200
    assert r.data == b""
    assert r.headers["Content-Length"] == str(SIZE)
    assert r.headers["ETag"] == exp.etag
    assert exp.etag.startswith('"') and exp.etag.endswith('"')
    assert r.headers["Last-Modified"] == exp.last_modified
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Content-Type"] == "application/pdf"


def test_content_type_per_artifact(origin: Origin, http: urllib3.PoolManager) -> None:
    """Content-Type follows the name's extension or the explicit argument."""
    origin.add("notes", 10, content_type="text/plain")

    types = {
        name: http.request("HEAD", origin.url(name)).headers["Content-Type"]
        for name in ("page.html", "meta.xml", "notes")
    }

    assert types == {
        "page.html": "text/html",
        "meta.xml": "application/xml",
        "notes": "text/plain",
    }


def test_full_get_matches_expected(origin: Origin, http: urllib3.PoolManager) -> None:
    """A full GET returns exactly the expected bytes and SHA-256."""
    exp = origin.expected(PDF)

    r = get(http, origin.url(PDF))

    assert r.status == 200
    assert len(r.data) == exp.size == SIZE
    assert r.data == exp.content
    assert hashlib.sha256(r.data).hexdigest() == exp.sha256


def test_content_is_deterministic_across_origins() -> None:
    """The same seed, name, size and version give the same bytes."""
    one = Origin({PDF: 500}, seed=3).expected(PDF)
    two = Origin({PDF: 500}, seed=3).expected(PDF)
    other = Origin({PDF: 500}, seed=4).expected(PDF)

    assert one == two
    assert one.sha256 != other.sha256


def test_range_bounded_and_open(origin: Origin, http: urllib3.PoolManager) -> None:
    """Range N-M and N- answer 206 with the right bytes and Content-Range."""
    content = origin.expected(PDF).content

    bounded = get(http, origin.url(PDF), Range="bytes=100-199")
    open_ended = get(http, origin.url(PDF), Range="bytes=65536-")

    assert bounded.status == 206
    assert bounded.headers["Content-Range"] == f"bytes 100-199/{SIZE}"
    assert bounded.data == content[100:200]
    assert open_ended.status == 206
    assert open_ended.headers["Content-Range"] == f"bytes 65536-{SIZE - 1}/{SIZE}"
    assert open_ended.headers["Content-Length"] == str(SIZE - 65536)
    assert open_ended.data == content[65536:]


def test_range_unsatisfiable(origin: Origin, http: urllib3.PoolManager) -> None:
    """A range starting at or past the end answers 416 with bytes */size."""
    r = get(http, origin.url(PDF), Range=f"bytes={SIZE}-")

    assert r.status == 416
    assert r.headers["Content-Range"] == f"bytes */{SIZE}"
    assert r.data == b""


def test_if_range_match_honours_range(
    origin: Origin, http: urllib3.PoolManager
) -> None:
    """If-Range with the current ETag gives 206."""
    exp = origin.expected(PDF)

    r = get(http, origin.url(PDF), Range="bytes=1000-", **{"If-Range": exp.etag})

    assert r.status == 206
    assert r.data == exp.content[1000:]


def test_if_range_mismatch_sends_full_body(
    origin: Origin, http: urllib3.PoolManager
) -> None:
    """If-Range with a stale ETag gives 200 and the whole new body."""
    stale = origin.expected(PDF).etag
    origin.bump_version(PDF)
    fresh = origin.expected(PDF)

    r = get(http, origin.url(PDF), Range="bytes=1000-", **{"If-Range": stale})

    assert r.status == 200
    assert r.headers["ETag"] == fresh.etag != stale
    assert r.data == fresh.content


def test_redirect_chain_followed(origin: Origin) -> None:
    """/r/3/<name> redirects three times, then the artifact is served."""
    retries = urllib3.Retry(total=5, redirect=5)
    with urllib3.PoolManager(retries=retries) as pool:
        r = pool.request("GET", origin.redirect_url(PDF, 3))

    assert r.status == 200
    assert r.data == origin.expected(PDF).content
    assert r.retries is not None
    assert [h.status for h in r.retries.history] == [302, 302, 302]
    assert r.retries.history[-1].redirect_location == origin.url(PDF)
    assert origin.counters(PDF)["redirects"] == 3
    assert origin.redirect_url(PDF, 0) == origin.url(PDF)


def test_status_fault_counts_head_and_get_together(
    origin: Origin, http: urllib3.PoolManager
) -> None:
    """status_times=2 answers a HEAD and a GET with 503 + Retry-After, then 200."""
    origin.set_fault(PDF, status=503, status_times=2, retry_after=3)

    head = http.request("HEAD", origin.url(PDF))
    first = get(http, origin.url(PDF))
    second = get(http, origin.url(PDF))

    assert (head.status, first.status, second.status) == (503, 503, 200)
    assert head.headers["Retry-After"] == first.headers["Retry-After"] == "3"
    assert "Retry-After" not in second.headers
    assert second.data == origin.expected(PDF).content
    assert origin.counters(PDF)["status_faults"] == 2


def test_status_fault_on_gets_only(origin: Origin, http: urllib3.PoolManager) -> None:
    """status_methods={'GET'} leaves HEAD alone and faults the first GETs."""
    origin.set_fault(PDF, Fault(status=500, status_times=2, status_methods={"GET"}))

    statuses = [http.request("HEAD", origin.url(PDF)).status]
    statuses += [get(http, origin.url(PDF)).status for _ in range(3)]

    assert statuses == [200, 500, 500, 200]


def test_fault_on_given_get_number(origin: Origin, http: urllib3.PoolManager) -> None:
    """on_get=2 faults only the second GET; HEAD is never faulted."""
    origin.set_fault(PDF, status=503, on_get=2)

    statuses = [http.request("HEAD", origin.url(PDF)).status]
    statuses += [get(http, origin.url(PDF)).status for _ in range(3)]

    assert statuses == [200, 200, 503, 200]


def test_truncated_body_is_short_read(
    origin: Origin, http: urllib3.PoolManager
) -> None:
    """truncate_at announces the full length and closes early: a short read."""
    origin.set_fault(PDF, truncate_at=65536)

    with pytest.raises(ProtocolError) as excinfo:
        get(http, origin.url(PDF))

    assert isinstance(excinfo.value.args[1], IncompleteRead)
    assert excinfo.value.args[1].expected == SIZE - 65536
    assert origin.counters(PDF)["truncated"] == 1
    assert origin.counters(PDF)["bytes_sent"] == 65536


def test_resume_after_truncation(origin: Origin, http: urllib3.PoolManager) -> None:
    """A truncated first GET and a ranged resume give the whole artifact."""
    exp = origin.expected(PDF)
    origin.set_fault(PDF, truncate_at=65536)
    with pytest.raises(ProtocolError):
        get(http, origin.url(PDF))

    tail = get(http, origin.url(PDF), Range="bytes=65536-", **{"If-Range": exp.etag})

    assert tail.status == 206
    assert exp.content[:65536] + tail.data == exp.content
    counters = origin.counters(PDF)
    assert counters["full_gets"] == 1
    assert counters["range_starts"] == {65536: 1}


def test_reset_raises_connection_error(
    origin: Origin, http: urllib3.PoolManager
) -> None:
    """reset_at aborts the connection with RST: the client sees a reset."""
    origin.set_fault(PDF, reset_at=1000)

    with pytest.raises(ProtocolError) as excinfo:
        get(http, origin.url(PDF))

    assert isinstance(excinfo.value.args[1], ConnectionResetError)
    assert origin.counters(PDF)["resets"] == 1
    assert get(http, origin.url(PDF)).data == origin.expected(PDF).content


def test_change_etag_after(origin: Origin, http: urllib3.PoolManager) -> None:
    """change_etag_after=1 serves version 0 once, then new content and ETag."""
    v0 = origin.expected(PDF)
    origin.set_fault(PDF, change_etag_after=1)

    first = get(http, origin.url(PDF))
    head = http.request("HEAD", origin.url(PDF))
    second = get(http, origin.url(PDF))
    v1 = origin.expected(PDF)

    assert first.headers["ETag"] == v0.etag and first.data == v0.content
    assert v1.version == 1 and v1.etag != v0.etag and v1.sha256 != v0.sha256
    assert head.headers["ETag"] == second.headers["ETag"] == v1.etag
    assert second.data == v1.content
    assert get(http, origin.url(PDF)).headers["ETag"] == v1.etag


def test_counters_count_exactly(origin: Origin, http: urllib3.PoolManager) -> None:
    """Each request lands in exactly one method, status and range bucket."""
    etag = origin.expected(PDF).etag
    http.request("HEAD", origin.url(PDF))
    get(http, origin.url(PDF))
    get(http, origin.url(PDF), Range="bytes=65536-", **{"If-Range": etag})
    get(http, origin.url(PDF), Range=f"bytes={SIZE + 5}-")
    get(http, origin.url("missing.pdf"))
    get(http, origin.url("meta.xml"))

    assert origin.counters(PDF) == {
        "requests": 4,
        "methods": {"GET": 3, "HEAD": 1},
        "full_gets": 1,
        "range_gets": 2,
        "range_starts": {65536: 1, SIZE + 5: 1},
        "statuses": {200: 2, 206: 1, 416: 1},
        "bytes_sent": SIZE + (SIZE - 65536),
        "status_faults": 0,
        "truncated": 0,
        "resets": 0,
        "redirects": 0,
    }
    total = origin.total_counters()
    assert total["requests"] == 5
    assert total["bytes_sent"] == SIZE + (SIZE - 65536) + 300
    assert total["not_found"] == 1


def test_reset_counters_keeps_faults(origin: Origin, http: urllib3.PoolManager) -> None:
    """reset_counters zeroes counts but leaves fault budgets where they were."""
    origin.set_fault(PDF, status=503, status_times=2)
    get(http, origin.url(PDF))

    origin.reset_counters()
    after = [get(http, origin.url(PDF)).status for _ in range(2)]

    assert after == [503, 200]
    assert origin.counters(PDF)["statuses"] == {503: 1, 200: 1}
    assert origin.total_counters()["not_found"] == 0


def test_counters_endpoint_json(origin: Origin, http: urllib3.PoolManager) -> None:
    """GET /_counters returns the counters as JSON and is not itself counted."""
    get(http, origin.url(PDF))

    payload = json.loads(get(http, f"{origin.base_url}/_counters").data)

    assert payload["artifacts"][PDF]["statuses"] == {"200": 1}
    assert payload["total"]["requests"] == 1
    assert origin.total_counters()["requests"] == 1


def test_manifest_endpoint_json(origin: Origin, http: urllib3.PoolManager) -> None:
    """GET /_manifest lists each artifact's URL, size and SHA-256."""
    manifest = json.loads(get(http, f"{origin.base_url}/_manifest").data)

    assert manifest[PDF]["url"] == origin.url(PDF)
    assert manifest[PDF]["size"] == SIZE
    assert manifest[PDF]["sha256"] == origin.expected(PDF).sha256


def test_slow_body_arrives_intact(http: urllib3.PoolManager) -> None:
    """slow_chunk_delay pauses between chunks and still sends every byte."""
    fault = Fault(slow_chunk_delay=0.05)
    with Origin({PDF: 5_000}, faults={PDF: fault}, chunk_size=1_000) as server:
        started = time.monotonic()
        r = get(http, server.url(PDF))
        elapsed = time.monotonic() - started

        assert r.data == server.expected(PDF).content
    assert 0.2 <= elapsed < 0.5


def test_oversize_body(origin: Origin, http: urllib3.PoolManager) -> None:
    """oversize announces and sends more bytes than the artifact has."""
    origin.set_fault("meta.xml", oversize=700)

    head = http.request("HEAD", origin.url("meta.xml"))
    r = get(http, origin.url("meta.xml"))

    assert head.headers["Content-Length"] == r.headers["Content-Length"] == "1000"
    assert len(r.data) == 1000
    assert r.data[:300] == origin.expected("meta.xml").content


def test_lie_length_shorter_and_longer(
    origin: Origin, http: urllib3.PoolManager
) -> None:
    """lie_length below the body gives a wrong-size body; above, a short read."""
    content = origin.expected("meta.xml").content
    origin.set_fault("meta.xml", lie_length=10)
    short = get(http, origin.url("meta.xml"))

    origin.set_fault("meta.xml", lie_length=400)
    with pytest.raises(ProtocolError) as excinfo:
        get(http, origin.url("meta.xml"))

    assert short.data == content[:10]
    assert isinstance(excinfo.value.args[1], IncompleteRead)


def test_two_origins_at_once(http: urllib3.PoolManager) -> None:
    """Two origins serve on different ports with their own content and counts."""
    with Origin({PDF: 100}, seed=1) as one, Origin({PDF: 100}, seed=2) as two:
        a = get(http, one.url(PDF)).data
        b = get(http, two.url(PDF)).data

        assert one.port != two.port
        assert (a, b) == (one.expected(PDF).content, two.expected(PDF).content)
        assert a != b
        assert one.counters(PDF)["requests"] == two.counters(PDF)["requests"] == 1


def test_stop_releases_port_and_threads(http: urllib3.PoolManager) -> None:
    """stop() closes idle keep-alive connections, joins threads, frees the port."""
    before = set(threading.enumerate())
    server = Origin({PDF: 100}).start()
    port = server.port
    assert get(http, server.url(PDF)).status == 200  # leaves a keep-alive open

    server.stop()

    assert set(threading.enumerate()) <= before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    http.clear()
    with Origin({PDF: 100}, port=port) as again:
        assert again.port == port
        assert get(http, again.url(PDF)).status == 200


def test_client_disconnect_is_silent(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client that hangs up mid-body leaves no log line and no traceback."""
    server = Origin({PDF: 50_000}, chunk_size=1_000).start()
    server.set_fault(PDF, slow_chunk_delay=0.01)
    with urllib3.PoolManager(retries=False) as pool:
        r = pool.request("GET", server.url(PDF), preload_content=False)
        r.read(1_000)
        r.release_conn()
        r.close()
    server.stop()

    assert [r for r in caplog.records if r.name == ORIGIN_LOGGER] == []
    assert capsys.readouterr() == ("", "")


def test_log_option_receives_request_lines(http: urllib3.PoolManager) -> None:
    """log= gets one line per request; without it the server is silent."""
    lines: list[str] = []
    with Origin({PDF: 10}, log=lines.append) as server:
        get(http, server.url(PDF))

    assert len(lines) == 1
    assert f'"GET /a/{PDF} HTTP/1.1" 200' in lines[0]


def test_unknown_artifact_and_bad_fault() -> None:
    """Unknown names raise KeyError; impossible faults raise ValueError."""
    server = Origin({PDF: 10})

    with pytest.raises(KeyError, match="missing"):
        server.counters("missing")
    with pytest.raises(ValueError, match="slow_chunk_delay"):
        Fault(slow_chunk_delay=5)
    with pytest.raises(ValueError, match="status"):
        Fault(status=42)
    with pytest.raises(ValueError, match="already defined"):
        server.add(PDF, 10)


def test_module_entry_point_serves_until_interrupted() -> None:
    """python -m ...origin prints its base URL, serves, and exits 0 on Ctrl-C."""
    cmd = [sys.executable, "-m", "docstokg_idem.pipeline.origin"]
    args = ["--artifacts", "2", "--size", "1000", "--port", "0"]
    with subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        try:
            with urllib3.PoolManager(retries=False) as pool:
                r = pool.request("GET", f"{base_url}/a/artifact-0001.pdf")
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=5)

    assert base_url.startswith("http://127.0.0.1:")
    assert r.status == 200 and len(r.data) == 1000
    assert code == 0


def test_logger_is_quiet_by_default(
    origin: Origin, http: urllib3.PoolManager, caplog: pytest.LogCaptureFixture
) -> None:
    """Normal traffic emits no log records."""
    with caplog.at_level(logging.DEBUG, logger=ORIGIN_LOGGER):
        get(http, origin.url(PDF))
        http.request("HEAD", origin.url(PDF))

    assert [r for r in caplog.records if r.name == ORIGIN_LOGGER] == []
