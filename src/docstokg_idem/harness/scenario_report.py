"""The HTML report of a run of crash scenarios (``--idem-report``).

One self-contained file: inline CSS, no script, no network. It lists the
failing scenarios first, each with its failure text and an inline SVG
timeline (one lane per worker, lease bars, state changes, crashes, clock
moves), then the crash point coverage and every scenario run. The plugin
gathers the data (it crosses pytest-xdist as plain data) and calls
:func:`render_report` once, in the controlling process.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.crashpoints import CRASH_POINTS


def render_report(
    runs: Sequence[Mapping[str, Any]], points: set[str], *, header: str = ""
) -> str:
    """The whole report as one self-contained HTML document.

    ``runs`` holds one mapping per scenario test (nodeid, name, outcome,
    duration, description, points, text and, when it failed, picture);
    ``points`` the crash points the runs reached.
    """
    failing = [r for r in runs if r["outcome"] in ("failed", "error")]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no scenarios"
    reached, declared = len(points & set(CRASH_POINTS)), len(CRASH_POINTS)
    now = dt.datetime.now(dt.UTC)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>docstokg-idem scenario report</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<h1>docstokg-idem crash scenarios</h1>",
        f'<p class="meta">{html.escape(header)}{" &middot; " if header else ""}'
        f"{html.escape(summary)} &middot; crash point coverage {reached}/{declared} "
        f"({reached / declared:.0%}) &middot; written {now:%Y-%m-%d %H:%M} UTC</p>",
        _failures_html(failing),
        _coverage_html(points),
        _runs_html(runs),
        "</body>",
        "</html>",
    ]
    return "\n".join(parts)


def _failures_html(failing: Sequence[Mapping[str, Any]]) -> str:
    if not failing:
        return '<h2>Failing scenarios</h2><p class="ok">None: every scenario held.</p>'
    out = [f"<h2>Failing scenarios ({len(failing)})</h2>"]
    for run in failing:
        out.append(f'<section class="failure" id="{_anchor(run["nodeid"])}">')
        out.append(f"<h3>{html.escape(run['nodeid'])}</h3>")
        if run["description"]:
            out.append(f"<p>{html.escape(run['description'])}</p>")
        if run.get("picture"):
            picture = render_timeline(run["picture"], title=run["name"])
            out.append(f'<div class="scroll">{picture}</div>')
            out.append(_LEGEND)
        out.append(f"<pre>{html.escape(run['text'])}</pre>")
        out.append("</section>")
    return "\n".join(out)


def _coverage_html(points: set[str]) -> str:
    rows = []
    for point, where in sorted(CRASH_POINTS.items()):
        hit = point in points
        rows.append(
            f'<tr class="{"hit" if hit else "miss"}"><td><code>{point}</code></td>'
            f"<td>{'exercised' if hit else 'never reached'}</td>"
            f"<td>{html.escape(where)}</td></tr>"
        )
    return (
        "<h2>Crash point coverage</h2><table><tr><th>crash point</th><th>in this run"
        "</th><th>where it sits</th></tr>" + "".join(rows) + "</table>"
    )


def _runs_html(runs: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for run in sorted(runs, key=lambda r: r["nodeid"]):
        name = html.escape(run["nodeid"])
        link = (
            f'<a href="#{_anchor(run["nodeid"])}">{name}</a>'
            if run["outcome"] in ("failed", "error")
            else name
        )
        rows.append(
            f'<tr class="{run["outcome"]}"><td>{link}</td><td>{run["outcome"]}'
            f"</td><td>{run['duration']:.2f} s</td><td>{len(run['points'])}</td>"
            "</tr>"
        )
    return (
        "<h2>Scenario runs</h2><table><tr><th>scenario</th><th>outcome</th>"
        "<th>time</th><th>crash points reached</th></tr>" + "".join(rows) + "</table>"
    )


def _anchor(nodeid: str) -> str:
    return "s-" + "".join(c if c.isalnum() else "-" for c in nodeid)


# --- the timeline picture -------------------------------------------------------------

_SLOT = 30
_LEFT = 120
_LANE = 62
_TOP = 42
_PALETTE = (
    "#4c78a8",
    "#f58518",
    "#54a24b",
    "#b279a2",
    "#9d755d",
    "#e45756",
    "#72b7b2",
    "#eeca3b",
)
_EVENT_COLOURS = {
    "state": "#222",
    "renew": "#2a9d8f",
    "release": "#6c757d",
    "expire": "#d62828",
    "repair": "#7b2cbf",
    "claim": "#1d3557",
}


def render_timeline(picture: Mapping[str, Any], *, title: str = "") -> str:
    """An inline SVG: worker lanes, lease bars, state marks, crashes, clock moves."""
    lanes: list[str] = list(picture["lanes"]) or ["(no history)"]
    slots = max(1, int(picture["slots"]))
    width = _LEFT + slots * _SLOT + 40
    height = _TOP + len(lanes) * _LANE + 34
    y_of = {name: _TOP + i * _LANE for i, name in enumerate(lanes)}
    jobs = sorted(
        {lease["job"] for lease in picture["leases"]}, key=lambda j: int(j[1:])
    )
    colour = {job: _PALETTE[i % len(_PALETTE)] for i, job in enumerate(jobs)}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="timeline of {html.escape(title)}">',
        f"<title>timeline of {html.escape(title)}</title>",
        f"<style>{_SVG_CSS}</style>",
        f'<text x="{_LEFT}" y="16" class="axis">history order &#8594; (fake time '
        "under each row)</text>",
    ]
    for index, name in enumerate(lanes):
        y = y_of[name]
        out.append(f'<g class="lane" data-lane="{html.escape(name)}">')
        out.append(
            f'<rect class="lane-bg" x="0" y="{y}" width="{width}" height="{_LANE}" '
            f'fill="{"#f6f7f9" if index % 2 == 0 else "#ffffff"}"/>'
        )
        out.append(
            f'<text class="lane-label" x="10" y="{y + _LANE / 2 + 4}">'
            f"{html.escape(name)}</text>"
        )
        out += _leases(picture, name, y, colour)
        out += _marks(picture, name, y)
        out += _crashes(picture, name, y)
        out.append("</g>")
    out += _clocks(picture, height)
    out += _time_axis(picture, height)
    out.append("</svg>")
    return "\n".join(out)


def _x(slot: float) -> float:
    return _LEFT + slot * _SLOT


def _leases(
    picture: Mapping[str, Any], lane: str, y: int, colour: Mapping[str, str]
) -> list[str]:
    out = []
    for lease in picture["leases"]:
        if lease["lane"] != lane:
            continue
        x0, x1 = _x(lease["x0"]) + 3, _x(lease["x1"]) - 3
        if lease["x1"] >= picture["slots"]:
            x1 = _x(picture["slots"]) + 10
        tip = f"lease of {lease['job']} token {lease['token']} held by {lane}"
        out.append(
            f'<rect class="lease" data-job="{lease["job"]}" '
            f'data-token="{lease["token"]}" x="{x0:.1f}" y="{y + 8}" '
            f'width="{max(8.0, x1 - x0):.1f}" height="16" '
            f'rx="4" fill="{colour[lease["job"]]}" fill-opacity="0.8">'
            f"<title>{html.escape(tip)}</title></rect>"
        )
        out.append(
            f'<text class="lease-label" x="{x0 + 4:.1f}" y="{y + 20}">'
            f"{lease['job']} t{lease['token']}</text>"
        )
    return out


def _marks(picture: Mapping[str, Any], lane: str, y: int) -> list[str]:
    out = []
    for mark in picture["marks"]:
        if mark["lane"] != lane:
            continue
        cx, cy = _x(mark["x"] + 0.5), y + 34
        fill = _EVENT_COLOURS.get(mark["event"], "#444")
        tip = (
            f"{mark['event']} {mark['label']} of {mark['job']} at +{mark['t']:g} s"
            + (f": {mark['detail']}" if mark["detail"] else "")
        )
        shape = (
            f'<rect x="{cx - 4}" y="{cy - 4}" width="8" height="8" fill="{fill}"/>'
            if mark["event"] == "state"
            else f'<circle cx="{cx}" cy="{cy}" r="3.5" fill="{fill}"/>'
        )
        out.append(
            f'<g class="mark" data-event="{mark["event"]}">{shape}'
            f"<title>{html.escape(tip)}</title></g>"
        )
        if mark["event"] in ("state", "expire", "repair"):
            out.append(
                f'<text class="mark-label" x="{cx + 2}" y="{cy + 8}" '
                f'transform="rotate(35 {cx + 2} {cy + 8})">'
                f"{html.escape(_short(mark['label']))}</text>"
            )
    return out


def _short(label: str) -> str:
    return {
        "HEAD_DONE": "HEAD",
        "STREAMING": "STREAM",
        "FINALIZED": "FINAL",
        "INDEXED": "INDEX",
        "RESUME_OK": "RESUME",
        "SKIPPED_DUPLICATE": "SKIP",
    }.get(label, label)


def _crashes(picture: Mapping[str, Any], lane: str, y: int) -> list[str]:
    out = []
    for crash in picture["crashes"]:
        if crash["lane"] != lane:
            continue
        cx, cy = _x(crash["x"] + 0.5), y + 16
        out.append(
            f'<g class="crash"><path d="M{cx - 7},{cy - 7} L{cx + 7},{cy + 7} '
            f'M{cx - 7},{cy + 7} L{cx + 7},{cy - 7}" stroke="#d00000" '
            f'stroke-width="3"/><title>{html.escape(crash["label"])}</title></g>'
        )
        out.append(
            f'<text class="crash-label" x="{cx + 10}" y="{cy - 4}">'
            f"{html.escape(crash['label'])}</text>"
        )
    return out


def _clocks(picture: Mapping[str, Any], height: int) -> list[str]:
    out = []
    for move in picture["clocks"]:
        x = _x(move["x"] + 0.5)
        out.append(
            f'<g class="clock"><line x1="{x}" y1="{_TOP - 14}" x2="{x}" '
            f'y2="{height - 30}" stroke="#e76f51" stroke-width="2" '
            f'stroke-dasharray="5 4"/><text class="clock-label" x="{x + 4}" '
            f'y="{_TOP - 6}">clock {html.escape(move["label"])}</text></g>'
        )
    return out


def _time_axis(picture: Mapping[str, Any], height: int) -> list[str]:
    out, last = [], None
    for mark in sorted(picture["marks"], key=lambda m: m["x"]):
        if mark["t"] == last:
            continue
        last = mark["t"]
        x = _x(mark["x"] + 0.5)
        out.append(
            f'<text class="axis" x="{x}" y="{height - 12}" text-anchor="middle">'
            f"+{mark['t']:g}s</text>"
        )
    return out


#: Inside each picture, so that a copied SVG keeps its looks.
_SVG_CSS = """
.lane-label { font: bold 13px ui-monospace, monospace; fill: #1b1f24; }
.lease-label { font: 10px ui-monospace, monospace; fill: #fff; }
.mark-label { font: 9px ui-monospace, monospace; fill: #333; }
.crash-label { font: bold 11px ui-monospace, monospace; fill: #d00000; }
.clock-label { font: bold 11px ui-monospace, monospace; fill: #e76f51; }
.axis { font: 10px ui-monospace, monospace; fill: #57606a; }
"""

_LEGEND = (
    '<p class="legend"><span class="sw lease"></span> lease (job, token) '
    '<span class="sw state"></span> state change <span class="sw dot"></span> claim, '
    'renew, release, expire <span class="x">&#10005;</span> crash '
    '<span class="clk">&#8942;</span> clock move</p>'
)

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px;
       color: #1b1f24; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 15px; font-family: ui-monospace, monospace; }
.meta { color: #57606a; }
.ok { color: #1a7f37; }
section.failure { border-left: 4px solid #d00000; padding: 4px 16px; margin: 16px 0;
                  background: #fff8f8; }
.scroll { overflow-x: auto; max-width: 100%; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; }
tr.miss td, tr.failed td, tr.error td { background: #ffebe9; }
tr.hit td, tr.passed td { background: #f0fff4; }
tr.xfailed td { background: #fff8c5; }
svg.timeline { background: #fff; border: 1px solid #d0d7de; display: block;
               margin: 8px 0; overflow: visible; }
.legend { font-size: 12px; color: #57606a; }
.sw { display: inline-block; width: 14px; height: 10px; margin: 0 3px 0 10px; }
.sw.lease { background: #4c78a8; border-radius: 3px; }
.sw.state { background: #222; width: 8px; height: 8px; }
.sw.dot { background: #2a9d8f; border-radius: 50%; width: 8px; height: 8px; }
.x { color: #d00000; font-weight: bold; margin-left: 10px; }
.clk { color: #e76f51; font-weight: bold; margin-left: 10px; }
"""
