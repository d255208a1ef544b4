"""Every relative link in README.md and docs/**/*.md points at a file that exists, and every anchor into a .md file
at one of its headings (GitHub's slugs); the README keeps its promised shape (issue 25)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
# [text](target) and ![alt](target); the text may hold `code` and span lines, the target no spaces
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*([^)\s]+)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks (a `[x](y)` in a code sample is no link) or inline code spans."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m[1])
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def broken_links(path: Path, base: Path | None = None) -> list[str]:
    """Links of ``path`` that miss, resolved from ``base`` (default: the file's own folder)."""
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    problems = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = ((base or path.parent) / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{name}: {target} -> no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{name}: {target} -> no heading #{anchor} in {dest.name}")
    return problems


def test_every_relative_link_and_anchor_in_readme_and_docs_exists():
    problems = [p for f in markdown_files() for p in broken_links(f)]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_links_and_slugs_like_github():
    assert slug("Fault injection (`benchmarks/fault_injection.py`)") == "fault-injection-benchmarksfault_injectionpy"
    assert slug("How the demo's recipe was found") == "how-the-demos-recipe-was-found"
    assert slug("What the demo shows (in-process, 2-core CPU)") == "what-the-demo-shows-in-process-2-core-cpu"
    assert slug("1. Throughput: Ray runtime vs the single-process trainer (tiny default)") == \
        "1-throughput-ray-runtime-vs-the-single-process-trainer-tiny-default"
    sample = "see [a `b`](x.md#y), ![p](img.png) and `[not](a-link)`\n```\n[nor](this)\n```\n"
    assert LINK.findall(prose(sample)) == ["x.md#y", "img.png"]


def test_readme_is_short_and_has_the_commands_the_diagram_and_the_picture():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text
    assert len(re.findall(r"^```mermaid\s*$", text, re.M)) == 1
    images = [m for m in IMAGE.findall(FENCE.sub("", text)) if not re.match(r"https?:", m)]
    assert images and all((ROOT / m).is_file() for m in images), images


def test_docs_index_lists_every_document():
    index = (ROOT / "docs" / "README.md").read_text()
    listed = {(ROOT / "docs" / t.partition("#")[0]).resolve() for t in LINK.findall(prose(index))}
    missing = [str(f.relative_to(ROOT)) for f in markdown_files()[1:] if f.name != "README.md" and f.resolve() not in listed]
    assert not missing, f"docs/README.md does not list {missing}"


@pytest.mark.parametrize("planted", ["[gone](docs/nope.md)", "[bad anchor](docs/ray.md#no-such-heading)",
                                     "![gone](docs/nope.png)", "[here](#no-such-section)"])
def test_a_planted_broken_link_is_reported(tmp_path, planted):
    copy = tmp_path / "README.md"
    copy.write_text((ROOT / "README.md").read_text() + f"\n{planted}\n")
    problems = broken_links(copy, base=ROOT)  # resolved from the repository root, as the real README's links
    assert len(problems) == 1 and planted.split("(")[1].rstrip(")") in problems[0], problems
