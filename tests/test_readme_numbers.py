"""Every measured number in the README comes from a results file that the same paragraph or table cites.

The README is read as the reader sees it: fenced code, inline code, link targets and HTML comments are
left out. It is split into sections (headings) and blocks (paragraphs, lists, tables: separated by blank
lines). A block cites the results files it names (``benchmarks/results/NAME.md|json``, a benchmark script
``benchmarks/NAME.py`` -- the results files that script writes --, ``tests/test_matrix.py`` -- the
compatibility results, or ``docs/GRADCAMPP.md`` -- the paper's numbers); a block that names none cites
what the block before it in the same section cites (a table under the paragraph that introduces it).

A *measured number* is one written with a decimal point, or followed by ``%``, ``x`` / ``×`` or a unit of
time or memory (``s``, ``min``, ``h``, ``MB``, ``KB``, ``MiB``, ...); plain integers (sizes, counts, seeds, equation
numbers) and scientific notation (tolerances such as ``1e-6``) are parameters and are not checked; the first
number of a range takes the range's unit (``43-70 s`` checks 43 s and 70 s). A number
is backed when a value in a cited file rounds to it at the README's precision (also a fraction shown as a
percentage, or seconds shown as minutes or hours). What is not measured but looks like it goes in :data:`PARAMETERS`, with
the reason; numbers of sections that other work is rewriting go in :data:`PENDING` until they are backed
(an entry that is backed already, or no longer in the README, fails too, so the list stays honest).

A failure lists each unbacked number with its section, README line, context and the files its block cites,
then how to fix it (:data:`HOW_TO_FIX`): sections merged from other branches are checked by the same rules.

The check is deliberately tolerant: a number that happens to occur elsewhere in a large cited file
passes, so it catches figures with no source (hand-typed, stale, from an uncommitted run), not every typo.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from repo_scripts import load_repo_module

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"

#: Phrases whose number is a parameter, a definition or a version, not a measurement.
PARAMETERS = {
    "a = 0.01": "the paper's explanation-loss weight (eq. 27-28)",
    "--alpha 0.5": "a command-line default",
    "torchcam 0.5": "a version",
    "grad-cam` 1.5.7": "a version",
    "1.3x a forward": "a target of the issue, the definition the speed result is judged by",
    "<= 1.3": "a target",
    ">= 2.5x": "a target",
    "<= 2x": "a target",
    "at most 3x": "a target",
    "tolerance 0.05 max / 0.005 mean": "the autocast test's stated tolerance (tests/test_properties.py)",
    "to 1e-3 of the peak": "a test tolerance",
    "15 px": "Zhang et al.'s pointing-game tolerance (a definition)",
    "from a 6 s video": "an example of the timing rule, not a measurement",
    "plays for 6 s": "an example of the timing rule, not a measurement",
    "Loc(delta) at 0 / 0.25 / 0.5": "the thresholds delta the store's per-item localisation is computed at",
    "bound 25 MB": "the leak test's bound (tests/test_leaks.py)",
    "bound 256 KB": "the leak test's bound (tests/test_leaks.py)",
}

#: Numbers of sections being rewritten by other issues, not yet backed by a results file the block cites:
#: {section heading: {number as written: owner}}.
PENDING: dict[str, dict[str, str]] = {
}

#: Benchmark scripts whose results files cannot be read off their source.
SCRIPT_RESULTS = {"quality_distillation": ("distillation",)}

NUMBER = re.compile(
    r"(?<![\w.])(?<![A-Za-z]-)(?P<value>\d[\d,]*(?:\.\d+)?)"
    r"(?P<unit>\s?%|x\b|×|\s(?:ms|s|seconds|min|minutes|h|hours|MB|KB|MiB|GiB|GB)\b)?(?![\w.]*\d)(?![A-Za-z])"
)


def _visible_text(markdown: str) -> str:
    """The README without fenced code, inline code, HTML comments and link targets."""
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.S)
    markdown = re.sub(r"<!--.*?-->", "", markdown, flags=re.S)
    markdown = re.sub(r"\]\([^)]*\)", "]", markdown)
    return markdown


def _citations(block: str) -> set[str]:
    """Results-file stems a raw block (code spans and links included) names."""
    cited = set(re.findall(r"benchmarks/results/([\w.-]+?)\.(?:md|json)", block))
    for script in re.findall(r"benchmarks/([\w-]+)\.py", block):
        cited |= set(_script_results(script))
    if "tests/test_matrix.py" in block:
        cited.add("compatibility")
    if "docs/GRADCAMPP.md" in block:
        cited.add("docs/GRADCAMPP")
    return cited


def _script_results(script: str) -> tuple[str, ...]:
    if script in SCRIPT_RESULTS:
        return SCRIPT_RESULTS[script]
    source = (REPO / "benchmarks" / f"{script}.py").read_text()
    stems = set(re.findall(r"([\w-]+)\.(?:json|md)", source)) | set(re.findall(r'RESULTS\s*/\s*"([\w-]+)', source))
    return tuple(sorted(stem for stem in stems if (RESULTS / f"{stem}.json").exists() or (RESULTS / f"{stem}.md").exists()))


def _values(stem: str) -> list[float]:
    """Every number in a results file (JSON leaves and the Markdown's text)."""
    values: list[float] = []
    paths = [REPO / f"{stem}.md"] if stem.startswith("docs/") else [RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"]
    for path in paths:
        if not path.exists():
            continue
        text = path.read_text()
        if path.suffix == ".json":
            stack = [json.loads(text)]
            while stack:
                item = stack.pop()
                if isinstance(item, dict):
                    stack.extend(item.values())
                elif isinstance(item, list):
                    stack.extend(item)
                elif isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item):
                    values.append(abs(float(item)))
        else:
            values += [float(v.replace(",", "")) for v in re.findall(r"\d[\d,]*(?:\.\d+)?", text)]
    return values


def _backed(written: str, unit: str, values: list[float]) -> bool:
    number = float(written.replace(",", ""))
    decimals = len(written.split(".")[1]) if "." in written else 0
    half = 0.5 * 10**-decimals + 1e-9
    candidates = [lambda v: v, lambda v: 100 * v]  # a fraction may be shown as a percentage
    if unit.strip() in ("min", "minutes"):
        candidates.append(lambda v: v / 60)
    if unit.strip() in ("h", "hours"):
        candidates.append(lambda v: v / 3600)
    return any(abs(f(v) - number) <= half for v in values for f in candidates)


def _sections(markdown: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """``[(heading, [(README line the block starts on, raw block), ...])]`` in README order."""
    # Code is neither prose nor headings; blank lines in its place keep the line numbers.
    markdown = re.sub(r"```.*?```", lambda code: "\n" * code.group().count("\n"), markdown, flags=re.S)
    sections: list[tuple[str, list[tuple[int, str]]]] = [("(top)", [])]
    kept: list[str] = []
    start = 0
    for number, line in enumerate(markdown.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            if kept:
                sections[-1][1].append((start, "\n".join(kept)))
            kept = []
            if line.startswith("#"):
                sections.append((line.lstrip("# ").strip(), []))
            continue
        if not kept:
            start = number
        kept.append(line)
    if kept:
        sections[-1][1].append((start, "\n".join(kept)))
    return sections


#: The second half of a range (``43-70 s``, ``2.5–2.8×``, ``1…3 %``): its unit applies to the first number too.
RANGE_END = re.compile(r"\s?[-–…]\s?\d[\d,]*(?:\.\d+)?(?P<unit>\s?%|x\b|×|\s(?:ms|s|seconds|min|minutes|h|hours|MB|KB|MiB|GiB|GB)\b)")


def unbacked_numbers() -> dict[str, list[tuple[str, str]]]:
    """``{section: [(number as written, "README line, context and cited files"), ...]}`` for every
    measured number no cited file backs."""
    found: dict[str, list[tuple[str, str]]] = {}
    for heading, blocks in _sections(README.read_text()):
        cited: set[str] = set()
        for line, raw in blocks:
            cited = _citations(raw) or cited
            text = _visible_text(re.sub(r"`[^`]*`", "", raw))
            values = [v for stem in sorted(cited) for v in _values(stem)]
            for match in NUMBER.finditer(text):
                written, unit = match.group("value"), match.group("unit") or ""
                if not unit:
                    range_end = RANGE_END.match(text, match.end())
                    unit = range_end.group("unit") if range_end else ""
                if "." not in written and not unit:
                    continue
                context = text[max(0, match.start() - 30) : match.end() + 30].replace("\n", " ")
                if any(phrase in context for phrase in PARAMETERS):
                    continue
                if not _backed(written, unit, values):
                    where = f"line {line + text[: match.start()].count(chr(10))}"
                    found.setdefault(heading, []).append(
                        (f"{written}{unit}", f"{where}: '...{context.strip()}...' cites {sorted(cited) or 'nothing'}"))
    return found


HOW_TO_FIX = """Each number above is written with a decimal point, %, x or a time/memory unit, and no results file
that its paragraph (or, for a table or list, the paragraph before it in the same section) names holds a
value that rounds to it. Fix each one by, in order of preference:
  1. naming the results file that holds it in that paragraph (benchmarks/results/NAME.md or .json, the
     benchmark script benchmarks/NAME.py that writes it, tests/test_matrix.py, or docs/GRADCAMPP.md);
  2. rerunning the committed script that writes it, if the file is stale, and updating the README from it;
  3. if it is a parameter, target, tolerance or version rather than a measurement: adding the phrase
     around it to PARAMETERS in tests/test_readme_numbers.py, with the reason;
  4. if its section is being rewritten by an open issue: adding it to PENDING under that section's heading,
     with the issue number (only until that issue's results file lands).
"""


def test_every_readme_number_is_in_a_results_file_its_paragraph_cites():
    found = unbacked_numbers()
    problems = [f"  [{heading}] {number} ({where})" for heading, entries in found.items() for number, where in entries
                if number not in PENDING.get(heading, {})]
    stale = [f"  [{heading}] {number} ({owner})" for heading, numbers in PENDING.items()
             for number, owner in numbers.items() if number not in {written for written, _ in found.get(heading, [])}]
    assert not problems, "README numbers without a results file that backs them:\n" + "\n".join(problems) + "\n" + HOW_TO_FIX
    assert not stale, ("PENDING entries in tests/test_readme_numbers.py that a cited results file backs now, or that are "
                       "no longer in that README section (renamed heading?): remove or move them:\n" + "\n".join(stale))


def test_the_checker_tells_measured_numbers_from_parameters(tmp_path, monkeypatch):
    """The rules on a small README: what is checked, what is skipped, what backs a number."""
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "speed.json").write_text(json.dumps({"ratio": 1.0812, "win": 0.7033, "wall_s": 324.4}))
    (tmp_path / "README.md").write_text(
        "# T\n\n## Speed\n\nFrom `benchmarks/results/speed.json`: 1.08x a forward, Win % 70.33, 324 s for all,\n"
        "on WRN-16-2 with 3 seeds and 16x16 maps (eq. 19), a = 0.01.\n\n| a | b |\n|---|---|\n| 1.08 | 2.50 |\n\n"
        "```python\nx = 9.99\n```\n\n## Other\n\nUncited: 0.5 and 12 s, 7-15 words, 43-70 s.\n"
    )
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "README", tmp_path / "README.md")
    monkeypatch.setattr(module, "RESULTS", results)
    found = unbacked_numbers()
    assert list(found) == ["Speed", "Other"]
    assert [number for number, _ in found["Speed"]] == ["2.50"]  # the table inherits the citation
    # Plain integers are parameters unless a range's unit makes them measurements.
    assert [number for number, _ in found["Other"]] == ["0.5", "12 s", "43 s", "70 s"]
    assert found["Speed"][0][1].startswith("line 10: ") and found["Other"][0][1].startswith("line 18: ")


def test_the_generated_compatibility_section_is_current():
    """The README's compatibility list is what scripts/update_readme_compat.py renders from the results."""
    module = load_repo_module("scripts/update_readme_compat.py")
    assert module.main(["--check"]) == 0, "run python scripts/update_readme_compat.py"
