"""Check that every number the README and the results page state as a result appears in a results.json.

The project's rule: every number in the README and the docs' results appears in a committed results.json. This
script reads, in each page of `PAGES` (the README and docs/results-summary.md, where the long results section
lives), the top paragraph (``**Verdict.**`` or ``**Where the central claim stands.**``) and the section ``## Results:
what we measured (honestly)``, where the page has them (one of the pages must have the section), splits them into
claims (one per table row, bullet or paragraph), extracts the numbers of each claim, and looks each one up in the
results.json of the reports the claim names. A page's links are read relative to its own folder
(``results/x/report.md`` in docs/results-summary.md is ``docs/results/x``).

Which reports a claim is checked against:

* the ``docs/results/...`` reports it names: Markdown link targets, backticked paths (``docs/results/x/``,
  ``archive/x`` meaning ``docs/results/archive/x``) and backticked bare names that are a folder under
  ``docs/results/`` or ``docs/results/archive/``. A report folder's sub-reports (``x/*/results.json``) are
  searched with it; a single-file report ``docs/results/x.md`` uses ``x.json``;
* if it names none, its subsection's default: ``docs/results/lr-sweep/`` for the central-claim subsections (the
  top paragraph and "The central claim, tuned"), otherwise the reports named by the subsection's first paragraph
  (e.g. the "Deviations" section's "Unless said otherwise the measurement is the formulation search's");
* if there is no default either, the nearest preceding claim's reports in its subsection.

A number matches a JSON value when the value rounds to it at the number of decimals written (``0.835`` matches
0.8347); for a number with ``%`` or in a clause (up to ``;``, ``|`` or a sentence end) that speaks of "points",
100x the value matches too (accuracies are stored as fractions). 1/x never matches. An interval (``[a, b]``, or
``a to b`` after "interval"/"CI") must match a two-number list (a ``ci95``) as a pair. Statuses:
``results.json``; ``results.json (curve)`` when the only match is inside a long array (a loss curve, where almost
any value can be found); ``report.md only``; ``NOT FOUND``. The exit status is 1 if any number is NOT FOUND
(with ``--strict``, also if any is only in a curve or a report.md). A match shows that such a value exists in
the report, not that it is the quantity the README names: read the ``where`` column (``--json``).

Skipped, never checked (the documented list ``SKIP_RULES``, applied by blanking the text before extraction):
the "paper's claim" table column (the paper's numbers), and the spans below. Anything else is checked: it is
better to flag a number than to hide it. Step counts are checked, not skipped: results.json records max_steps,
and "189 steps" is also how a steps-to-target result is written.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

SECTION = "## Results: what we measured (honestly)"
TOPS = ("**Verdict.**", "**Where the central claim stands.**")
TOP = TOPS[1]
PAGES = ("README.md", "docs/results-summary.md")
CENTRAL = ("docs/results/lr-sweep",)
LONG_ARRAY = 20  # a numeric array longer than this is a curve: a match there is reported as weaker

_NUM = r"[+-]?\d+(?:\.\d+)?(?:e-?\d+)?"
_NUMLIST = _NUM + r"(?:\s*(?:/|\.\.\.?|-|to)\s*" + _NUM + r")*"
SKIP_RULES: dict[str, str] = {
    "link target": r"\]\([^)]*\)",
    "code span (path, command, option)": r"`[^`]*`",
    "name containing digits (SST-2, BLEU-4, SmolLM2-135M, X_{t+1})": r"(?<![\w.+-])[A-Za-z][^\s,;:()\[\]]*\d[^\s,;:()\[\]]*",
    "paper table/figure number": r"\b(?:Table|Fig\.|Figure)\s+\d+",
    "model size (135M, 7-8B)": r"(?<![\w.])\d+(?:-\d+)?[MB]\b",
    "commit hash": r"\bcommit\s+[0-9a-f]{7,40}\b",
    "date": r"\b\d{4}-\d{2}-\d{2}\b",
    "compound adjective (2-core, 4-wide)": r"(?<![\w.])\d+-[A-Za-z][\w-]*",
    "interval level (95% CI)": r"\b95% ?(?:t-)?(?:interval|CI)",
    "learning rate written 3e-3 (one digit, no point)": r"(?<![\w.])\de-\d\b",
    "setting after a keyword (lr, batch, width(s), gamma, load, seed(s), ln, n >=)":
        r"\b(?:lr|batch|widths?|gamma|load|seeds?|ln|n >=)\s+" + _NUMLIST,
    "count of inputs (N seeds/runs/prompts/sentences/tokens)":
        r"(?<![\w.])\d+\s+(?:held-out\s+)?(?:seeds|runs|prompts|sentences|tokens)\b",
    "target definition (90% of the drop)": r"\b\d+% of (?:AdaLoRA's|the) drop",
}
NUMBER = re.compile(r"(?<![\w.+-])([+-]?\d+(?:\.\d+)?(?:e-\d+)?)(?:-(\d+(?:\.\d+)?))?(x|%)?(?!\w)")
CLAUSE = r"(?:[^;|.]|\.(?!\s))+"  # up to ; | or a sentence end: "points" makes its numbers percent-like
INTERVAL = re.compile(rf"\[\s*({_NUM}),\s*({_NUM})\s*\]|({_NUM})\s+to\s+({_NUM})")
PAPER_COLUMN = "paper"


@dataclass
class Claim:
    """One table row, bullet or paragraph; ``text`` is what numbers are taken from."""

    subsection: str
    label: str
    text: str
    reports: list[str] = field(default_factory=list)


def section_claims(readme: str, require_section: bool = True) -> list[Claim]:
    """Split the top paragraph and the results section into claims (reports not resolved yet); a page without the
    section is refused unless ``require_section`` is False (then only its top paragraph, if any, is read)."""
    lines = readme.splitlines()
    claims, buf, sub, in_table, skip_cols = [], [], "central claim (top)", False, set()

    def flush():
        if buf:
            text = " ".join(s.strip() for s in buf)
            claims.append(Claim(sub, text, text))
            buf.clear()

    top = [i for i, s in enumerate(lines) if s.startswith(TOPS)]
    for line in lines[top[0]:] if top else []:
        if not line.strip() or line.startswith("## "):
            break
        buf.append(line)
    flush()
    if SECTION not in lines:
        if not require_section:
            return claims
        raise ValueError(f"no line {SECTION!r} in the README")
    sub = "(section intro)"
    for line in lines[lines.index(SECTION) + 1 :]:
        if line.startswith("## "):
            break
        is_row = line.startswith("|")
        if line.startswith(("### ", "![")) or not line.strip() or is_row:
            flush()
        if line.startswith("### "):
            sub = line[4:].strip()
        elif is_row:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not in_table:  # header row: remember which columns quote the paper
                skip_cols = {i for i, c in enumerate(cells) if PAPER_COLUMN in c.lower()}
            elif not set(line) <= set("|-: "):
                kept = " | ".join(c for i, c in enumerate(cells) if i not in skip_cols)
                claims.append(Claim(sub, " | ".join(cells), kept))
        elif line.strip() and not line.startswith("!["):
            if line.lstrip().startswith("- "):
                flush()
            buf.append(line)
        in_table = is_row
    flush()
    return claims


def report_path(name: str, root: Path, base: str = "") -> str | None:
    """Map a link target or backticked name to a report (folder or single-file stem), or None. ``base``: the folder
    of the page the name is in, relative to the root (a relative link is read from there)."""
    name = name.strip().split("#")[0].rstrip("/")
    if name.startswith("archive/"):
        name = "docs/results/" + name
    candidates = [name] if "/" in name else [f"docs/results/{name}", f"docs/results/archive/{name}"]
    if base and "/" in name and not name.startswith("docs/"):
        candidates.insert(0, os.path.normpath(os.path.join(base, name)))
    for cand in candidates:
        if not cand.startswith("docs/results/") or cand.endswith("README.md"):
            continue
        if cand.endswith(("/report.md", "/results.json", ".png")):
            cand = cand.rsplit("/", 1)[0]
        elif cand.endswith((".md", ".json")):
            cand = cand.rsplit(".", 1)[0]
        if cand.rstrip("/") in ("docs/results", "docs/results/archive"):  # the indexes, not reports
            continue
        jsons, text = report_files(cand, root)
        if text.exists() or any(js.exists() for js in jsons):
            return cand
    return None


def named_reports(text: str, root: Path, base: str = "") -> list[str]:
    """The reports a claim names, in order, without repeats."""
    names = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"`([^`\s]+)`", text)
    found = [report_path(n, root, base) for n in names]
    return list(dict.fromkeys(r for r in found if r))


def assign_reports(claims: list[Claim], root: Path, base: str = "") -> None:
    """Give each claim its reports: the ones it names, else its subsection's default, else the previous claim's."""
    defaults: dict[str, list[str]] = {}
    previous: dict[str, list[str]] = {}
    for claim in claims:
        own = named_reports(claim.label, root, base)
        if claim.subsection not in defaults:
            central = "central claim" in claim.subsection.lower()
            defaults[claim.subsection] = list(CENTRAL) if central else own
        claim.reports = own or defaults[claim.subsection] or previous.get(claim.subsection, [])
        previous[claim.subsection] = claim.reports


def blank_skipped(text: str) -> str:
    """Replace every span matched by a SKIP_RULES pattern with spaces (positions are kept)."""
    for pattern in SKIP_RULES.values():
        text = re.sub(pattern, lambda m: " " * len(m.group()), text)
    return text


def extract_numbers(text: str) -> list[tuple[tuple[str, ...], bool]]:
    """Numbers checked in a claim: (as written, percent-like). An interval gives one item of two numbers;
    a range ``0.6-1.5%`` gives two items."""
    out = []
    blanked = blank_skipped(text)
    for clause in re.finditer(CLAUSE, blanked):
        points, taken = "point" in clause.group(), set()
        for m in INTERVAL.finditer(clause.group()):
            start = clause.start() + m.start()
            if m.group(1) or re.search(r"(?:interval|CI)\W*$", text[max(0, start - 16):start]):
                out.append((start, (m.group(1) or m.group(3), m.group(2) or m.group(4)), points))
                taken.update(range(m.start(), m.end()))
        for m in NUMBER.finditer(clause.group()):
            suffix = m.group(3) or ""
            if m.start(1) not in taken:
                out += [(clause.start() + m.start(), (v + suffix,), suffix == "%" or points)
                        for v in filter(None, (m.group(1), m.group(2)))]
    return [(number, percent) for _, number, percent in sorted(out, key=lambda item: item[0])]


def matches(written: tuple[str, ...], values: tuple[float, ...], percent: bool) -> bool:
    """Do ``values`` (or 100x them, for percent-like numbers) round to ``written`` at its decimals?"""
    if len(written) != len(values):
        return False
    numbers = [Decimal(w.rstrip("x%").lstrip("+")) for w in written]
    halves = [0.5 * 10.0 ** min(n.as_tuple().exponent, 0) + 1e-12 for n in numbers]
    return any(all(abs(scale * v - float(n)) <= h for v, n, h in zip(values, numbers, halves))
               for scale in ((1, 100) if percent else (1,)))


def json_leaves(obj, path="", in_long=False):
    """Yield (key path, (value,), inside a long array) for every numeric leaf, and (key path, (x, y), False)
    for every numeric list of two (an interval)."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, (float(obj),), in_long
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from json_leaves(value, f"{path}.{key}", in_long)
    elif isinstance(obj, list):
        long = in_long or len(obj) > LONG_ARRAY
        if len(obj) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            yield path, (float(obj[0]), float(obj[1])), False
        for i, value in enumerate(obj):
            yield from json_leaves(value, f"{path}[{i}]", long)


def report_files(report: str, root: Path) -> tuple[list[Path], Path]:
    """(results jsons, report text) of a report folder (with its sub-reports) or a single-file report."""
    folder = root / report
    if folder.is_dir():
        return [folder / "results.json", *sorted(folder.glob("*/results.json"))], folder / "report.md"
    return [folder.with_suffix(".json")], folder.with_suffix(".md")


def check_number(written: tuple[str, ...], percent: bool, reports: list[str], root: Path, cache: dict) -> tuple[str, str]:
    """Return (status, where) for one number against the given reports."""
    curve = md = None
    for report in reports:
        jsons, text = report_files(report, root)
        for js in jsons:
            if js not in cache:
                cache[js] = list(json_leaves(json.loads(js.read_text()))) if js.exists() else []
            for path, value, in_long in cache[js]:
                if matches(written, value, percent):
                    if not in_long:
                        return "results.json", f"{js.relative_to(root)}:{path}"
                    curve = curve or f"{js.relative_to(root)}:{path}"
        if md is None and text.exists():
            values = [float(v) for v in re.findall(_NUM, text.read_text())]
            if all(any(matches((w,), (v,), percent) for v in values) for w in written):
                md = str(text.relative_to(root))
    if curve:
        return "results.json (curve)", curve
    return ("report.md only", md) if md else ("NOT FOUND", "")


def check(readme: Path, root: Path, require_section: bool = True) -> list[dict]:
    """Check every number of a page's results (the README, or another page); one row per number."""
    try:
        base = str(readme.resolve().parent.relative_to(root.resolve()))
    except ValueError:
        base = ""
    claims = section_claims(readme.read_text(), require_section)
    assign_reports(claims, root, "" if base == "." else base)
    rows, cache = [], {}
    for claim in claims:
        for written, percent in extract_numbers(claim.text):
            status, where = check_number(written, percent, claim.reports, root, cache)
            number = written[0] if len(written) == 1 else f"[{', '.join(written)}]"
            rows.append({"subsection": claim.subsection, "claim": claim.label, "number": number,
                         "status": status, "where": where, "reports": claim.reports, "page": readme.name})
    return rows


def check_pages(root: Path, pages=PAGES) -> list[dict]:
    """Check every page of ``pages`` that exists (one of them must hold the results section)."""
    found = [root / p for p in pages if (root / p).is_file()]
    if not any(SECTION in p.read_text().splitlines() for p in found):
        raise ValueError(f"no page of {list(pages)} has a line {SECTION!r}")
    return [row for page in found for row in check(page, root, require_section=False)]


def main(argv: list[str] | None = None) -> int:
    """Print the table; exit 1 if any number is NOT FOUND."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--readme", type=Path, help="check this page only (default: ROOT's README.md and "
                                                    "docs/results-summary.md)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--strict", action="store_true", help="fail on curve-only and report.md-only numbers too")
    args = parser.parse_args(argv)
    readme = args.readme or args.root / "README.md"
    if not readme.is_file():
        parser.error(f"no README at {readme} (give --readme FILE, or --root the repository)")
    rows = check(readme, args.root) if args.readme else check_pages(args.root)
    for row in rows:
        reports = ", ".join(r.removeprefix("docs/results/") for r in row["reports"]) or "-"
        print(f"{row['claim'][:60]:<60} | {row['number']:>8} | {row['status']:<20} | {reports}")
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    print(f"\n{len(rows)} numbers: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    failing = {"NOT FOUND"} | ({"report.md only", "results.json (curve)"} if args.strict else set())
    return 1 if any(r["status"] in failing for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
