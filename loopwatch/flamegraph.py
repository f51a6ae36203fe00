"""A flame graph as one self-contained SVG, from collapsed stacks.

Like flamegraph.pl's output: roots at the bottom, one box per frame as wide as its share of
the samples, children sorted by name so that equal stacks merge. Inline JavaScript (no
external resource of any kind) zooms into a frame on click, resets on "Reset Zoom", and
highlights the frames matching a search (a regular expression) with the share they cover.
Every name is escaped for XML, so any route or function name, quotes and ``<script>``
included, shows as text. Open the file in a browser.

Standard library only.
"""

from __future__ import annotations

import html
import re
import zlib
from collections.abc import Iterable, Sequence

__all__ = ["flamegraph_svg"]

FRAME_HEIGHT = 16
FONT_SIZE = 12
CHAR_WIDTH = 7.0  # of the 12 px Verdana-like font, as flamegraph.pl assumes
X_PAD = 10
TOP = 60  # title, subtitle and the buttons
BOTTOM = 34  # the details line
MIN_WIDTH = 0.1  # px: narrower frames (and what they hold) are left out

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_LIBRARY = ("site-packages", "dist-packages", "/lib/python", "\\lib\\", "<frozen")


def _text(value: str) -> str:
    """Escaped for XML text and attributes alike (quotes included)."""
    return html.escape(_XML_INVALID.sub("?", value), quote=True)


class _Node:
    __slots__ = ("children", "name", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0
        self.children: dict[str, _Node] = {}


def _tree(pairs: Iterable[tuple[Sequence[str], int]]) -> _Node:
    root = _Node("all")
    for stack, count in pairs:
        if count <= 0:
            continue
        root.value += count
        node = root
        for name in stack:
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = _Node(name)
            child.value += count
            node = child
    return root


def _color(name: str, depth: int) -> str:
    """Warm colours as flamegraph.pl: red/orange for application code, yellow for libraries,
    blue for the route boxes; stable per name."""
    h = zlib.crc32(name.encode("utf-8", "replace"))
    v1, v2 = (h & 0xFF) / 255, ((h >> 8) & 0xFF) / 255
    if depth == 1:
        return f"rgb({int(80 + 40 * v1)},{int(130 + 40 * v2)},{int(200 + 40 * v1)})"
    if depth == 0:
        return "rgb(200,200,200)"
    if any(marker in name for marker in _LIBRARY):
        return f"rgb({int(205 + 40 * v1)},{int(175 + 50 * v2)},{int(60 + 40 * v1)})"
    return f"rgb({int(215 + 40 * v1)},{int(60 + 90 * v2)},{int(40 + 30 * v1)})"


def _fit(name: str, width: float) -> str:
    chars = int((width - 6) / CHAR_WIDTH)
    if chars < 3:
        return ""
    return name if len(name) <= chars else name[: chars - 2] + ".."


def flamegraph_svg(
    pairs: Iterable[tuple[Sequence[str], int]],
    *,
    title: str = "Flame Graph",
    subtitle: str = "",
    unit: str = "samples",
    width: int = 1200,
) -> str:
    """The SVG document for ``pairs`` of (stack root to leaf, count)."""
    root = _tree(pairs)
    total = root.value
    scale = (width - 2 * X_PAD) / total if total else 0.0

    boxes: list[tuple[_Node, int, float, float]] = []  # node, depth, x, width
    todo = [(root, 0, float(X_PAD))]
    depth_max = 0
    while todo:
        node, depth, x = todo.pop()
        w = node.value * scale
        if w < MIN_WIDTH and node is not root:
            continue
        boxes.append((node, depth, x, w))
        depth_max = max(depth_max, depth)
        child_x = x
        for name in sorted(node.children):
            child = node.children[name]
            todo.append((child, depth + 1, child_x))
            child_x += child.value * scale

    height = TOP + (depth_max + 1) * FRAME_HEIGHT + BOTTOM
    base = height - BOTTOM  # the bottom edge of the root box
    out = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n',
        f'<svg version="1.1" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" '
        f'data-unit="{_text(unit)}" data-total="{total}" data-xpad="{X_PAD}" '
        f'data-char="{CHAR_WIDTH}">\n',
        "<style>\n",
        "text { font-family: Verdana, sans-serif; font-size: 12px; fill: #000; }\n",
        ".f:hover rect { stroke: #000; stroke-width: 0.5; cursor: pointer; }\n",
        ".f text { pointer-events: none; }\n",
        ".btn { cursor: pointer; fill: #336; }\n",
        ".hide { display: none; }\n",
        ".dim rect { opacity: 0.5; }\n",
        "</style>\n",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f8f8f0"/>\n',
        f'<text x="{width / 2:.0f}" y="22" text-anchor="middle" '
        f'style="font-size:17px">{_text(title)}</text>\n',
        f'<text x="{width / 2:.0f}" y="40" text-anchor="middle" fill="#555">'
        f"{_text(subtitle)}</text>\n",
        f'<text id="unzoom" class="btn hide" x="{X_PAD}" y="22">Reset Zoom</text>\n',
        f'<text id="search" class="btn" x="{width - X_PAD}" y="22" '
        'text-anchor="end">Search</text>\n',
        f'<text id="matched" x="{width - X_PAD}" y="{height - 12}" text-anchor="end"> </text>\n',
        f'<text id="details" x="{X_PAD}" y="{height - 12}"> </text>\n',
        '<g id="frames">\n',
    ]
    for node, depth, x, w in boxes:
        y = base - (depth + 1) * FRAME_HEIGHT
        share = 100.0 * node.value / total if total else 0.0
        name = _text(node.name)
        out.append(
            f'<g class="f" data-n="{name}" data-v="{node.value}">'
            f"<title>{name} ({node.value} {_text(unit)}, {share:.2f}%)</title>"
            f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{FRAME_HEIGHT - 1}" '
            f'data-x="{x:.2f}" data-w="{w:.2f}" rx="2" fill="{_color(node.name, depth)}"/>'
            f'<text x="{x + 3:.2f}" y="{y + FRAME_HEIGHT - 4}">{_text(_fit(node.name, w))}</text>'
            "</g>\n"
        )
    out.append("</g>\n")
    out.append(f'<script type="text/ecmascript"><![CDATA[\n{_SCRIPT}]]></script>\n')
    out.append("</svg>\n")
    return "".join(out)


# Constant code: it reads names from the document, never from this string.
_SCRIPT = """
(function () {
  "use strict";
  var svg = document.documentElement;
  var W = +svg.getAttribute("width"), XPAD = +svg.getAttribute("data-xpad");
  var CHAR = +svg.getAttribute("data-char");
  var frames = Array.prototype.slice.call(document.querySelectorAll("#frames .f"));
  var details = document.getElementById("details");
  var unzoomBtn = document.getElementById("unzoom");
  var matched = document.getElementById("matched");
  function rect(g) { return g.getElementsByTagName("rect")[0]; }
  function fit(g) {
    var r = rect(g), t = g.getElementsByTagName("text")[0], n = g.getAttribute("data-n");
    var w = +r.getAttribute("width"), m = Math.floor((w - 6) / CHAR);
    t.setAttribute("x", (+r.getAttribute("x") + 3).toFixed(2));
    t.textContent = m < 3 ? "" : (n.length <= m ? n : n.slice(0, m - 2) + "..");
  }
  function zoom(node) {
    var nr = rect(node), x0 = +nr.getAttribute("data-x"), w0 = +nr.getAttribute("data-w");
    var y0 = +nr.getAttribute("y"), scale = (W - 2 * XPAD) / w0, eps = 0.05;  // > rounding
    frames.forEach(function (g) {
      var r = rect(g), x = +r.getAttribute("data-x"), w = +r.getAttribute("data-w");
      var y = +r.getAttribute("y");
      g.classList.remove("hide"); g.classList.remove("dim");
      if (x + w <= x0 + eps || x >= x0 + w0 - eps) { g.classList.add("hide"); return; }
      if (y > y0) {  // below the clicked frame: its callers, shown whole and dimmed
        r.setAttribute("x", XPAD); r.setAttribute("width", W - 2 * XPAD);
        g.classList.add("dim");
      } else if (y < y0 || g === node) {
        r.setAttribute("x", (XPAD + (x - x0) * scale).toFixed(2));
        r.setAttribute("width", (w * scale).toFixed(2));
      } else { g.classList.add("hide"); return; }
      fit(g);
    });
    unzoomBtn.classList.remove("hide");
  }
  function unzoom() {
    frames.forEach(function (g) {
      var r = rect(g);
      g.classList.remove("hide"); g.classList.remove("dim");
      r.setAttribute("x", r.getAttribute("data-x"));
      r.setAttribute("width", r.getAttribute("data-w"));
      fit(g);
    });
    unzoomBtn.classList.add("hide");
  }
  function search() {
    var term = window.prompt("Search frames (regular expression)", "");
    var re = null;
    if (term) {
      try { re = new RegExp(term); }
      catch (e) { re = new RegExp(term.replace(/[.*+?^${}()|[\\]\\\\]/g, "\\\\$&")); }
    }
    var spans = [];
    frames.forEach(function (g) {
      var r = rect(g), hit = re !== null && re.test(g.getAttribute("data-n"));
      if (!r.hasAttribute("data-fill")) { r.setAttribute("data-fill", r.getAttribute("fill")); }
      r.setAttribute("fill", hit ? "rgb(230,0,230)" : r.getAttribute("data-fill"));
      if (hit) { spans.push([+r.getAttribute("data-x"), +r.getAttribute("data-w")]); }
    });
    spans.sort(function (a, b) { return a[0] - b[0]; });
    var covered = 0, end = -1;
    spans.forEach(function (s) {
      var s0 = Math.max(s[0], end), s1 = s[0] + s[1];
      if (s1 > s0) { covered += s1 - s0; end = s1; }
    });
    matched.textContent = re === null ? " " :
      "Matched: " + (100 * covered / (W - 2 * XPAD)).toFixed(1) + "%";
  }
  svg.addEventListener("click", function (e) {
    var g = e.target.closest ? e.target.closest(".f") : null;
    if (g) { zoom(g); }
  });
  svg.addEventListener("mouseover", function (e) {
    var g = e.target.closest ? e.target.closest(".f") : null;
    if (g) { details.textContent = g.getElementsByTagName("title")[0].textContent; }
  });
  unzoomBtn.addEventListener("click", function (e) { e.stopPropagation(); unzoom(); });
  document.getElementById("search").addEventListener("click", function (e) {
    e.stopPropagation(); search();
  });
})();
"""
