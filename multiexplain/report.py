"""A static HTML report: ``index.html`` plus the figures it shows, all in one folder.

The page is self-contained: inline CSS, no external URLs, and every image is referenced by a path
relative to the report folder, so the folder can be zipped, moved and opened from disk. The only
script is a small inline one, present when the page has an interactive word view
(:class:`WordMaps`: click a word of a caption, its map is shown over the image). A report is a
list of :class:`Section` s; a section is an ordered list of blocks (text, figure groups, word
views, tables, settings, notes) added with its ``add_*`` methods.

Example::

    report = Report("my run")
    section = report.section("classification", "Classification")
    section.add_figures([Figure("cls/scene0.png", "scene 0: Grad-CAM++ vs Grad-CAM")])
    section.add_table(["metric", "Grad-CAM++", "Grad-CAM"], [["Average Drop %", 12.3, 20.1]])
    write_report(report, "out/")          # -> out/index.html
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

__all__ = ["Figure", "Table", "Section", "Report", "WordMaps", "write_report", "find_chromium", "render_in_chromium"]


@dataclass
class Figure:
    """One picture in the report.

    Attributes:
        path: the PNG/GIF file (relative to the report folder, or absolute; a file outside the
            folder is copied into ``assets/``).
        caption: text under the picture.
        links: extra files offered as links under the picture, ``{label: path}`` (e.g. the MP4).
        width: display width in CSS pixels (``None``: the picture's own width, capped by the page).
    """

    path: Union[str, os.PathLike]
    caption: str = ""
    links: dict[str, Union[str, os.PathLike]] = field(default_factory=dict)
    width: int | None = None


@dataclass
class Table:
    """A table; cells may be numbers (formatted with ``digits`` decimals) or text.
    ``highlight`` marks, per row, the column index of the best value (bold)."""

    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    digits: int = 2
    highlight: Sequence[int | None] | None = None


@dataclass
class WordMaps:
    """An interactive view of one caption: the words as buttons; selecting one shows its map over
    the image (one picture at a time, the first word's at first).

    Attributes:
        words: ``(label, picture)`` per word (and e.g. ``("whole caption", picture)``); pictures
            as for :class:`Figure` (relative to the report folder, or copied in).
        caption: text under the view.
        width: display width in CSS pixels of the picture (``None``: its own width).
    """

    words: Sequence[tuple[str, Union[str, os.PathLike]]]
    caption: str = ""
    width: int | None = None


@dataclass
class _Block:
    kind: str  # "text" | "figures" | "word_maps" | "table" | "settings" | "note"
    payload: Any
    title: str = ""


@dataclass
class Section:
    """One part of the report (one task). ``id`` is the HTML anchor (``<section id=...>``)."""

    id: str
    title: str
    blocks: list[_Block] = field(default_factory=list)
    nav: str = ""  # short label for the page's navigation bar (default: the title)

    def add_text(self, text: str) -> "Section":
        """A paragraph of plain text (escaped; blank lines start new paragraphs)."""
        self.blocks.append(_Block("text", text))
        return self

    def add_figures(self, figures: Sequence[Figure], title: str = "") -> "Section":
        """A gallery of figures under an optional heading."""
        self.blocks.append(_Block("figures", list(figures), title))
        return self

    def add_word_maps(self, views: Sequence[WordMaps], title: str = "") -> "Section":
        """Interactive word views (click a word, its map is shown) under an optional heading."""
        for view in views:
            if not view.words:
                raise ValueError("a word view needs at least one (word, picture)")
        self.blocks.append(_Block("word_maps", list(views), title))
        return self

    def add_table(self, headers: Sequence[str] | Table, rows: Sequence[Sequence[Any]] = (), caption: str = "", **kw: Any) -> "Section":
        """A table (pass a :class:`Table`, or its headers and rows)."""
        table = headers if isinstance(headers, Table) else Table(headers, rows, caption, **kw)
        self.blocks.append(_Block("table", table))
        return self

    def add_settings(self, settings: dict[str, Any], title: str = "Settings") -> "Section":
        """A key/value list of the settings used."""
        self.blocks.append(_Block("settings", dict(settings), title))
        return self

    def add_note(self, text: str) -> "Section":
        """A highlighted note (e.g. "checkpoint missing: this section was skipped")."""
        self.blocks.append(_Block("note", text))
        return self


@dataclass
class Report:
    """The whole page: a title, an intro, global settings and the sections in order."""

    title: str
    intro: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)

    def section(self, id: str, title: str, nav: str = "") -> Section:
        """Add (and return) a new section; ids must be unique HTML-safe names."""
        if not id or not all(c.isalnum() or c in "-_" for c in id):
            raise ValueError(f"section id {id!r} must be non-empty letters, digits, '-' or '_'")
        if any(s.id == id for s in self.sections):
            raise ValueError(f"duplicate section id {id!r}")
        section = Section(id, title, nav=nav)
        self.sections.append(section)
        return section


_CSS = """
:root { --fg:#1d232b; --muted:#5b6775; --line:#d9dee4; --bg:#f6f7f9; --card:#fff; --accent:#b3261e; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; color:var(--fg); background:var(--bg); }
header { padding:18px 28px 10px; background:#1d232b; color:#fff; }
header h1 { margin:0 0 4px; font-size:22px; }
header p { margin:2px 0; color:#c8d0d9; }
nav { padding:8px 28px; background:#2b333d; }
nav a { color:#fff; margin-right:18px; text-decoration:none; font-weight:600; }
main { padding:8px 28px 40px; max-width:1500px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; margin:18px 0; padding:6px 20px 16px; }
section h2 { border-bottom:2px solid var(--line); padding-bottom:6px; }
h3 { margin:18px 0 8px; font-size:16px; }
.gallery { display:flex; flex-wrap:wrap; gap:14px; align-items:flex-start; }
figure { margin:0; max-width:100%; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; background:#fff; display:block; }
figcaption { font-size:13px; color:var(--muted); max-width:640px; margin-top:4px; }
figcaption a { margin-right:10px; }
table { border-collapse:collapse; margin:8px 0 4px; font-variant-numeric:tabular-nums; }
th, td { border:1px solid var(--line); padding:4px 10px; text-align:right; }
th:first-child, td:first-child { text-align:left; }
th { background:#eef1f4; }
td.best { font-weight:700; }
td.text, th.text { text-align:left; }
caption { caption-side:bottom; text-align:left; font-size:13px; color:var(--muted); padding-top:4px; }
dl.settings { display:grid; grid-template-columns:max-content auto; gap:2px 14px; font-size:13px; }
dl.settings dt { color:var(--muted); }
dl.settings dd { margin:0; font-family:ui-monospace,"DejaVu Sans Mono",monospace; overflow-wrap:anywhere; }
.wordmaps { display:flex; flex-direction:column; gap:6px; max-width:640px; }
.wm-words { display:flex; flex-wrap:wrap; gap:4px; }
.wm-word { font:inherit; font-size:14px; padding:2px 8px; border:1px solid var(--line); border-radius:4px; background:#fff; cursor:pointer; }
.wm-word.active { background:#1d232b; color:#fff; border-color:#1d232b; }
.note { border-left:4px solid var(--accent); background:#fff4f2; padding:8px 12px; margin:10px 0; }
footer { color:var(--muted); font-size:12px; padding:0 28px 24px; }
"""


def _cell_class(best: bool, text: bool) -> str:
    """Numbers are right-aligned (tabular), text cells left-aligned; the best value is bold."""
    names = [name for name, on in (("best", best), ("text", text)) if on]
    return f' class="{" ".join(names)}"' if names else ""


def _format(value: Any, digits: int) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value == value else "n/a"  # NaN -> n/a
    return str(value)


class _Writer:
    """Renders blocks to HTML and makes every referenced file a relative path inside ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.copied: dict[Path, str] = {}
        self.views = 0  # interactive word views written so far (their ids: wm-0, wm-1, ...)

    def relative(self, path: Union[str, os.PathLike]) -> str:
        candidate = Path(path)
        absolute = candidate if candidate.is_absolute() else self.root / candidate
        absolute = absolute.resolve()
        if not absolute.is_file():
            raise FileNotFoundError(f"report figure {str(path)!r} does not exist (looked at {absolute})")
        try:
            relative = absolute.relative_to(self.root)
        except ValueError:  # outside the report folder: copy it in so the folder stays self-contained
            if absolute not in self.copied:
                assets = self.root / "assets"
                assets.mkdir(exist_ok=True)
                name = f"{len(self.copied):03d}_{absolute.name}"
                shutil.copy2(absolute, assets / name)
                self.copied[absolute] = f"assets/{name}"
            return self.copied[absolute]
        return relative.as_posix()

    def figure(self, figure: Figure) -> str:
        src = html.escape(self.relative(figure.path), quote=True)
        alt = html.escape(figure.caption or Path(figure.path).name, quote=True)
        size = self._size(self.root / self.relative(figure.path))
        width = figure.width or (size[0] if size else None)
        attrs = f' width="{width}"' if width else ""
        if width and size:
            attrs += f' height="{round(size[1] * width / size[0])}"'
        links = "".join(
            f'<a href="{html.escape(self.relative(p), quote=True)}">{html.escape(label)}</a>' for label, p in figure.links.items()
        )
        caption = html.escape(figure.caption)
        return f'<figure><img src="{src}" alt="{alt}"{attrs}><figcaption>{caption} {links}</figcaption></figure>'

    def word_maps(self, view: WordMaps) -> str:
        self.views += 1
        sources = [html.escape(self.relative(path), quote=True) for _, path in view.words]
        size = self._size(self.root / self.relative(view.words[0][1]))
        width = view.width or (size[0] if size else None)
        attrs = f' width="{width}"' if width else ""
        if width and size:
            attrs += f' height="{round(size[1] * width / size[0])}"'
        first = html.escape(view.words[0][0], quote=True)
        buttons = "".join(
            f'<button type="button" class="wm-word{" active" if i == 0 else ""}" aria-pressed="{"true" if i == 0 else "false"}" '
            f'data-src="{src}">{html.escape(label)}</button>'
            for i, ((label, _), src) in enumerate(zip(view.words, sources))
        )
        return (f'<div class="wordmaps" id="wm-{self.views - 1}"><img class="wm-image" src="{sources[0]}" alt="{first}"{attrs}>'
                f'<div class="wm-words">{buttons}</div><figcaption>{html.escape(view.caption)}</figcaption></div>')

    @staticmethod
    def _size(path: Path) -> tuple[int, int] | None:
        from .io import image_size

        return image_size(path)

    def block(self, block: _Block) -> str:
        title = f"<h3>{html.escape(block.title)}</h3>" if block.title else ""
        if block.kind == "text":
            return "".join(f"<p>{html.escape(p.strip())}</p>" for p in str(block.payload).split("\n\n") if p.strip())
        if block.kind == "note":
            return f'<div class="note">{html.escape(str(block.payload))}</div>'
        if block.kind == "figures":
            return title + '<div class="gallery">' + "".join(self.figure(f) for f in block.payload) + "</div>"
        if block.kind == "word_maps":
            return title + '<div class="gallery">' + "".join(self.word_maps(v) for v in block.payload) + "</div>"
        if block.kind == "settings":
            items = "".join(
                f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(f'{v:g}' if isinstance(v, float) else _format(v, 4))}</dd>"
                for k, v in block.payload.items()
            )
            return f'{title}<dl class="settings">{items}</dl>'
        if block.kind == "table":
            return self.table(block.payload)
        raise ValueError(f"unknown block kind {block.kind!r}")

    @staticmethod
    def table(table: Table) -> str:
        # A header sits over its column's values: left for text columns, right for numbers.
        first = table.rows[0] if table.rows else ()
        text_columns = {c for c in range(1, len(first)) if isinstance(first[c], str)}
        head = "".join(
            f"<th{_cell_class(False, column in text_columns)}>{html.escape(str(h))}</th>"
            for column, h in enumerate(table.headers)
        )
        body = []
        for index, row in enumerate(table.rows):
            if len(row) != len(table.headers):
                raise ValueError(f"table row {index} has {len(row)} cells for {len(table.headers)} headers")
            best = table.highlight[index] if table.highlight is not None and index < len(table.highlight) else None
            cells = "".join(
                f'<td{_cell_class(column == best, isinstance(v, str) and column > 0)}>{html.escape(_format(v, table.digits))}</td>'
                for column, v in enumerate(row)
            )
            body.append(f"<tr>{cells}</tr>")
        caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# Selecting a word shows its picture; "#wm-V:W" in the address selects word W of view V on load
# (links to one word's map, screenshots). Plain DOM calls, no external code.
_WORD_MAPS_SCRIPT = """<script>(function () {
  function show(view, button) {
    var image = view.querySelector('img.wm-image');
    image.src = button.getAttribute('data-src'); image.alt = button.textContent;
    Array.prototype.forEach.call(view.querySelectorAll('button.wm-word'), function (other) {
      other.classList.toggle('active', other === button); other.setAttribute('aria-pressed', other === button ? 'true' : 'false'); });
  }
  Array.prototype.forEach.call(document.querySelectorAll('.wordmaps'), function (view) {
    Array.prototype.forEach.call(view.querySelectorAll('button.wm-word'), function (button) {
      button.addEventListener('click', function () { show(view, button); }); });
  });
  var chosen = /^#(wm-[0-9]+):([0-9]+)$/.exec(window.location.hash);
  if (chosen) { var view = document.getElementById(chosen[1]);
    var button = view && view.querySelectorAll('button.wm-word')[Number(chosen[2])]; if (button) { show(view, button); } }
})();</script>"""


def write_report(report: Report, out_dir: Union[str, os.PathLike], filename: str = "index.html") -> Path:
    """Write ``out_dir/index.html`` (and ``report.json``, the same content as data) and return its path.

    Figures must exist; those outside ``out_dir`` are copied into ``out_dir/assets``. The HTML has
    no external URLs, and no script unless it has a word view (then one small inline script), so it
    renders from disk in any browser.
    """
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    writer = _Writer(root)
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.nav or s.title)}</a>' for s in report.sections)
    sections = []
    for section in report.sections:
        inner = "".join(writer.block(b) for b in section.blocks)
        sections.append(f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>{inner}</section>')
    settings = ""
    if report.settings:
        settings = "<section id=\"settings\"><h2>Run settings</h2>" + writer.block(_Block("settings", report.settings)) + "</section>"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = "".join(f"<p>{html.escape(p.strip())}</p>" for p in report.intro.split("\n\n") if p.strip())
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(report.title)}</h1>{intro}</header><nav>{nav}</nav>"
        f"<main>{''.join(sections)}{settings}</main>"
        f"<footer>Generated by multiexplain on {stamp}. Static page: open it from disk, no server needed.</footer>"
        f"{_WORD_MAPS_SCRIPT if writer.views else ''}</body></html>\n"
    )
    path = root / filename
    path.write_text(page, encoding="utf-8")
    (root / "report.json").write_text(json.dumps(_as_data(report, writer), indent=2, default=str), encoding="utf-8")
    return path


def _as_data(report: Report, writer: _Writer) -> dict[str, Any]:
    """The report's content as JSON-able data (tables and settings keep their values)."""
    sections = []
    for section in report.sections:
        blocks = []
        for block in section.blocks:
            if block.kind == "figures":
                payload: Any = [{"path": writer.relative(f.path), "caption": f.caption} for f in block.payload]
            elif block.kind == "word_maps":
                payload = [{"caption": v.caption, "words": [{"word": w, "path": writer.relative(p)} for w, p in v.words]}
                           for v in block.payload]
            elif block.kind == "table":
                table = block.payload
                payload = {"headers": list(table.headers), "rows": [list(r) for r in table.rows], "caption": table.caption}
            else:
                payload = block.payload
            blocks.append({"kind": block.kind, "title": block.title, "content": payload})
        sections.append({"id": section.id, "title": section.title, "blocks": blocks})
    return {"title": report.title, "settings": report.settings, "sections": sections}


# -- headless rendering (tests, README screenshot) -------------------------------------------------
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--mute-audio",
)

# Injected into a copy of the page: once everything has loaded, run the caller's actions (a
# function body that may return a Promise), then record every <img> (its src, whether it finished
# and its decoded width), every section id and the actions' result into a <pre> the DOM dump shows.
_PROBE = """<script>window.addEventListener('load', function () {
  function record(result) {
    var images = Array.prototype.map.call(document.images, function (i) {
      return {src: i.getAttribute('src'), complete: i.complete, naturalWidth: i.naturalWidth}; });
    var sections = Array.prototype.map.call(document.querySelectorAll('section[id]'), function (s) { return s.id; });
    var out = document.createElement('pre'); out.id = 'multiexplain-probe';
    out.textContent = JSON.stringify({images: images, sections: sections, actions: result});
    document.body.appendChild(out); }
  var actions = window.multiexplainActions;
  if (!actions) { record(null); return; }
  Promise.resolve().then(actions).then(record, function (error) { record({error: String(error)}); }); });</script>"""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH, or ``None``."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def render_in_chromium(
    index: Union[str, os.PathLike],
    screenshot: Union[str, os.PathLike, None] = None,
    window: tuple[int, int] = (1400, 1000),
    timeout: float = 60.0,
    actions: str | None = None,
    fragment: str = "",
) -> dict[str, Any]:
    """Open a report in headless Chromium and say what loaded.

    Returns ``{"images": [{"src", "complete", "naturalWidth"}, ...], "sections": [ids],
    "actions": ...}`` read from the rendered DOM (a probe script runs on a temporary copy of the
    page next to the original, so relative paths resolve the same way). ``actions`` is the body of
    a JavaScript function run after the page loaded (clicking words, say); what it returns (or the
    value its Promise resolves to) comes back under ``"actions"``, and the images are recorded after
    it. ``fragment`` (``"#wm-0:2"``) is appended to the page's address. A PNG screenshot of the
    original page (with ``fragment``) is written when ``screenshot`` is given. Each run uses a fresh
    profile directory.
    """
    import re
    import subprocess
    import tempfile

    binary = find_chromium()
    if binary is None:
        raise RuntimeError("no chromium binary found (Debian: apt-get install chromium chromium-driver)")
    index = Path(index).resolve()
    probe_page = index.with_name(f".probe_{os.getpid()}_{index.name}")
    injected = (f"<script>window.multiexplainActions = function () {{ {actions} }};</script>" if actions else "") + _PROBE
    probe_page.write_text(index.read_text(encoding="utf-8").replace("</body>", injected + "</body>"), encoding="utf-8")
    try:
        with tempfile.TemporaryDirectory(prefix="multiexplain-chromium-") as profile:
            command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                       f"--window-size={window[0]},{window[1]}"]
            dom = subprocess.run([*command, "--dump-dom", probe_page.as_uri() + fragment], capture_output=True, text=True,
                                 timeout=timeout, check=False).stdout
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                subprocess.run([*command, f"--screenshot={Path(screenshot).resolve()}", index.as_uri() + fragment],
                               capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        probe_page.unlink(missing_ok=True)
    match = re.search(r'<pre id="multiexplain-probe">(.*?)</pre>', dom, re.S)
    if match is None:
        raise RuntimeError(f"chromium did not render {index} (no probe output in the DOM dump)")
    return json.loads(html.unescape(match.group(1)))
