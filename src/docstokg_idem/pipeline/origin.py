"""A real HTTP origin on 127.0.0.1 that serves deterministic artifacts and faults.

The download pipeline's tests, its demo and the chaos harness all need a server
that behaves like a scholarly publisher's: HEAD and GET with validators, byte
ranges with ``If-Range``, redirects, and the ways real servers misbehave (error
statuses with ``Retry-After``, bodies cut short, connections reset, files that
change between two attempts, bodies larger than announced). :class:`Origin`
is that server. It runs :class:`http.server.ThreadingHTTPServer` with HTTP/1.1
keep-alive on a daemon thread and counts every request per artifact, so a test
can assert exactly how often an artifact was fetched and from which byte.

Artifact content is a pure function of ``(seed, name, size, version)``; any
process can recompute it, and :meth:`Origin.expected` returns what a correct
download must produce. Faults are described per artifact by one small
:class:`Fault` dataclass whose fields compose.

Run ``python -m docstokg_idem.pipeline.origin --artifacts 10 --size 100000`` to
serve artifacts from the command line; ``GET /_counters`` and
``GET /_manifest`` expose the counters and expected hashes as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

__all__ = ["Expected", "Fault", "Origin", "main"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: Largest pause :attr:`Fault.slow_chunk_delay` accepts, so slow bodies stay bounded.
MAX_CHUNK_DELAY = 1.0

_CONTENT_TYPES = {
    ".pdf": "application/pdf",
    ".html": "text/html",
    ".htm": "text/html",
    ".xml": "application/xml",
}
_DEFAULT_CONTENT_TYPE = "application/pdf"
# Last-Modified of version v is this instant plus v hours: deterministic per version.
_EPOCH = 1_700_000_000
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_HANDLER_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02


@dataclass(frozen=True)
class Fault:
    """How one artifact misbehaves; every field is optional and they compose.

    Faults count requests from the moment they are set (at construction or by
    :meth:`Origin.set_fault`), not from the start of the server. A fault with a
    ``*_times`` budget fires on that many responses and then stops; a budget of
    ``None`` means every response. A budget is only spent when the fault really
    fires: a truncation that would cut beyond the end of a short range response
    does not fire and keeps its budget.

    ``status`` answers the first ``status_times`` requests whose method is in
    ``status_methods`` with that status, a short text body and, when
    ``retry_after`` is set, a ``Retry-After`` header. By default HEAD and GET
    are counted together: with ``status_times=2`` a HEAD then a GET both get the
    status, and the next request of either method succeeds. A status response
    carries no other fault and spends no other budget.

    ``truncate_at`` sends the announced ``Content-Length`` but closes the
    connection (FIN) after that many bytes of the response body, on the first
    ``truncate_times`` GETs that return a body. ``reset_at`` does the same but
    aborts the connection with a TCP RST (``SO_LINGER`` 0), on the first
    ``reset_times`` such GETs; when both would fire on one response, the reset
    wins and the truncation keeps its budget. Both offsets count bytes of this
    response's body, so on a ``206`` they are relative to the range start.

    ``slow_chunk_delay`` pauses that many seconds (at most
    :data:`MAX_CHUNK_DELAY`) before every body chunk but the first, on the first
    ``slow_times`` GETs that return a body (every one when ``None``).

    ``change_etag_after`` moves the artifact to its next version (new content,
    ETag and Last-Modified) once the n-th GET that returns a body has been
    answered; that n-th GET still serves the old version. It fires once.

    ``oversize`` appends that many extra bytes to the served representation:
    the headers announce and the body carries ``size + oversize`` bytes, and
    ranges apply to the larger body. ``lie_length`` replaces the
    ``Content-Length`` of HEAD and of ``200`` GET responses with that value,
    sends the real body anyway and closes the connection after it: smaller than
    the body, the client sees a body of the wrong size; larger, a short read.

    ``on_get`` restricts all GET faults (``status`` if GET is counted, and the
    body faults, ``oversize`` and ``lie_length``) to the GET with that number,
    counting every GET of the artifact since the fault was set, from 1. HEAD is
    then never faulted.
    """

    status: int | None = None
    status_times: int | None = 1
    status_methods: AbstractSet[str] = frozenset({"GET", "HEAD"})
    retry_after: int | None = None
    truncate_at: int | None = None
    truncate_times: int | None = 1
    reset_at: int | None = None
    reset_times: int | None = 1
    slow_chunk_delay: float = 0.0
    slow_times: int | None = None
    change_etag_after: int | None = None
    oversize: int = 0
    lie_length: int | None = None
    on_get: int | None = None

    def __post_init__(self) -> None:
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(
                f"Fault.status must be an HTTP status from 100 to 599 "
                f"(got {self.status!r})"
            )
        methods = frozenset(self.status_methods)
        if not methods or not methods <= {"GET", "HEAD"}:
            raise ValueError(
                f"Fault.status_methods must be a non-empty subset of "
                f"{{'GET', 'HEAD'}} (got {self.status_methods!r})"
            )
        object.__setattr__(self, "status_methods", methods)
        for name in ("status_times", "truncate_times", "reset_times", "slow_times"):
            _check_count(name, getattr(self, name), allow_none=True)
        for name in ("truncate_at", "reset_at", "lie_length", "retry_after"):
            _check_count(name, getattr(self, name), allow_none=True, minimum=0)
        _check_count("oversize", self.oversize, allow_none=False, minimum=0)
        _check_count("change_etag_after", self.change_etag_after, allow_none=True)
        _check_count("on_get", self.on_get, allow_none=True)
        if not 0.0 <= self.slow_chunk_delay <= MAX_CHUNK_DELAY:
            raise ValueError(
                f"Fault.slow_chunk_delay must be between 0 and {MAX_CHUNK_DELAY} "
                f"seconds (got {self.slow_chunk_delay!r}); slow bodies are bounded"
            )


def _check_count(
    name: str, value: object, *, allow_none: bool, minimum: int = 1
) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= ``minimum`` (or None)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Fault.{name} must be an int >= {minimum} (got {value!r})")


@dataclass(frozen=True)
class Expected:
    """What a correct download of the current version of an artifact produces."""

    name: str
    version: int
    size: int
    sha256: str
    etag: str
    content_type: str
    last_modified: str
    content: bytes = field(repr=False)


def _new_counters() -> dict[str, Any]:
    return {
        "requests": 0,
        "methods": {"GET": 0, "HEAD": 0},
        "full_gets": 0,
        "range_gets": 0,
        "range_starts": {},
        "statuses": {},
        "bytes_sent": 0,
        "status_faults": 0,
        "truncated": 0,
        "resets": 0,
        "redirects": 0,
    }


def _copy_counters(counters: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in counters.items()}


def _add_counters(total: dict[str, Any], counters: dict[str, Any]) -> None:
    for key, value in counters.items():
        if isinstance(value, dict):
            bucket = total.setdefault(key, {})
            for sub, n in value.items():
                bucket[sub] = bucket.get(sub, 0) + n
        else:
            total[key] = total.get(key, 0) + value


@dataclass
class _Artifact:
    """One artifact's definition, current version, fault state and counters."""

    name: str
    size: int
    content_type: str
    version: int = 0
    fault: Fault = field(default_factory=Fault)
    gets: int = 0  # GETs since the fault was set
    body_gets: int = 0  # GETs answered with a body since the fault was set
    fired: dict[str, int] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=_new_counters)
    _content: bytes | None = None
    _content_version: int = -1

    def content(self, seed: int) -> bytes:
        """Return the current version's bytes, generated once and cached."""
        if self._content is None or self._content_version != self.version:
            rng = random.Random(f"{seed}:{self.name}:{self.size}:{self.version}")
            self._content = rng.randbytes(self.size)
            self._content_version = self.version
        return self._content

    def arm(self, fault: Fault) -> None:
        """Install ``fault`` and restart its request numbering and budgets."""
        self.fault, self.gets, self.body_gets, self.fired = fault, 0, 0, {}

    def try_fire(self, kind: str, budget: int | None) -> bool:
        """Spend one unit of a fault's budget; False when it is used up."""
        used = self.fired.get(kind, 0)
        if budget is not None and used >= budget:
            return False
        self.fired[kind] = used + 1
        return True


@dataclass
class _Reply:
    """A decided response: headers, the body slice and how to misbehave sending it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | memoryview = b""
    cut_at: int | None = None
    reset: bool = False
    delay: float = 0.0
    close: bool = False


def _guess_content_type(name: str) -> str:
    dot = name.rfind(".")
    return _CONTENT_TYPES.get(name[dot:].lower(), _DEFAULT_CONTENT_TYPE)


def _etag(content: bytes, version: int) -> str:
    return f'"{hashlib.sha256(content).hexdigest()[:24]}-v{version}"'


def _parse_range(header: str, length: int) -> tuple[int, int] | None | str:
    """Parse one ``bytes=`` range against ``length``.

    Returns ``(start, end)`` inclusive, ``None`` when the header must be ignored
    (malformed, several ranges, another unit) and ``"unsatisfiable"`` for 416.
    """
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if not first:
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return max(0, length - suffix), length - 1 if length else -1
        start = int(first)
        end = int(last) if last else None
    except ValueError:
        return None
    if start < 0 or (end is not None and end < start):
        return None
    if start >= length:
        return "unsatisfiable"
    return start, length - 1 if end is None else min(end, length - 1)


def _range_start(header: str, length: int) -> int | None:
    """The first byte a Range header asks for, for the counters; None if unparsable."""
    parsed = _parse_range(header, length)
    if isinstance(parsed, tuple):
        return parsed[0]
    _, _, spec = header.partition("=")
    first = spec.strip().partition("-")[0]
    return int(first) if first.isdigit() else None


class Origin:
    """An HTTP/1.1 origin on 127.0.0.1 serving deterministic artifacts with faults.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. Each
    artifact is served at ``/a/<name>`` (see :meth:`url`); ``/r/<k>/<name>``
    redirects k times before reaching it. All methods are thread-safe and may be
    called while the server runs.

    ``log`` receives one line per request and per server error; without it the
    server is silent. ``chunk_size`` is the size of each body write.
    """

    def __init__(
        self,
        artifacts: Mapping[str, int] | None = None,
        *,
        seed: int = 0,
        faults: Mapping[str, Fault] | None = None,
        port: int = 0,
        chunk_size: int = 16384,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (got {chunk_size!r})")
        self.seed = seed
        self.chunk_size = chunk_size
        self.log = log
        self._requested_port = port
        self._lock = threading.Lock()
        self._artifacts: dict[str, _Artifact] = {}
        self._not_found = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        for name, size in (artifacts or {}).items():
            self.add(name, size)
        for name, fault in (faults or {}).items():
            self.set_fault(name, fault)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Origin:
        """Bind 127.0.0.1 and serve from a daemon thread; returns ``self``."""
        if self._server is not None:
            raise RuntimeError(f"Origin is already serving at {self.base_url}")
        self._stopping.clear()
        server = _Server((HOST, self._requested_port), _Handler, self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"origin-{server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and join all threads; idempotent."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        server.join_threads()
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port the server is bound to."""
        if self._server is None:
            raise RuntimeError("Origin is not serving: call start() or use `with`")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        return f"http://{HOST}:{self.port}"

    def url(self, name: str) -> str:
        """The URL of artifact ``name``: ``http://127.0.0.1:PORT/a/<name>``."""
        return f"{self.base_url}/a/{quote(name, safe='')}"

    def redirect_url(self, name: str, hops: int) -> str:
        """A URL that answers ``302`` ``hops`` times before reaching :meth:`url`."""
        if hops < 0:
            raise ValueError(f"hops must be >= 0 (got {hops!r})")
        if hops == 0:
            return self.url(name)
        return f"{self.base_url}/r/{hops}/{quote(name, safe='')}"

    # -- artifacts and faults ------------------------------------------------

    def add(self, name: str, size: int, content_type: str | None = None) -> None:
        """Define an artifact of ``size`` bytes.

        Without ``content_type`` it follows the name's extension (``.pdf``,
        ``.html``, ``.xml``) and defaults to ``application/pdf``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"artifact name must be a non-empty str (got {name!r})")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size of {name!r} must be an int >= 0 (got {size!r})")
        ctype = content_type or _guess_content_type(name)
        with self._lock:
            if name in self._artifacts:
                raise ValueError(f"artifact {name!r} is already defined")
            self._artifacts[name] = _Artifact(name, size, ctype)

    def names(self) -> list[str]:
        """The names of all artifacts, in the order they were added."""
        with self._lock:
            return list(self._artifacts)

    def expected(self, name: str) -> Expected:
        """What a correct download of the artifact's current version produces."""
        with self._lock:
            art = self._get(name)
            content = art.content(self.seed)
            return Expected(
                name=name,
                version=art.version,
                size=art.size,
                sha256=hashlib.sha256(content).hexdigest(),
                etag=_etag(content, art.version),
                content_type=art.content_type,
                last_modified=formatdate(_EPOCH + art.version * 3600, usegmt=True),
                content=content,
            )

    def set_fault(self, name: str, fault: Fault | None = None, **fields: Any) -> Fault:
        """Replace the artifact's fault with ``fault`` or ``Fault(**fields)``.

        With neither, the artifact is healthy again. Request numbering and
        budgets restart from zero; counters are untouched.
        """
        if fault is not None and fields:
            raise TypeError("set_fault() takes a Fault or keyword fields, not both")
        new = fault if fault is not None else Fault(**fields)
        with self._lock:
            self._get(name).arm(new)
        return new

    def clear_fault(self, name: str) -> None:
        """Make the artifact healthy again."""
        self.set_fault(name, Fault())

    def bump_version(self, name: str) -> int:
        """Move the artifact to its next version (new content and ETag); returns it."""
        with self._lock:
            art = self._get(name)
            art.version += 1
            return art.version

    # -- counters ------------------------------------------------------------

    def counters(self, name: str) -> dict[str, Any]:
        """A snapshot of the artifact's counters as a plain dict.

        Keys: ``requests`` (HEAD + GET on ``/a/<name>``), ``methods``
        (``{"GET": n, "HEAD": n}``), ``full_gets`` (GETs answered ``200`` with
        the whole body), ``range_gets`` (GETs that carried a Range header),
        ``range_starts`` (``{first_byte: n}``), ``statuses`` (``{status: n}``),
        ``bytes_sent`` (body bytes handed to the socket), ``status_faults``,
        ``truncated``, ``resets`` (faults that fired) and ``redirects`` (hits on
        ``/r/.../<name>``, not counted in ``requests``). Everything is counted
        before the matching bytes are written, so a client that has read a
        response can assert on it at once.
        """
        with self._lock:
            return _copy_counters(self._get(name).counters)

    def total_counters(self) -> dict[str, Any]:
        """All artifacts' counters summed, plus ``not_found`` (404 answers)."""
        with self._lock:
            return self._total_locked()

    def _total_locked(self) -> dict[str, Any]:
        total = _new_counters()
        for art in self._artifacts.values():
            _add_counters(total, art.counters)
        total["not_found"] = self._not_found
        return total

    def reset_counters(self) -> None:
        """Zero all counters; faults, their budgets and versions are kept."""
        with self._lock:
            for art in self._artifacts.values():
                art.counters = _new_counters()
            self._not_found = 0

    def _counters_json(self) -> bytes:
        with self._lock:
            per = {n: _copy_counters(a.counters) for n, a in self._artifacts.items()}
            total = self._total_locked()
        return json.dumps({"total": total, "artifacts": per}).encode()

    def _manifest_json(self) -> bytes:
        manifest = {}
        for name in self.names():
            exp = self.expected(name)
            fields = dataclasses.asdict(exp)
            del fields["content"]
            manifest[name] = {"url": self.url(name), **fields}
        return json.dumps(manifest).encode()

    def _get(self, name: str) -> _Artifact:
        try:
            return self._artifacts[name]
        except KeyError:
            raise KeyError(
                f"no artifact named {name!r}; add it with Origin.add() first"
            ) from None

    # -- deciding responses (called by the handler) ------------------------

    def _count_not_found(self) -> None:
        with self._lock:
            self._not_found += 1

    def _count_redirect(self, name: str) -> bool:
        with self._lock:
            art = self._artifacts.get(name)
            if art is None:
                self._not_found += 1
                return False
            art.counters["redirects"] += 1
            return True

    def _count_bytes(self, name: str, n: int) -> None:
        with self._lock:
            self._artifacts[name].counters["bytes_sent"] += n

    def _decide(
        self, name: str, method: str, range_header: str | None, if_range: str | None
    ) -> _Reply | None:
        """Choose the response to a HEAD or GET of ``name``; None if unknown.

        Every counter, budget and version change happens here, under the lock,
        before anything is sent.
        """
        with self._lock:
            art = self._artifacts.get(name)
            if art is None:
                self._not_found += 1
                return None
            fault, counters = art.fault, art.counters
            counters["requests"] += 1
            counters["methods"][method] += 1
            if method == "GET":
                art.gets += 1
                if range_header is not None:
                    counters["range_gets"] += 1
            reply = self._decide_locked(art, fault, method, range_header, if_range)
            statuses = counters["statuses"]
            statuses[reply.status] = statuses.get(reply.status, 0) + 1
            return reply

    def _decide_locked(
        self,
        art: _Artifact,
        fault: Fault,
        method: str,
        range_header: str | None,
        if_range: str | None,
    ) -> _Reply:
        is_get = method == "GET"
        targeted = fault.on_get is None or (is_get and art.gets == fault.on_get)
        if (
            fault.status is not None
            and method in fault.status_methods
            and targeted
            and art.try_fire("status", fault.status_times)
        ):
            art.counters["status_faults"] += 1
            return self._status_reply(fault, head=not is_get)

        content = art.content(self.seed)
        etag = _etag(content, art.version)
        last_modified = formatdate(_EPOCH + art.version * 3600, usegmt=True)
        body: bytes | memoryview = content
        if fault.oversize and targeted:
            extra = random.Random(f"{self.seed}:{art.name}:oversize").randbytes(
                fault.oversize
            )
            body = content + extra
        headers = [
            ("Content-Type", art.content_type),
            ("ETag", etag),
            ("Last-Modified", last_modified),
            ("Accept-Ranges", "bytes"),
        ]
        lie = fault.lie_length if targeted else None
        if not is_get:
            length = str(len(body) if lie is None else lie)
            return _Reply(200, [*headers, ("Content-Length", length)], close=False)

        reply = self._get_reply(
            art, body, headers, range_header, if_range, etag, last_modified
        )
        if reply.status == 200 and lie is not None:
            reply.headers[-1] = ("Content-Length", str(lie))
            reply.close = True
        if reply.status in (200, 206):
            self._arm_body_faults(art, fault, targeted, reply)
        return reply

    def _status_reply(self, fault: Fault, *, head: bool) -> _Reply:
        assert fault.status is not None
        text = f"{fault.status} injected by docstokg_idem origin\n".encode()
        headers = [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(text))),
        ]
        if fault.retry_after is not None:
            headers.append(("Retry-After", str(fault.retry_after)))
        return _Reply(fault.status, headers, b"" if head else text)

    def _get_reply(
        self,
        art: _Artifact,
        body: bytes | memoryview,
        headers: list[tuple[str, str]],
        range_header: str | None,
        if_range: str | None,
        etag: str,
        last_modified: str,
    ) -> _Reply:
        """Answer a GET with 200, 206 or 416 following Range and If-Range.

        ``If-Range`` must equal the current strong ETag or the Last-Modified date
        exactly for the range to be honoured; otherwise the whole body is sent.
        """
        size = len(body)
        parsed = None
        if range_header is not None:
            start = _range_start(range_header, size)
            if start is not None:
                starts = art.counters["range_starts"]
                starts[start] = starts.get(start, 0) + 1
            if if_range is None or if_range.strip() in (etag, last_modified):
                parsed = _parse_range(range_header, size)
        if parsed == "unsatisfiable":
            no_body = [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")]
            return _Reply(416, [*headers, *no_body])
        if isinstance(parsed, tuple):
            start, end = parsed
            partial = [
                ("Content-Range", f"bytes {start}-{end}/{size}"),
                ("Content-Length", str(end - start + 1)),
            ]
            return _Reply(206, [*headers, *partial], memoryview(body)[start : end + 1])
        art.counters["full_gets"] += 1
        return _Reply(200, [*headers, ("Content-Length", str(size))], body)

    def _arm_body_faults(
        self, art: _Artifact, fault: Fault, targeted: bool, reply: _Reply
    ) -> None:
        length = len(reply.body)
        if targeted:
            if (
                fault.reset_at is not None
                and fault.reset_at < length
                and art.try_fire("reset", fault.reset_times)
            ):
                reply.cut_at, reply.reset = fault.reset_at, True
                art.counters["resets"] += 1
            elif (
                fault.truncate_at is not None
                and fault.truncate_at < length
                and art.try_fire("truncate", fault.truncate_times)
            ):
                reply.cut_at = fault.truncate_at
                art.counters["truncated"] += 1
            if fault.slow_chunk_delay and art.try_fire("slow", fault.slow_times):
                reply.delay = fault.slow_chunk_delay
        art.body_gets += 1
        if art.body_gets == fault.change_etag_after:
            art.version += 1


class _Server(ThreadingHTTPServer):
    """The threading server, tracking connections and threads so stop() ends both.

    Handler threads are daemons, so a forgotten origin never delays interpreter
    exit; the server keeps its own list of them (the standard library only joins
    non-daemon threads) and :meth:`join_threads` waits for them after
    :meth:`close_connections` has woken any that were idle or blocked.
    """

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        origin: Origin,
    ) -> None:
        self.origin = origin
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._handler_threads: list[threading.Thread] = []
        self._closing = False
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection on a new daemon thread that stop() will join."""
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"origin-{self.server_address[1]}-conn",
            daemon=True,
        )
        with self._conn_lock:
            alive = [t for t in self._handler_threads if t.is_alive()]
            self._handler_threads = [*alive, thread]
        thread.start()

    def join_threads(self) -> None:
        """Wait for every handler thread; each is bounded by the handler timeout."""
        with self._conn_lock:
            threads, self._handler_threads = self._handler_threads, []
        for thread in threads:
            thread.join(_HANDLER_TIMEOUT)

    def track(self, conn: socket.socket) -> None:
        """Remember an accepted connection; shut it at once if stop() has begun."""
        with self._conn_lock:
            if not self._closing:
                self._connections.add(conn)
                return
        _try_shutdown(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        """Shut every open connection so idle keep-alive handlers return."""
        with self._conn_lock:
            self._closing = True
            conns = list(self._connections)
        for conn in conns:
            _try_shutdown(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _DISCONNECTS) or self.origin._stopping.is_set():
            return
        if self.origin.log is not None:
            self.origin.log(f"error serving {client_address}: {exc!r}")
        else:
            logger.exception("origin failed serving %s", client_address)


def _try_shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    """Routes ``/a/``, ``/r/``, ``/_counters`` and ``/_manifest``."""

    protocol_version = "HTTP/1.1"
    server_version = "docstokg-idem-origin/1"
    timeout = _HANDLER_TIMEOUT
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without NODELAY, Nagle and
        # the client's delayed ACK stall every small response by ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection)

    def finish(self) -> None:
        self.server.untrack(self.connection)
        try:
            super().finish()
        except (*_DISCONNECTS, ValueError):
            pass

    def log_message(self, format: str, *args: Any) -> None:
        log = self.server.origin.log
        if log is not None:
            log(f"{self.address_string()} {format % args}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        try:
            self._route(method)
        except _DISCONNECTS:
            self.close_connection = True

    def _route(self, method: str) -> None:
        origin = self.server.origin
        path = urlsplit(self.path).path
        parts = path.split("/")
        if path == "/_counters" and method == "GET":
            self._send_json(origin._counters_json())
        elif path == "/_manifest" and method == "GET":
            self._send_json(origin._manifest_json())
        elif len(parts) == 3 and parts[1] == "a" and parts[2]:
            self._artifact(unquote(parts[2]), method)
        elif len(parts) == 4 and parts[1] == "r" and parts[2].isdigit():
            self._redirect(int(parts[2]), unquote(parts[3]), method)
        else:
            origin._count_not_found()
            self._send_simple(404, b"not found\n", method)

    def _artifact(self, name: str, method: str) -> None:
        reply = self.server.origin._decide(
            name, method, self.headers.get("Range"), self.headers.get("If-Range")
        )
        if reply is None:
            self._send_simple(404, b"no such artifact\n", method)
            return
        self._send_head(reply.status, reply.headers, close=reply.close)
        if method == "GET":
            self._send_body(name, reply)

    def _redirect(self, hops: int, name: str, method: str) -> None:
        origin = self.server.origin
        if hops < 1 or not origin._count_redirect(name):
            self._send_simple(404, b"no such redirect\n", method)
            return
        location = origin.redirect_url(name, hops - 1)
        headers = [("Location", location), ("Content-Length", "0")]
        self._send_head(302, headers)

    def _send_json(self, payload: bytes) -> None:
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
        ]
        self._send_head(200, headers)
        self.wfile.write(payload)

    def _send_simple(self, status: int, text: bytes, method: str) -> None:
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))]
        self._send_head(status, headers)
        if method == "GET":
            self.wfile.write(text)

    def _send_head(
        self, status: int, headers: list[tuple[str, str]], *, close: bool = False
    ) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send_body(self, name: str, reply: _Reply) -> None:
        """Write the body in chunks, then truncate or reset if the reply says so."""
        origin = self.server.origin
        view = memoryview(reply.body)
        stop_at = len(view) if reply.cut_at is None else reply.cut_at
        for start in range(0, stop_at, origin.chunk_size):
            if start and reply.delay and origin._stopping.wait(reply.delay):
                self.close_connection = True
                return
            chunk = view[start : min(start + origin.chunk_size, stop_at)]
            origin._count_bytes(name, len(chunk))
            self.wfile.write(chunk)
        if reply.reset:
            self._abort_with_rst()
        elif reply.cut_at is not None:
            self.close_connection = True

    def _abort_with_rst(self) -> None:
        """Close the connection with SO_LINGER 0, so the peer receives a TCP RST."""
        self.close_connection = True
        conn = self.connection
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.server.untrack(conn)
        # The read file holds a reference that would delay the real close; the
        # write side is unbuffered and is left for handle() to flush harmlessly.
        self.rfile.close()
        conn.close()


def main(argv: list[str] | None = None) -> int:
    """Serve ``--artifacts`` artifacts of ``--size`` bytes until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m docstokg_idem.pipeline.origin",
        description="Serve deterministic artifacts over HTTP on 127.0.0.1.",
    )
    parser.add_argument("--artifacts", type=int, default=10, help="how many")
    parser.add_argument("--size", type=int, default=100_000, help="bytes each")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0, help="content seed")
    parser.add_argument("--log", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)

    artifacts = {f"artifact-{i:04d}.pdf": args.size for i in range(args.artifacts)}
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.log else None
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    with Origin(artifacts, seed=args.seed, port=args.port, log=log) as origin:
        print(origin.base_url, flush=True)
        names = origin.names()
        shown = ", ".join(origin.url(n) for n in names[:2])
        print(
            f"serving {len(names)} artifacts: {shown}{', …' if len(names) > 2 else ''} "
            f"(all of them: {origin.base_url}/_manifest)",
            file=sys.stderr,
            flush=True,
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
