"""Tests of docstokg_idem.core.keys: canonical JSON, URLs, job and op keys (I12)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from docstokg_idem.core.errors import CanonicalJSONError, InvalidURL, KeyFieldMissing
from docstokg_idem.core.keys import (
    canonical_json,
    canonical_url,
    job_key,
    op_key,
    request_fingerprint,
)

GOLDEN = json.loads(
    (Path(__file__).with_name("golden_keys.json")).read_text(encoding="utf-8")
)

# Hypothesis must not write an example database into the checkout.
no_database = settings(database=None)

URL = "https://example.com/paper.pdf"
COMPOSED = "caf\u00e9"
DECOMPOSED = "cafe\u0301"


def _golden(function: str) -> list[Any]:
    cases = [case for case in GOLDEN if case["function"] == function]
    return [pytest.param(case, id=case["name"]) for case in cases]


def _is_hex_key(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# --- golden vectors -------------------------------------------------------------


def test_golden_file_covers_every_function() -> None:
    """The golden file holds vectors for each public function."""
    functions = {case["function"] for case in GOLDEN}
    assert functions == {
        "canonical_json",
        "canonical_url",
        "job_key",
        "op_key",
        "request_fingerprint",
    }


@pytest.mark.parametrize("case", _golden("canonical_json"))
def test_golden_canonical_json(case: dict[str, Any]) -> None:
    """canonical_json gives the checked-in bytes for each golden input."""
    assert canonical_json(case["input"]) == case["expected"].encode("utf-8")


@pytest.mark.parametrize("case", _golden("job_key"))
def test_golden_job_key(case: dict[str, Any]) -> None:
    """job_key gives the checked-in hex and hashes the checked-in record."""
    key = job_key(case["work_id"], case["artifact_id"], case["canonical_url"])

    assert key == case["expected"]
    assert request_fingerprint(json.loads(case["record"])) == key


@pytest.mark.parametrize("case", _golden("op_key"))
def test_golden_op_key(case: dict[str, Any]) -> None:
    """op_key gives the checked-in hex and hashes the checked-in record."""
    key = op_key(case["kind"], case["job_id"], **case["context"])

    assert key == case["expected"]
    assert request_fingerprint(json.loads(case["record"])) == key


@pytest.mark.parametrize("case", _golden("request_fingerprint"))
def test_golden_request_fingerprint(case: dict[str, Any]) -> None:
    """request_fingerprint gives the checked-in hex."""
    assert request_fingerprint(case["input"]) == case["expected"]


@pytest.mark.parametrize("case", _golden("canonical_url"))
def test_golden_canonical_url(case: dict[str, Any]) -> None:
    """canonical_url gives the checked-in form, which is its own fixed point."""
    assert canonical_url(case["input"]) == case["expected"]
    assert canonical_url(case["expected"]) == case["expected"]


# --- canonical JSON: the rules --------------------------------------------------


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (0, b"0"),
        (-7, b"-7"),
        (2**64, b"18446744073709551616"),
        (1.0, b"1"),
        (-0.0, b"0"),
        (-3.0, b"-3"),
        (2.0**53 - 1, b"9007199254740991"),
        (-(2.0**53) + 1, b"-9007199254740991"),
        (2.0**53, b"9007199254740992.0"),
        (-(2.0**53), b"-9007199254740992.0"),
        (1e16, b"1e+16"),
        (0.1, b"0.1"),
        (1.5e-7, b"1.5e-07"),
        (5e-324, b"5e-324"),
        (1.7976931348623157e308, b"1.7976931348623157e+308"),
    ],
)
def test_number_rule(number: int | float, expected: bytes) -> None:
    """Ints are decimal; integral floats below 2**53 are ints; others use repr."""
    assert canonical_json(number) == expected


def test_bool_none_and_tuple() -> None:
    """True/False/None keep their JSON names and a tuple encodes like a list."""
    assert canonical_json([True, False, None]) == b"[true,false,null]"
    assert canonical_json((1, "a", (2,))) == canonical_json([1, "a", [2]])
    assert canonical_json(True) != canonical_json(1)


def test_keys_sorted_and_compact() -> None:
    """Object keys come out sorted by code point with no whitespace."""
    value = {"b": [1, 2], "a": {"d": None, "c": "x"}, "A": 0}

    assert canonical_json(value) == b'{"A":0,"a":{"c":"x","d":null},"b":[1,2]}'


def test_strings_stay_utf8_and_match_stdlib_escaping() -> None:
    """Non-ASCII stays raw UTF-8; escapes match json.dumps(ensure_ascii=False)."""
    text = 'M\u00fcller \u6771\u4eac \U0001f600 "q" \\ \n\t\x00\x1f\x7f\u2028'
    expected = json.dumps(text, ensure_ascii=False).encode("utf-8")

    assert canonical_json(text) == expected
    assert "\u00fc".encode() in canonical_json(text)


def test_nfc_composed_and_decomposed_agree() -> None:
    """Composed and decomposed "é" give the same bytes, job key and op key."""
    assert COMPOSED != DECOMPOSED
    assert canonical_json(COMPOSED) == canonical_json(DECOMPOSED)
    assert canonical_json({COMPOSED: 1}) == canonical_json({DECOMPOSED: 1})
    assert job_key(COMPOSED, "a", URL) == job_key(DECOMPOSED, "a", URL)
    assert op_key("HEAD", COMPOSED, tag=COMPOSED) == op_key(
        "HEAD", DECOMPOSED, tag=DECOMPOSED
    )


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, [1.0, math.nan], {"x": {"y": math.inf}}],
    ids=["nan", "inf", "-inf", "nested-nan", "nested-inf"],
)
def test_non_finite_floats_rejected(value: object) -> None:
    """NaN and ±Infinity raise CanonicalJSONError."""
    with pytest.raises(CanonicalJSONError, match=r"NaN and ±Infinity"):
        canonical_json(value)


@pytest.mark.parametrize(
    ("key", "type_name"),
    [(1, "int"), (None, "NoneType"), (("a",), "tuple"), (b"a", "bytes")],
)
def test_non_str_keys_rejected(key: object, type_name: str) -> None:
    """A non-str dict key raises an error that names the key and its type."""
    with pytest.raises(CanonicalJSONError) as info:
        canonical_json({"ok": {key: 1}})

    message = str(info.value)
    assert repr(key) in message
    assert f"type {type_name}" in message
    assert "$['ok']" in message


@pytest.mark.parametrize(
    "value",
    [b"bytes", bytearray(b"x"), {1, 2}, frozenset(), object(), 1j, range(3)],
    ids=["bytes", "bytearray", "set", "frozenset", "object", "complex", "range"],
)
def test_unsupported_types_rejected(value: object) -> None:
    """Bytes, sets and other objects raise an error naming their type."""
    with pytest.raises(CanonicalJSONError, match=type(value).__name__):
        canonical_json({"x": [value]})


def test_keys_equal_after_nfc_rejected() -> None:
    """Two keys that collide after NFC raise instead of one silently winning."""
    with pytest.raises(CanonicalJSONError, match="after NFC"):
        canonical_json({COMPOSED: 1, DECOMPOSED: 2})


def test_lone_surrogate_rejected() -> None:
    """A string with a lone surrogate, which is not UTF-8, raises."""
    with pytest.raises(CanonicalJSONError, match="surrogate"):
        canonical_json(["ok", "bad\ud800"])


def test_cycle_rejected() -> None:
    """A container that contains itself raises instead of recursing forever."""
    loop: list[object] = []
    loop.append({"again": loop})

    with pytest.raises(CanonicalJSONError, match="contains itself"):
        canonical_json(loop)


def test_shared_subvalue_is_not_a_cycle() -> None:
    """The same list used twice side by side encodes twice."""
    shared = [1]

    assert canonical_json([shared, shared]) == b"[[1],[1]]"


# --- canonical URLs: C12 ------------------------------------------------------

C12_EQUAL = [
    ("HTTP://Example.COM/a", "http://example.com/a"),
    ("http://example.com:80/a", "http://example.com/a"),
    ("https://example.com:443/a", "https://example.com/a"),
    ("http://example.com", "http://example.com/"),
    ("http://example.com/%7E", "http://example.com/~"),
    ("http://example.com/a%2fb", "http://example.com/a%2Fb"),
]
C12_KEPT = [
    "https://example.com:442/a",
    "http://example.com/a%2Fb",
    "http://example.com/a/b",
    "http://example.com/a/",
    "http://example.com/a",
    "http://example.com/p?b=2&a=1",
    "http://example.com/p?a=1&b=2",
    "http://10.2.3.4/x",
]
C12_DIFFERENT = [
    ("https://example.com:442/a", "https://example.com/a"),
    ("https://example.com:442/a", "http://example.com:442/a"),
    ("http://example.com/a%2Fb", "http://example.com/a/b"),
    ("http://example.com/a/", "http://example.com/a"),
    ("http://example.com/p?b=2&a=1", "http://example.com/p?a=1&b=2"),
    ("http://10.2.3.4/x", "http://10.2.3.5/x"),
]
C12_ROWS = [url for pair in C12_EQUAL for url in pair] + C12_KEPT


@pytest.mark.parametrize(("url", "expected"), C12_EQUAL)
def test_c12_equal(url: str, expected: str) -> None:
    """C12: spellings of one resource share one canonical form."""
    assert canonical_url(url) == expected
    assert canonical_url(url) == canonical_url(expected)


@pytest.mark.parametrize("url", C12_KEPT)
def test_c12_kept_as_given(url: str) -> None:
    """C12: a canonical URL comes back unchanged (port, %2F, slash, query, IP)."""
    assert canonical_url(url) == url


@pytest.mark.parametrize(("first", "second"), C12_DIFFERENT)
def test_c12_different(first: str, second: str) -> None:
    """C12: URLs that may name different resources stay different."""
    assert canonical_url(first) != canonical_url(second)
    assert job_key("w", "a", first) != job_key("w", "a", second)


@pytest.mark.parametrize("url", C12_ROWS)
def test_c12_idempotent(url: str) -> None:
    """C12: canon(canon(u)) == canon(u) for every row."""
    once = canonical_url(url)

    assert canonical_url(once) == once


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com/p?q=1#frag", "http://example.com/p?q=1"),
        ("http://example.com#frag", "http://example.com/"),
        ("http://example.com/p?", "http://example.com/p?"),
        ("http://example.com/p?a=%7e&A=1", "http://example.com/p?a=%7e&A=1"),
        ("http://example.com/a/%2e%2E/b", "http://example.com/a/%2E%2E/b"),
        ("http://example.com/a/%2ex", "http://example.com/a/.x"),
        ("http://example.com/a/./b/../c", "http://example.com/a/./b/../c"),
        ("http://example.com/%25%3a", "http://example.com/%25%3A"),
        ("http://example.com:/a", "http://example.com/a"),
        ("http://example.com:0080/a", "http://example.com/a"),
        ("http://example.com:443/a", "http://example.com:443/a"),
        ("https://example.com:80/a", "https://example.com:80/a"),
        ("http://[2001:DB8::1]/a", "http://[2001:db8::1]/a"),
        ("https://[::1]:443", "https://[::1]/"),
        ("http://[::1]:8080/", "http://[::1]:8080/"),
    ],
)
def test_canonical_url_other_rules(url: str, expected: str) -> None:
    """Fragment dropped, query untouched, dot escapes kept, IPv6 brackets kept."""
    assert canonical_url(url) == expected
    assert canonical_url(expected) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("example.com:80/foo", "no http or https scheme"),
        ("example.com/foo", "no http or https scheme"),
        ("//example.com/foo", "no http or https scheme"),
        ("ftp://example.com/a", "no http or https scheme"),
        ("file:///etc/passwd", "no http or https scheme"),
        ("mailto:someone@example.com", "no http or https scheme"),
        ("http:/example.com/a", "no host"),
        ("http:example.com", "no host"),
        ("http://", "no host"),
        ("http:///a", "no host"),
        ("http://:80/a", "no host"),
        ("http://user:secret@example.com/", "user info"),
        ("http://user@example.com/", "user info"),
        ("http://example.com/a b", "printable ASCII"),
        (" http://example.com/", "printable ASCII"),
        ("http://example.com/\n", "printable ASCII"),
        ("http://ex\u00e4mple.com/", "printable ASCII"),
        ("http://example.com:99999/", "between 1 and 65535"),
        ("http://example.com:0/", "between 1 and 65535"),
        ("http://example.com:8o/", "port part"),
        ("http://example.com:1:2/", "port part"),
        ("http://exa%6Dple.com/", "host"),
        ("http://[::1/", "IPv6"),
        ("http://[::zz]/", "IPv6"),
        ("http://[::1]x/", "port part"),
        ("http://[fe80::1%25eth0]/", "IPv6"),
        ("http://example.com/100%", "percent-escape"),
        ("http://example.com/a%2g", "percent-escape"),
    ],
)
def test_invalid_urls_rejected(url: str, reason: str) -> None:
    """Bad URLs raise InvalidURL that shows the URL and states the rule."""
    with pytest.raises(InvalidURL) as info:
        canonical_url(url)

    assert reason in str(info.value)
    assert repr(url) in str(info.value)


def test_canonical_url_rejects_non_str() -> None:
    """A URL given as bytes raises InvalidURL."""
    with pytest.raises(InvalidURL, match="must be a str"):
        canonical_url(b"http://example.com/")  # type: ignore[arg-type]


# --- job keys and op keys -------------------------------------------------------

JOB_FIELDS = {"work_id": "W1", "artifact_id": "A1", "canonical_url": URL}
MISSING = object()


@pytest.mark.parametrize("field", sorted(JOB_FIELDS))
@pytest.mark.parametrize(
    "bad", [MISSING, None, "", "  ", "\t\n"], ids=["missing", "None", "", "blank", "ws"]
)
def test_job_key_field_missing(field: str, bad: object) -> None:
    """C02: a missing, None or blank job key field raises, naming the field."""
    fields: dict[str, object] = dict(JOB_FIELDS)
    if bad is MISSING:
        del fields[field]
    else:
        fields[field] = bad

    with pytest.raises(KeyFieldMissing) as info:
        job_key(**fields)  # type: ignore[arg-type]

    assert repr(field) in str(info.value)


@pytest.mark.parametrize("field", sorted(JOB_FIELDS))
def test_job_key_field_not_str(field: str) -> None:
    """A job key field that is not a str raises TypeError naming the field."""
    fields: dict[str, object] = {**JOB_FIELDS, field: 42}

    with pytest.raises(TypeError, match=repr(field)):
        job_key(**fields)  # type: ignore[arg-type]


def test_c02_two_specs_without_url_never_share_a_key() -> None:
    """C02: job specs missing their URL raise instead of hashing alike."""
    specs: list[dict[str, str]] = [
        {"work_id": "W1", "artifact_id": "A1"},
        {"work_id": "W2", "artifact_id": "A2", "url": ""},
    ]

    for spec in specs:
        with pytest.raises(KeyFieldMissing, match="canonical_url"):
            job_key(spec["work_id"], spec["artifact_id"], spec.get("url"))


def test_job_key_invalid_url() -> None:
    """job_key passes on InvalidURL for a URL without a scheme."""
    with pytest.raises(InvalidURL):
        job_key("W1", "A1", "example.com:80/foo")


@pytest.mark.parametrize("field", ["kind", "job_id"])
@pytest.mark.parametrize("bad", [None, "", "   "], ids=["None", "", "blank"])
def test_op_key_field_missing(field: str, bad: object) -> None:
    """A None or blank op kind or job id raises, naming the field."""
    fields: dict[str, object] = {"kind": "HEAD", "job_id": "J1", field: bad}

    with pytest.raises(KeyFieldMissing, match=repr(field)):
        op_key(**fields)  # type: ignore[arg-type]


def test_op_key_context_must_encode() -> None:
    """A context value that has no canonical JSON form raises."""
    with pytest.raises(CanonicalJSONError, match=r"\$\['ctx'\]\['body'\]"):
        op_key("STREAM", "J1", body=b"raw")


def test_keys_are_lowercase_hex() -> None:
    """Every key and fingerprint is 64 lowercase hex digits."""
    values = [
        job_key("W1", "A1", URL),
        op_key("HEAD", "J1"),
        op_key("STREAM", "J1", start=0, end=10),
        request_fingerprint({"method": "GET"}),
        request_fingerprint(None),
    ]

    assert all(_is_hex_key(value) for value in values)


def test_job_key_url_raw_or_canonical_agree() -> None:
    """job_key canonicalizes its URL, so raw and canonical spellings agree."""
    raw = job_key("W1", "A1", "HTTPS://Example.com:443/paper.pdf#page=2")

    assert raw == job_key("W1", "A1", canonical_url(URL))


def test_op_key_context_order_does_not_matter() -> None:
    """Keyword order of the op context does not change the op key."""
    assert op_key("STREAM", "J1", start=0, end=9, etag="x") == op_key(
        "STREAM", "J1", etag="x", end=9, start=0
    )


def test_distinct_inputs_distinct_keys() -> None:
    """Swapped fields, separators inside fields and type changes give new keys."""
    keys = [
        job_key("W1", "A1", URL),
        job_key("A1", "W1", URL),
        job_key("a|b", "c", URL),
        job_key("a", "b|c", URL),
        job_key("a", "b", URL),
        job_key("ab", "c", URL),
        job_key("W1", "A1", URL + "?"),
        job_key("W1", "A1", URL.replace("https", "http")),
        op_key("HEAD", "J1"),
        op_key("STREAM", "J1"),
        op_key("HEAD", "J2"),
        op_key("HEAD", "J1", n=1),
        op_key("HEAD", "J1", n="1"),
        op_key("HEAD", "J1", n=True),
        op_key("HEAD", "J1", n=None),
        op_key("HEAD", "J1", n=[1]),
    ]

    assert len(set(keys)) == len(keys)


def test_request_fingerprint_tells_requests_apart() -> None:
    """C02: a changed request changes the fingerprint; an equal one keeps it."""
    request = {"method": "GET", "url": URL, "headers": {"Range": "bytes=0-"}}
    same = {"headers": {"Range": "bytes=0-"}, "url": URL, "method": "GET"}
    other = {**request, "headers": {"Range": "bytes=10-"}}

    assert request_fingerprint(request) == request_fingerprint(same)
    assert request_fingerprint(request) != request_fingerprint(other)


def test_job_key_same_across_processes_and_hash_seeds() -> None:
    """I12: two interpreters with different PYTHONHASHSEED give the in-process keys."""
    args = ("M\u00fcller-2024", "caf\u00e9.pdf", "HTTP://Example.COM:80/a?b=2&a=1")
    context = {"zeta": 1, "alpha": [1.0, "x"], "mid": {"b": None, "a": True}}
    code = (
        "import sys, json\n"
        "from docstokg_idem.core.keys import job_key, op_key\n"
        "args, context = json.loads(sys.argv[1])\n"
        "key = job_key(*args)\n"
        "print(key, op_key('STREAM', key, **context))\n"
    )
    expected_job = job_key(*args)
    expected = f"{expected_job} {op_key('STREAM', expected_job, **context)}"

    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", code, json.dumps([args, context])],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert result.stdout.strip() == expected


# --- properties -----------------------------------------------------------------

nfc_text = st.text(max_size=12).map(lambda s: unicodedata.normalize("NFC", s))
stable_floats = st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda x: not (x.is_integer() and abs(x) < 2**53)
)
json_scalars = st.none() | st.booleans() | st.integers() | stable_floats | nfc_text
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(nfc_text, inner, max_size=4)
    ),
    max_leaves=20,
)


@no_database
@given(st.dictionaries(nfc_text, json_values, max_size=8), st.randoms())
def test_dict_order_does_not_matter(value: dict[str, Any], rnd: random.Random) -> None:
    """Shuffling a dict's insertion order leaves the bytes unchanged."""
    items = list(value.items())
    rnd.shuffle(items)

    assert canonical_json(dict(items)) == canonical_json(value)


@no_database
@given(json_values)
def test_round_trips_through_json_loads(value: Any) -> None:
    """Without floats the number rule changes, json.loads gives the value back."""
    encoded = canonical_json(value)

    assert json.loads(encoded) == value
    assert encoded == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


@no_database
@given(st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1))
def test_integral_floats_encode_as_ints(number: int) -> None:
    """A whole float below 2**53 encodes exactly like the int it holds."""
    assert canonical_json(float(number)) == canonical_json(number)


_HEX = "0123456789abcdefABCDEF"
_PCHARS = "abcXYZ019-._~!$&'()*+,;=:@"
escapes = st.tuples(st.sampled_from(_HEX), st.sampled_from(_HEX)).map(
    lambda pair: "%" + "".join(pair)
)
segments = st.lists(escapes | st.sampled_from(_PCHARS) | st.just("."), max_size=6).map(
    "".join
)
hosts = (
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,15}", fullmatch=True)
    | st.ip_addresses(v=4).map(str)
    | st.ip_addresses(v=6).map(lambda ip: f"[{str(ip).upper()}]")
)
urls = st.builds(
    lambda scheme, host, port, path, query, fragment: (
        f"{scheme}://{host}{port}{path}{query}{fragment}"
    ),
    st.sampled_from(["http", "https", "HTTP", "Https"]),
    hosts,
    st.sampled_from(["", ":", ":80", ":443", ":8080", ":0081"]),
    st.lists(segments, max_size=4).map(lambda parts: "".join("/" + p for p in parts)),
    st.just("") | st.from_regex(r"\?[A-Za-z0-9=&%~.+/-]*", fullmatch=True),
    st.sampled_from(["", "#", "#frag"]),
)


@no_database
@given(urls)
def test_canonical_url_idempotent_on_generated_urls(url: str) -> None:
    """canonical_url is a fixed point on generated http(s) URLs."""
    once = canonical_url(url)

    assert canonical_url(once) == once
    assert once.startswith(("http://", "https://"))
    assert "#" not in once
    assert once.partition("?")[2] == url.partition("#")[0].partition("?")[2]


_plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
    | st.text(alphabet=st.characters(max_codepoint=127))
)
_plain_values = st.recursive(
    _plain_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(alphabet=st.characters(max_codepoint=127)), inner, max_size=4),
    max_leaves=12,
)


@given(_plain_values)
def test_fast_path_writes_what_the_rules_write(value: object) -> None:
    """ASCII-only values take a fast path whose bytes equal the hand encoder's."""
    from docstokg_idem.core import keys

    out: list[str] = []
    keys._encode(value, "$", set(), out)
    assert canonical_json(value) == "".join(out).encode("utf-8")
