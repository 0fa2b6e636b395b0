"""The repository explains itself: no references outside it, no broken links inside it.

A reader (or a packager, or CI on a fresh clone) has only the repository. A comment
that points to a design document when no such file is tracked, a README link to a file that
was renamed, or an anchor to a section that was retitled all send the reader nowhere,
and none of them fails anything else. These checks read files only: they import
nothing of fieldscope and take well under a second.

The architecture overview every contributor reads first is docs/architecture.md;
code and docs point to its sections as ``docs/architecture.md#<anchor>``.
"""

from __future__ import annotations

import re
import subprocess
import unicodedata
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = "docs/architecture.md"
SELF = "tests/test_docs.py"  # names the forbidden patterns, so it is not scanned for them

# (pattern, what it is, files allowed to mention it)
OUTSIDE_REFERENCES: tuple[tuple[re.Pattern[str], str, frozenset[str]], ...] = (
    (
        re.compile(r"\b" + "DESIGN" + r"\.md\b"),
        "a design document that is not in the repository",
        frozenset(),
    ),
    (
        re.compile(r"\.\./shared/"),
        "a path outside the repository",
        # The real plankton images used by these are test data, not documentation.
        frozenset(
            {
                "tests/test_real_accuracy.py",
                "benchmarks/real_accuracy.py",
                ".ci/run",
                "deploy/pi-check/run",
                "deploy/pi-check/make_real_bundle.py",
            }
        ),
    ),
    (re.compile(r"/work/shared\b"), "a path on one machine, outside the repository", frozenset()),
)
# Folders that are never part of the repository when it is walked without git.
UNTRACKED_DIRS = frozenset(
    {
        ".git",
        ".venv",
        "venv",
        "__pycache__",
        "build",
        "dist",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        ".hypothesis",
        "node_modules",
    }
)

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:name|id)=[\"']([^\"']+)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# A section of one of our Markdown documents named in code, comments or docs.
DOC_SECTION = re.compile(r"\b((?:docs/[\w.-]+|README)\.md)#([\w-]+)")
# Repository paths and modules named as inline code in the architecture overview.
REPO_PATH = re.compile(
    r"^(?:edge|train|convert|deploy|collect|cli|tests|benchmarks|docs|scripts|\.ci)/[\w./-]*$"
)
MODULE = re.compile(r"\bfieldscope\.(edge|train|convert|deploy|collect|cli)\.(\w+)")


@cache
def repository_files() -> tuple[str, ...]:
    """Paths (relative, POSIX) of the files that make up the repository.

    With git: the tracked files (a scratch file or a demo's output folder in the
    checkout is not the repository). Without git (an unpacked source archive): every
    file outside the folders that are never committed.
    """
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        found = (
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*")
            if p.is_file()
            and not any(
                part in UNTRACKED_DIRS or part.endswith(".egg-info")
                for part in p.relative_to(ROOT).parts
            )
        )
        return tuple(sorted(found))
    names = {name.decode() for name in out.split(b"\0") if name}
    return tuple(sorted(n for n in names if (ROOT / n).is_file()))


def text_of(relative: str) -> str | None:
    """The file as text, or None for a binary file (images, archives)."""
    data = (ROOT / relative).read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def repository_text_lines() -> Iterator[tuple[str, int, str]]:
    """(file, line number, line) of every text file of the repository but this one,
    whose patterns would otherwise find themselves."""
    for name in repository_files():
        text = text_of(name) if name != SELF else None
        if text is not None:
            for number, line in enumerate(text.splitlines(), 1):
                yield name, number, line


def markdown_files() -> list[str]:
    return [name for name in repository_files() if name.endswith(".md")]


def lines_outside_fences(markdown: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks (``` or ~~~, closed
    by a fence of the same character at least as long), the fences themselves left out."""
    fence: str | None = None
    for number, line in enumerate(markdown.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        yield number, line


def prose_lines(markdown: str) -> Iterable[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans removed.

    Text in code is an example, not a link: ``d["files"](x)`` in a code block is Python.
    """
    for number, line in lines_outside_fences(markdown):
        yield number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)


def github_slug(heading: str) -> str:
    """The anchor GitHub (and most renderers) give a heading: lower case, punctuation
    dropped, spaces turned into hyphens; ``## 1. Bundle — `x.y` `` -> ``1-bundle--xy``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = unicodedata.normalize("NFC", text).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors_of(relative: str) -> set[str]:
    """Every anchor a Markdown file offers: its headings' slugs and explicit HTML ids."""
    text = text_of(relative) or ""
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for _number, line in lines_outside_fences(text):
        anchors.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_problem(source: str, target: str) -> str | None:
    """Why a relative link ``target`` in the Markdown file ``source`` leads nowhere."""
    if SCHEME.match(target):
        return None  # https:, mailto:: not a file of ours
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part)
    if path_part.startswith("/"):
        return f"{target!r} is an absolute path; link relative to {source}"
    if path_part:
        resolved = (ROOT / source).parent / path_part
        try:
            relative = resolved.resolve().relative_to(ROOT.resolve()).as_posix()
        except ValueError:
            return f"{target!r} points outside the repository"
        files = repository_files()
        is_dir = any(name.startswith(relative.rstrip("/") + "/") for name in files)
        if relative not in files and not is_dir:
            return f"{target!r}: {relative} is not a file of the repository"
    else:
        relative = source
    if anchor and relative.endswith(".md") and anchor not in anchors_of(relative):
        return f"{target!r}: {relative} has no section with the anchor #{anchor}"
    return None


def test_nothing_refers_to_documents_or_paths_outside_the_repository() -> None:
    problems = []
    for name, number, line in repository_text_lines():
        for pattern, what, allowed in OUTSIDE_REFERENCES:
            found = pattern.search(line)
            if found and name not in allowed:
                problems.append(
                    f"{name}:{number}: {found.group(0)!r} is {what}; point to "
                    f"{ARCHITECTURE} (a section: {ARCHITECTURE}#<anchor>) or another "
                    "file in the repository instead"
                )
    assert not problems, "\n".join(problems)


def test_every_relative_markdown_link_resolves() -> None:
    checked = 0
    problems = []
    for name in markdown_files():
        text = text_of(name) or ""
        for number, line in prose_lines(text):
            targets = LINK.findall(line) + REFERENCE_DEFINITION.findall(line)
            for target in targets:
                checked += 1
                problem = link_problem(name, target)
                if problem:
                    problems.append(f"{name}:{number}: {problem}")
    assert not problems, "\n".join(problems)
    assert checked > 10, "found almost no links: is the link pattern still right?"


def test_every_named_section_of_our_docs_exists() -> None:
    """``docs/architecture.md#layout`` in a docstring must lead to that section."""
    problems = []
    for name, number, line in repository_text_lines():
        for document, anchor in DOC_SECTION.findall(line):
            if document not in repository_files():
                problems.append(f"{name}:{number}: {document} is not in the repository")
            elif anchor not in anchors_of(document):
                problems.append(
                    f"{name}:{number}: {document} has no section #{anchor} "
                    f"(it has: {', '.join(sorted(anchors_of(document)))})"
                )
    assert not problems, "\n".join(problems)


def test_readme_links_the_architecture_overview() -> None:
    readme = text_of("README.md") or ""
    targets = [t for _, line in prose_lines(readme) for t in LINK.findall(line)]
    assert any(t.split("#")[0] == ARCHITECTURE for t in targets), (
        f"README.md should link {ARCHITECTURE}, the page a contributor reads first"
    )


def test_architecture_names_only_files_and_modules_that_exist() -> None:
    """The overview describes the code as it is: every repository path it names as
    inline code, and every ``fieldscope.<package>.<module>``, must exist."""
    assert (ROOT / ARCHITECTURE).is_file(), f"{ARCHITECTURE} is missing"
    text = text_of(ARCHITECTURE) or ""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for _, span in INLINE_CODE.findall(line):
            if REPO_PATH.match(span) and not (ROOT / span.rstrip("/")).exists():
                problems.append(f"{ARCHITECTURE}:{number}: names {span}, which does not exist")
        for package, module in MODULE.findall(line):
            if (
                not (ROOT / package / f"{module}.py").is_file()
                and not (ROOT / package / module / "__init__.py").is_file()
            ):
                problems.append(
                    f"{ARCHITECTURE}:{number}: names fieldscope.{package}.{module}, "
                    f"but there is no {package}/{module}.py"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("The four contracts", "the-four-contracts"),
        (
            "1. Preprocessing — `fieldscope.edge.preprocess`",
            "1-preprocessing--fieldscopeedgepreprocess",
        ),
        ("Engines, not home-made ones", "engines-not-home-made-ones"),
        (
            "`…/heartbeat` (QoS 0, every few tens of seconds)",
            "heartbeat-qos-0-every-few-tens-of-seconds",
        ),
        ("Run a station — `fieldscope edge run` (Pi)", "run-a-station--fieldscope-edge-run-pi"),
        ("snake_case [link](x.md)", "snake_case-link"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_link_checker_catches_what_it_must(tmp_path: Path) -> None:
    """The checks above pass on a clean tree; make sure they would fail on a broken one."""
    assert link_problem("README.md", "docs/architecture.md#the-dependency-rule") is None
    assert link_problem("docs/mqtt.md", "identification.schema.json") is None
    assert link_problem("docs/architecture.md", "../README.md#the-demo") is None
    assert link_problem("README.md", "https://example.org/x") is None
    assert "not a file" in (link_problem("README.md", "docs/nothing-here.md") or "")
    assert "outside" in (link_problem("README.md", "../elsewhere/" + "DESIGN" + ".md") or "")
    assert "absolute" in (link_problem("README.md", "/etc/passwd") or "")
    assert "no section" in (link_problem("README.md", "#no-such-section") or "")
    assert "no section" in (link_problem("README.md", "docs/mqtt.md#nope") or "")
    fenced = "```\n[x](missing.md)\n```\nsee `[y](missing.md)` and [z](real.md)\n"
    assert [LINK.findall(line) for _, line in prose_lines(fenced)] == [["real.md"]]
