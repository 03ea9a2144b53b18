"""Deterministic keys: canonical JSON, canonical URLs, job and op keys (I12).

A key is the SHA-256 of the canonical JSON of a small, versioned record. The same
inputs give the same key in every process, Python version and dict order, and
different inputs give different keys: fields are never joined with a separator,
they are JSON values in an object, so ``"a|b"`` and ``("a", "b")`` cannot meet.

Canonical JSON here is this module's own, narrow format, written out by hand so
that every rule is visible below. It is close to, but not the same as, RFC 8785
(JCS): keys are sorted by code point rather than by UTF-16 unit, strings are
NFC-normalized, and numbers follow the single rule of :func:`canonical_json`.
The golden vectors in ``tests/unit/golden_keys.json`` pin the exact bytes;
changing any rule changes keys already stored, so it needs a new ``"v"``.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json as _json
import math
import re
import reprlib
import unicodedata
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from .errors import CanonicalJSONError, InvalidURL, KeyFieldMissing

__all__ = [
    "KEY_VERSION",
    "canonical_json",
    "canonical_url",
    "job_key",
    "op_key",
    "request_fingerprint",
]

#: Version of the key records; part of every hashed record as ``"v"``.
KEY_VERSION = 1

# Floats below this magnitude that hold a whole number are written as that
# integer: every integer up to 2**53 is exactly representable as a float.
_EXACT_INT_LIMIT = 2**53

_STRING_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
_STRING_ESCAPES.update(
    {chr(c): f"\\u{c:04x}" for c in range(0x20) if chr(c) not in _STRING_ESCAPES}
)
_ESCAPE_TABLE = str.maketrans(_STRING_ESCAPES)
_SURROGATE = re.compile("[\ud800-\udfff]")

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80


def canonical_json(obj: object) -> bytes:
    """Encode ``obj`` as canonical JSON bytes.

    The output is UTF-8 (nothing is escaped to ``\\uXXXX`` except ``"``, ``\\``
    and control characters below U+0020), with no whitespace: separators are
    ``,`` and ``:``. Every string, dict keys included, is NFC-normalized first;
    object keys are then sorted by code point (the same order as their UTF-8
    bytes). Keys must be ``str``, and two keys that are equal after NFC are an
    error. Lists and tuples both encode as arrays; ``True``/``False`` as
    ``true``/``false``; ``None`` as ``null``.

    The number rule: an ``int`` is written in decimal. A ``float`` that holds a
    whole number of magnitude below 2**53 is written exactly as that integer
    (``1.0`` → ``1``, ``-0.0`` → ``0``), so ``1`` and ``1.0`` encode alike. Any
    other finite float is written with Python's shortest round-trip ``repr``
    (``0.1`` → ``0.1``, ``1e16`` → ``1e+16``, ``2.0**53`` →
    ``9007199254740992.0``). NaN and ±Infinity are rejected.

    Anything else (bytes, sets, dates, Decimals, arbitrary objects) is rejected
    rather than guessed at, as is a container that contains itself.

    Raises:
        CanonicalJSONError: a value or key breaks one of the rules above; the
            message gives its path from the root (``$['ctx'][0]``).
    """
    if _plain(obj, 0):
        # ASCII strings are NFC already, and for these types the standard
        # encoder writes exactly what the rules above say (tested).
        text = _json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return text.encode("utf-8")
    out: list[str] = []
    _encode(obj, "$", set(), out)
    return "".join(out).encode("utf-8")


_INT_LIMIT = 1 << 63


def _plain(value: object, depth: int) -> bool:
    """Whether ``value`` holds only ASCII strings, small ints, bools, None, nesting."""
    kind = type(value)
    if kind is str:
        return value.isascii()  # type: ignore[attr-defined, no-any-return]
    if kind is int:
        return -_INT_LIMIT < value < _INT_LIMIT  # type: ignore[operator]
    if value is None or kind is bool:
        return True
    if depth >= 4:
        return False
    if kind is dict:
        return all(
            type(k) is str and k.isascii() and _plain(v, depth + 1)
            for k, v in value.items()  # type: ignore[attr-defined]
        )
    if kind is list:
        return all(_plain(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    return False


def _encode(value: object, path: str, active: set[int], out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(_encode_int(value, path))
    elif isinstance(value, float):
        out.append(_encode_float(value, path))
    elif isinstance(value, str):
        out.append(_encode_str(value, path))
    elif isinstance(value, Mapping):
        with _entered(value, path, active):
            _encode_object(value, path, active, out)
    elif isinstance(value, (list, tuple)):
        with _entered(value, path, active):
            _encode_array(value, path, active, out)
    else:
        raise CanonicalJSONError(
            f"canonical JSON cannot encode {type(value).__name__} at {path} "
            f"(value {_repr.repr(value)}); only dict with str keys, list, tuple, "
            f"str, int, float, bool and None are allowed. Convert it first "
            f"(bytes: decode or hex-encode them; a set: a sorted list)."
        )


@contextmanager
def _entered(container: object, path: str, active: set[int]) -> Iterator[None]:
    # Track the containers on the current path, so a cycle raises, not recurses.
    if id(container) in active:
        raise CanonicalJSONError(
            f"canonical JSON cannot encode the container at {path}: it contains "
            f"itself, and a cycle has no JSON form. Break the cycle."
        )
    active.add(id(container))
    try:
        yield
    finally:
        active.discard(id(container))


def _encode_int(value: int, path: str) -> str:
    try:
        return int.__repr__(value)
    except ValueError as error:  # more digits than sys.get_int_max_str_digits()
        raise CanonicalJSONError(
            f"canonical JSON cannot encode the int at {path}: {error}. Integers "
            f"are written in decimal; pass a number this large as a str."
        ) from None


def _encode_float(value: float, path: str) -> str:
    if not math.isfinite(value):
        raise CanonicalJSONError(
            f"canonical JSON cannot encode {value!r} at {path}: NaN and "
            f"±Infinity have no JSON form. Replace it with null or a string."
        )
    if value.is_integer() and abs(value) < _EXACT_INT_LIMIT:
        return int.__repr__(int(value))
    return float.__repr__(value)


def _encode_str(value: str, path: str) -> str:
    text = _nfc(value)
    if _SURROGATE.search(text):
        raise CanonicalJSONError(
            f"canonical JSON cannot encode the str at {path} "
            f"({_repr.repr(value)}): it holds a lone surrogate, which is not "
            f"valid UTF-8. Fix the decoding that produced it."
        )
    return '"' + text.translate(_ESCAPE_TABLE) + '"'


def _encode_object(
    mapping: Mapping[object, object], path: str, active: set[int], out: list[str]
) -> None:
    members: dict[str, object] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise CanonicalJSONError(
                f"canonical JSON object keys must be str; the key {_repr.repr(key)} "
                f"at {path} has type {type(key).__name__}. Convert the key to a str "
                f"before encoding."
            )
        name = _nfc(key)
        if name in members:
            raise CanonicalJSONError(
                f"canonical JSON object at {path} has two keys equal to {name!r} "
                f"after NFC normalization; keys must stay distinct. Merge them or "
                f"rename one."
            )
        members[name] = value

    out.append("{")
    for index, name in enumerate(sorted(members)):
        if index:
            out.append(",")
        member_path = f"{path}[{name!r}]"
        out.append(_encode_str(name, member_path))
        out.append(":")
        _encode(members[name], member_path, active, out)
    out.append("}")


def _encode_array(
    items: list[object] | tuple[object, ...],
    path: str,
    active: set[int],
    out: list[str],
) -> None:
    out.append("[")
    for index, item in enumerate(items):
        if index:
            out.append(",")
        _encode(item, f"{path}[{index}]", active, out)
    out.append("]")


def _nfc(text: str) -> str:
    # str.__str__ yields a plain str even for a str subclass with its own __str__.
    return unicodedata.normalize("NFC", str.__str__(text))


# --- URLs ---------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}

# RFC 3986, appendix B: scheme, authority, path, query, fragment.
_URL_PARTS = re.compile(r"^(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?")
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]*")
_REG_NAME = re.compile(r"[A-Za-z0-9._~-]+")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
_PORT = re.compile(r"[0-9]{1,5}")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)


def canonical_url(url: str) -> str:
    """Return the canonical form of an http(s) URL, for use in a job key.

    The rules are conservative: two URLs become equal only when RFC 3986 makes
    them equivalent for http(s), so distinct resources never share a key. The
    scheme and host are lower-cased; the default port (80 for http, 443 for
    https) is dropped, and so is an empty port (``host:``), while any other port
    is kept, written without leading zeros; an empty path becomes ``/``; in the path,
    percent-escapes of unreserved characters (letters, digits, ``-._~``) are
    decoded and the hex digits of all other escapes are upper-cased
    (``%7e`` → ``~``, ``%2f`` → ``%2F``). An escaped dot stays escaped when
    decoding it would make a ``.`` or ``..`` segment. Nothing else changes:
    ``%2F`` stays encoded, trailing slashes and dot segments stay, IP hosts and
    IPv6 brackets stay, and the query is kept byte for byte, in its order,
    even when empty (``?``). The fragment (``#...``) is dropped: it is never
    sent to the server, so it cannot change what is fetched.

    The result is a fixed point: ``canonical_url(canonical_url(u))`` equals
    ``canonical_url(u)``.

    Raises:
        InvalidURL: ``url`` is not a str; holds spaces, control or non-ASCII
            characters; has no scheme, a scheme other than http or https, no
            host, user info (``user:pass@``), a bad port, a bad IPv6 literal, or
            a malformed percent-escape in its path.
    """
    if not isinstance(url, str):
        raise InvalidURL(
            f"URL must be a str, got {type(url).__name__} {_repr.repr(url)}. "
            f"Pass the URL as text."
        )
    _ensure_printable_ascii(url)
    match = _URL_PARTS.match(url)
    assert match is not None  # every group is optional, so the pattern matches
    raw_scheme, authority, path, query = match.groups()

    scheme = _ensure_scheme(url, raw_scheme)
    host, port = _split_authority(url, authority)
    port_text = "" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}"
    path = _normalize_path(url, path) if path else "/"
    query_text = "" if query is None else f"?{query}"
    return f"{scheme}://{host}{port_text}{path}{query_text}"


def _ensure_printable_ascii(url: str) -> None:
    if _PRINTABLE_ASCII.fullmatch(url):
        return
    bad = next(c for c in url if not "\x21" <= c <= "\x7e")
    raise InvalidURL(
        f"URL {url!r} contains {bad!r}; a URL may hold only printable ASCII "
        f"without spaces. Percent-encode spaces and non-ASCII path or query "
        f"characters as UTF-8 (%20, %C3%A9) and write non-ASCII host names in "
        f"their IDNA form (xn--...)."
    )


def _ensure_scheme(url: str, raw_scheme: str | None) -> str:
    scheme = (raw_scheme or "").lower()
    if scheme not in _DEFAULT_PORTS:
        found = "no scheme" if raw_scheme is None else f"{raw_scheme!r} before ':'"
        raise InvalidURL(
            f"URL {url!r} has no http or https scheme (found {found}); only "
            f"absolute http:// and https:// URLs can be fetched. Write the full "
            f"URL with its scheme, such as 'https://example.com/paper.pdf'."
        )
    return scheme


def _split_authority(url: str, authority: str | None) -> tuple[str, int | None]:
    if not authority:
        raise InvalidURL(
            f"URL {url!r} has no host; an http(s) URL needs '//host' after the "
            f"scheme, as in 'https://example.com/paper.pdf'."
        )
    if "@" in authority:
        raise InvalidURL(
            f"URL {url!r} carries user info before '@'; credentials must not go "
            f"into a job key, the database or logs. Remove them from the URL and "
            f"pass them to the HTTP client separately."
        )
    if authority.startswith("["):
        bracketed, close, port_part = authority.partition("]")
        host = _ensure_ipv6_host(url, bracketed + close)
    else:
        name, colon, port = authority.partition(":")
        host = _ensure_reg_name(url, name)
        port_part = colon + port
    return host, _parse_port(url, port_part)


def _ensure_ipv6_host(url: str, host: str) -> str:
    literal = host[1:-1]
    if not host.endswith("]") or not _IPV6_CHARS.fullmatch(literal):
        raise InvalidURL(
            f"URL {url!r} has a bracketed host {host!r} that is not a plain IPv6 "
            f"address (zone ids and IPvFuture are not supported). Write it as "
            f"'[2001:db8::1]'."
        )
    try:
        ipaddress.IPv6Address(literal)
    except ValueError as error:
        raise InvalidURL(
            f"URL {url!r} has an invalid IPv6 host {host!r}: {error}. Write a "
            f"valid address in brackets, such as '[2001:db8::1]'."
        ) from None
    return host.lower()


def _ensure_reg_name(url: str, host: str) -> str:
    if not host:
        raise InvalidURL(
            f"URL {url!r} has no host; an http(s) URL needs a host name or IP "
            f"address after '//', as in 'https://example.com/paper.pdf'."
        )
    if not _REG_NAME.fullmatch(host):
        raise InvalidURL(
            f"URL {url!r} has the host {host!r}; a host may hold only letters, "
            f"digits, '-', '.', '_' and '~' (an IPv6 address goes in brackets). "
            f"Fix the host name."
        )
    return host.lower()


def _parse_port(url: str, port_part: str) -> int | None:
    if port_part in ("", ":"):
        return None  # an empty port means the scheme's default (RFC 3986 §6.2.3)
    digits = port_part[1:]
    if not port_part.startswith(":") or not _PORT.fullmatch(digits):
        raise InvalidURL(
            f"URL {url!r} has the port part {port_part!r}; a port is ':' then "
            f"1 to 5 digits. Fix or remove the port."
        )
    port = int(digits)
    if not 1 <= port <= 65535:
        raise InvalidURL(
            f"URL {url!r} has the port {port}; a port must be between 1 and "
            f"65535. Fix or remove the port."
        )
    return port


def _normalize_path(url: str, path: str) -> str:
    bad = _BAD_ESCAPE.search(path)
    if bad:
        raise InvalidURL(
            f"URL {url!r} has a '%' at path offset {bad.start()} that does not "
            f"start a percent-escape (two hex digits); its meaning is ambiguous. "
            f"Write a literal '%' as %25."
        )
    return "/".join(_normalize_segment(segment) for segment in path.split("/"))


def _normalize_segment(segment: str) -> str:
    decoded = _ESCAPE.sub(_decode_unreserved, segment)
    if decoded in (".", "..") and segment != decoded:
        # Decoding %2E here would create a dot segment that clients resolve
        # away; keep the escape, only upper-cased, so the meaning is unchanged.
        return _ESCAPE.sub(lambda m: m.group().upper(), segment)
    return decoded


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group().upper()


# --- keys -----------------------------------------------------------------------

# job_key's parameter ``canonical_url`` shadows the function; it calls this alias.
_canonicalize_url = canonical_url


def job_key(
    work_id: str | None = None,
    artifact_id: str | None = None,
    canonical_url: str | None = None,
) -> str:
    """Return the key of a job: 64 lowercase hex digits.

    The key is the SHA-256 of the canonical JSON of ``{"v": 1, "work_id": ...,
    "artifact_id": ..., "url": ...}``. The URL is canonicalized here again (the
    rule is idempotent), so a caller may pass it raw or already canonical. Ids
    are hashed as given, after NFC normalization; surrounding blanks are not
    stripped.

    Raises:
        KeyFieldMissing: a field is missing, ``None``, empty or only blanks; the
            message names it. Such a job has no key, so it can never share one.
        TypeError: a field is not a str.
        InvalidURL: the URL breaks a rule of :func:`canonical_url`.
    """
    record = {
        "v": KEY_VERSION,
        "work_id": _ensure_field("job", "work_id", work_id),
        "artifact_id": _ensure_field("job", "artifact_id", artifact_id),
        "url": _canonicalize_url(_ensure_field("job", "canonical_url", canonical_url)),
    }
    return _sha256_hex(canonical_json(record))


def job_key_and_url(
    work_id: str | None, artifact_id: str | None, url: str | None
) -> tuple[str, str]:
    """The job key and the canonical URL it was derived from, in one pass."""
    work = _ensure_field("job", "work_id", work_id)
    artifact = _ensure_field("job", "artifact_id", artifact_id)
    canonical = _canonicalize_url(_ensure_field("job", "canonical_url", url))
    record = {
        "v": KEY_VERSION,
        "work_id": work,
        "artifact_id": artifact,
        "url": canonical,
    }
    return _sha256_hex(canonical_json(record)), canonical


def op_key(kind: str, job_id: str, **context: object) -> str:
    """Return the key of one side effect of a job: 64 lowercase hex digits.

    The key is the SHA-256 of the canonical JSON of ``{"v": 1, "kind": kind,
    "job_id": job_id, "ctx": context}``, so every keyword given as context
    (a byte range, a validator, a target path...) is part of the key.

    Raises:
        KeyFieldMissing: ``kind`` or ``job_id`` is ``None``, empty or only
            blanks; the message names it.
        TypeError: ``kind`` or ``job_id`` is not a str.
        CanonicalJSONError: a context value cannot be encoded.
    """
    if not context and type(kind) is str and type(job_id) is str:
        return _plain_op_key(kind, job_id)
    record = {
        "v": KEY_VERSION,
        "kind": _ensure_field("op", "kind", kind),
        "job_id": _ensure_field("op", "job_id", job_id),
        "ctx": context,
    }
    return _sha256_hex(canonical_json(record))


@functools.lru_cache(maxsize=4096)
def _plain_op_key(kind: str, job_id: str) -> str:
    record = {
        "v": KEY_VERSION,
        "kind": _ensure_field("op", "kind", kind),
        "job_id": _ensure_field("op", "job_id", job_id),
        "ctx": {},
    }
    return _sha256_hex(canonical_json(record))


def request_fingerprint(obj: object) -> str:
    """Return the SHA-256 of ``obj``'s canonical JSON: 64 lowercase hex digits.

    The ledger stores it next to an op key, so an op key reused with a different
    request is detected instead of being answered with another request's result.

    Raises:
        CanonicalJSONError: ``obj`` cannot be encoded.
    """
    return _sha256_hex(canonical_json(obj))


def _ensure_field(owner: str, name: str, value: object) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        state = "missing (None)" if value is None else f"empty ({value!r})"
        raise KeyFieldMissing(
            f"{owner} key field {name!r} is {state}; every key field needs a "
            f"non-blank value, or different records would share a key. Supply "
            f"{name!r} or leave this record out."
        )
    if not isinstance(value, str):
        raise TypeError(
            f"{owner} key field {name!r} must be a str, got "
            f"{type(value).__name__} {_repr.repr(value)}. Convert it with str() "
            f"first, the same way everywhere, so that keys stay stable."
        )
    return value


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
