"""HTTP for the pipeline, on urllib3: timeouts, retries, redirects, limits.

- only ``http`` and ``https``, also after a redirect;
- connect and read timeouts;
- retries with exponential backoff on connection errors and on 429, 500, 502,
  503 and 504, honouring ``Retry-After`` up to a cap;
- a bounded number of redirects;
- a maximum body size, checked against ``Content-Length`` and while reading;
- a per-host limit on concurrent requests shared by every worker process of a
  run, through advisory lock files (one per slot) in a folder of the run.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.util.retry import Retry

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class HttpError(Exception):
    """A request failed. ``retryable`` tells whether a later attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class BodyTooLarge(HttpError, ValueError):
    """The body is over the configured maximum; never retried."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False)


@dataclass(frozen=True)
class HttpConfig:
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 4
    backoff_s: float = 0.2
    backoff_max_s: float = 10.0
    retry_after_max_s: int = 60
    max_redirects: int = 5
    max_body_bytes: int = 2 << 30
    per_host: int = 8
    user_agent: str = "docstokg-idem/0.1"


@dataclass(frozen=True)
class Head:
    """What a HEAD told: final URL after redirects, status, size, validators."""

    url: str
    status: int
    size: int | None
    etag: str | None
    last_modified: str | None
    content_type: str | None
    accept_ranges: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.status,
            "size": self.size,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "content_type": self.content_type,
            "accept_ranges": self.accept_ranges,
        }


class HostSlots:
    """A cross-process limit of concurrent requests per host (flock slot files).

    Each host has ``per_host`` slot files in a folder of the run; a request
    holds an exclusive lock on one of them. The files stay open for the life of
    the client, so taking a slot costs one ``flock`` call when one is free.
    """

    def __init__(self, folder: str | os.PathLike[str] | None, per_host: int):
        self.folder = Path(folder) if folder else None
        self.per_host = max(1, per_host)
        self._fds: dict[str, list[int]] = {}

    def _slots(self, host: str) -> list[int]:
        fds = self._fds.get(host)
        if fds is None:
            assert self.folder is not None
            tag = hashlib.sha256(host.encode()).hexdigest()[:16]
            self.folder.mkdir(parents=True, exist_ok=True)
            fds = [
                os.open(self.folder / f"{tag}.{i}.slot", os.O_RDWR | os.O_CREAT, 0o644)
                for i in range(self.per_host)
            ]
            self._fds[host] = fds
        return fds

    @contextmanager
    def hold(self, url: str) -> Iterator[None]:
        if self.folder is None:
            yield
            return
        fds = self._slots(urlsplit(url).netloc.lower())
        order = random.sample(fds, len(fds))
        held = None
        for fd in order:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = fd
                break
            except BlockingIOError:
                continue
        if held is None:
            held = order[0]
            fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)

    def close(self) -> None:
        for fds in self._fds.values():
            for fd in fds:
                os.close(fd)
        self._fds.clear()


class Client:
    """The pipeline's HTTP client; one per worker process."""

    def __init__(
        self,
        config: HttpConfig | None = None,
        *,
        slots_dir: str | os.PathLike[str] | None = None,
    ):
        self.config = config or HttpConfig()
        c = self.config
        self.retry = Retry(
            total=c.retries + c.max_redirects,
            connect=c.retries,
            read=c.retries,
            status=c.retries,
            other=0,
            redirect=c.max_redirects,
            allowed_methods=frozenset({"HEAD", "GET"}),
            status_forcelist=RETRY_STATUSES,
            backoff_factor=c.backoff_s,
            backoff_max=c.backoff_max_s,
            retry_after_max=c.retry_after_max_s,
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=True,
        )
        self.pool = urllib3.PoolManager(
            num_pools=16,
            maxsize=4,
            retries=self.retry,
            timeout=urllib3.Timeout(connect=c.connect_timeout_s, read=c.read_timeout_s),
            headers={"User-Agent": c.user_agent},
        )
        self.slots = HostSlots(slots_dir, c.per_host)

    def close(self) -> None:
        self.pool.clear()
        self.slots.close()

    def head(self, url: str) -> Head:
        """Send a HEAD (following redirects); raise :class:`HttpError` on failure."""
        ensure_http_url(url)
        with self.slots.hold(url):
            resp = self._request("HEAD", url, {})
        try:
            self._check_status(resp, url, "HEAD")
            size = _int_header(resp, "Content-Length")
            self._check_size(size, url)
            return Head(
                url=_final_url(resp, url),
                status=resp.status,
                size=size,
                etag=resp.headers.get("ETag"),
                last_modified=resp.headers.get("Last-Modified"),
                content_type=resp.headers.get("Content-Type"),
                accept_ranges="bytes" in resp.headers.get("Accept-Ranges", ""),
            )
        finally:
            resp.release_conn()

    @contextmanager
    def get(
        self, url: str, *, start: int = 0, if_range: str | None = None
    ) -> Iterator[urllib3.BaseHTTPResponse]:
        """Open a streamed GET, from byte ``start`` (with ``If-Range``) if > 0.

        The response's status tells what came: 206 continues at ``start``; 200
        is the whole body (the validator changed, or ranges are not served).
        """
        ensure_http_url(url)
        headers = {}
        if start > 0:
            headers["Range"] = f"bytes={start}-"
            if if_range:
                headers["If-Range"] = if_range
        with self.slots.hold(url):
            resp = self._request("GET", url, headers, stream=True)
            try:
                self._check_status(resp, url, "GET")
                self._check_size(_int_header(resp, "Content-Length"), url)
                yield resp
            except BaseException:
                resp.close()  # a half-read body must not go back to the pool
                raise
            finally:
                resp.release_conn()

    def _request(
        self, method: str, url: str, headers: dict[str, str], stream: bool = False
    ) -> urllib3.BaseHTTPResponse:
        try:
            return self.pool.request(
                method, url, headers=headers, preload_content=not stream, redirect=True
            )
        except urllib3.exceptions.MaxRetryError as exc:
            reason = exc.reason
            if isinstance(
                reason, urllib3.exceptions.ResponseError
            ) and "redirect" in str(reason):
                raise HttpError(
                    f"{method} {url}: more than {self.config.max_redirects} "
                    "redirects; raise --max-redirects or fix the URL",
                    retryable=False,
                ) from None
            raise HttpError(
                f"{method} {url}: gave up after {self.config.retries} "
                f"retries: {reason}",
                retryable=True,
            ) from None
        except urllib3.exceptions.LocationValueError as exc:
            raise HttpError(
                f"{method} {url}: bad URL ({exc})", retryable=False
            ) from None
        except urllib3.exceptions.HTTPError as exc:
            raise HttpError(
                f"{method} {url}: {type(exc).__name__}: {exc}", retryable=True
            ) from None

    def _check_status(
        self, resp: urllib3.BaseHTTPResponse, url: str, method: str
    ) -> None:
        if resp.status in (200, 206):
            return
        retryable = resp.status in RETRY_STATUSES
        raise HttpError(
            f"{method} {url}: HTTP {resp.status}"
            + (" after retries" if retryable else ""),
            retryable=retryable,
            status=resp.status,
        )

    def _check_size(self, size: int | None, url: str) -> None:
        limit = self.config.max_body_bytes
        if size is not None and size > limit:
            raise BodyTooLarge(
                f"{url}: body of {size} bytes is over the maximum of {limit} bytes; "
                "raise --max-body-bytes if this artifact is expected to be that large"
            )


def ensure_http_url(url: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise HttpError(
            f"URL {url!r} has scheme {scheme!r}; only http and https are "
            "fetched: fix the plan row",
            retryable=False,
        )


def _int_header(resp: urllib3.BaseHTTPResponse, name: str) -> int | None:
    value = resp.headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _final_url(resp: urllib3.BaseHTTPResponse, url: str) -> str:
    """The URL the response came from, after following its redirects."""
    final = url
    for step in resp.retries.history if resp.retries else ():
        if step.redirect_location:
            final = urljoin(final, step.redirect_location)
    return final
