"""No dead links: every relative link in the README and docs/, and every pointer to a docs page
in the files the project ships (unit files, the plist, the ACL, scripts, code), must lead
somewhere. A `#anchor` must name a heading of its page, and a pointer written as
`docs/agents.md, "SHUTDOWN_CMD"` must name a heading or a bold lead-in there.

The unit file, the plist and the ACL once pointed to docs/agents.md before it existed, and the
README to "the agents' README", which never did.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Where shipped files live; tests/ and mutations/ quote old pointers on purpose.
SHIPPED = ["agents", "compose", "deploy", "collector", "policy", "servicekit", "migrations",
           "scripts", "grafana", "demo", "bench", "testbed", "Makefile", "pyproject.toml",
           "compose.yaml", "alembic.ini"]
SKIP_SUFFIXES = {".pyc", ".png", ".jpg", ".bin", ".dump", ".so"}

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
DOCS_POINTER = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?(?:, \"([^\"]+)\")?")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", FENCE.sub("", page.read_text()), re.M):
        base = slug(heading)
        name, n = base, 0
        while name in found:
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def named_places(page: Path) -> set[str]:
    """Headings and bold lead-ins, as written: what a `"Section"` pointer may name."""
    text = FENCE.sub("", page.read_text())
    places = {h.strip().strip("`") for h in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M)}
    places |= {b.strip().rstrip(".:").strip("`") for b in re.findall(r"\*\*([^*]+)\*\*", text)}
    return places


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def shipped_files() -> list[Path]:
    files = []
    for name in SHIPPED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file()
                      and p.suffix not in SKIP_SUFFIXES and "__pycache__" not in p.parts]
    return files


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    dead = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            dead.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            dead.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not dead, f"{page.relative_to(ROOT)}: " + "; ".join(dead)


def test_every_docs_page_is_on_the_readme_map():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme]
    assert not missing, f"pages the README's map does not list: {missing}"


def test_shipped_files_point_only_at_docs_that_exist():
    dead = []
    for file in shipped_files():
        try:
            text = file.read_text()
        except UnicodeDecodeError:
            continue
        for name, anchor, place in DOCS_POINTER.findall(text):
            page = ROOT / "docs" / name
            where = f"{file.relative_to(ROOT)} -> docs/{name}"
            if not page.exists():
                dead.append(f"{where}: no such page")
            elif anchor and anchor not in anchors(page):
                dead.append(f"{where}#{anchor}: no such heading")
            elif place and not any(p.startswith(place) for p in named_places(page)):
                dead.append(f'{where}, "{place}": no such heading or bold lead-in')
        for place in re.findall(r"README(?:\.md)?, \"([^\"]+)\"", text):
            if not any(p.startswith(place) for p in named_places(ROOT / "README.md")):
                dead.append(f'{file.relative_to(ROOT)} -> README, "{place}": not in the README')
    assert not dead, "\n".join(dead)


def test_docs_pages_send_no_one_to_the_readme_for_what_moved_out_of_it():
    """The README is the quick start and the map now: a page that says "see the README's
    settings" or names a README section sends the reader to text that moved to docs/."""
    readme = named_places(ROOT / "README.md")
    for page in PAGES[1:]:
        text = FENCE.sub("", page.read_text())
        assert not re.search(r"README's settings|as in the README\b", text), page.name
        for place in re.findall(r"README \(\"([^\"]+)\"\)", text):
            assert place in readme, f'{page.name}: README ("{place}") is not a README section'


def test_nothing_points_at_the_agents_readme_that_never_existed():
    for file in [*PAGES, *shipped_files()]:
        try:
            text = file.read_text()
        except UnicodeDecodeError:
            continue
        assert "agents' README" not in text and "agents/README" not in text, file
