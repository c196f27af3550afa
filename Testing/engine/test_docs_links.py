"""Every relative link and picture in README.md and docs/*.md points at something that exists.

The README is the front door and the docs/ pages hold the rest; a page renamed or a picture
moved must not leave a dead link behind. For each Markdown link or image ``[text](target)`` /
``![alt](target)`` and each HTML ``<img src=...>``, a relative target (not http(s):, mailto: or a
bare ``#anchor``) is resolved against the folder of the file that holds it and must exist; an
``#anchor`` into a Markdown file (the same file or another) must match one of its headings,
slugged as GitHub does. Standard library only.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target) and ![alt](target), with an optional "title"; text may hold one level of [...].
_MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_IMG = re.compile(r"<img\b[^>]*?\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with inline code removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, _INLINE_CODE.sub("", line)


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation except '-' and '_' dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match:
            slug = github_slug(match.group(2).replace("`", ""))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(path: Path):
    """(line number, target) of every link and image in a Markdown file."""
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for pattern in (_MD_LINK, _HTML_IMG):
            for match in pattern.finditer(line):
                yield number, match.group(1)


def broken_links(path: Path) -> list[str]:
    """Every relative link or image of `path` whose file, or whose heading anchor, is missing."""
    problems = []
    for number, target in links(path):
        if _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = path if not file_part else (path.parent / unquote(file_part)).resolve()
        where = f"{path.name}:{number}"
        if not destination.exists():
            problems.append(f"{where}: {target} -> {destination} does not exist")
        elif anchor and destination.suffix.lower() == ".md" and destination.is_file():
            if unquote(anchor).lower() not in anchors(destination):
                problems.append(f"{where}: {target} -> no heading '#{anchor}' in {destination.name}")
    return problems


def documentation_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_relative_link_and_image_resolves():
    files = documentation_files()
    assert len(files) > 1, "docs/*.md pages are missing"
    problems = [problem for path in files for problem in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    readme_targets = {target.partition("#")[0] for _, target in links(REPO / "README.md")}
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme_targets, f"README.md has no link to docs/{page.name}"


def test_checker_reports_a_missing_file_a_missing_anchor_and_a_missing_image(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Some `code` heading, here!\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## Local section\n\n"
        "[fine](other.md#some-code-heading-here) [fine too](#local-section) [web](https://example.org/x)\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-heading) [bad local](#nowhere)\n"
        "![picture](images/absent.png) <img src=\"images/also-absent.png\">\n"
        "```\n[inside a code block](not-checked.md)\n```\n"
        "`[inline code](not-checked-either.md)`\n"
    )
    problems = broken_links(page)
    assert len(problems) == 5, problems
    for expected in ("missing.md", "no-such-heading", "#nowhere", "images/absent.png", "images/also-absent.png"):
        assert any(expected in problem for problem in problems), (expected, problems)
    assert not any("not-checked" in problem for problem in problems)


def test_github_slugs():
    assert github_slug("Corrections: fix slices, more examples, update") == "corrections-fix-slices-more-examples-update"
    assert github_slug("Presets: paper and default") == "presets-paper-and-default"
    assert github_slug("What runs where") == "what-runs-where"
    assert github_slug("snake_case and-dash") == "snake_case-and-dash"


def test_readme_is_one_screen_with_a_picture():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    images = [target for _, target in links(REPO / "README.md")
              if re.search(r"\.(png|jpe?g|gif|svg|webp)$", target.partition("#")[0], re.IGNORECASE)]
    assert images, "README.md shows no picture"
