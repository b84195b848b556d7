"""The docs stay true to the code and to themselves: the tables generated from the code appear
verbatim in their pages, every relative link in README.md and docs/ resolves (file and heading
anchor), mkdocs.yml lists every page, and the site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from droidpool import errors
from droidpool.api import anthropic, openai_wire
from droidpool.config import Config, field_docs

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"
README_MAX_LINES = 250  # the README is the pitch, the quick start and one example per dialect


def _type_name(hint: typing.Any) -> str:
    if hint is bool:
        return "boolean"
    if hint is int:
        return "integer"
    if hint is float:
        return "number"
    if hint is str:
        return "string"
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        return {str: "list of strings", float: "list of numbers"}.get(item, "list of tables")
    args = typing.get_args(hint)
    return "table of numbers" if len(args) == 2 and args[1] is float else "table of strings"


def _default(value: typing.Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[]`" if not value else f"`{list(value)}`"
    if isinstance(value, int | float):
        return f"`{value}`"
    return "`{}`"


def config_table() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    defaults = Config()
    for section in dataclasses.fields(Config):
        value = getattr(defaults, section.name)
        hints = typing.get_type_hints(type(value))
        docs = field_docs(type(value))
        for f in dataclasses.fields(value):
            rows.append(f"| `{section.name}.{f.name}` | {_type_name(hints[f.name])} | "
                        f"{_default(getattr(value, f.name))} | {docs[f.name]} |")
    return "\n".join(rows)


def error_table() -> str:
    """Each neutral kind of error in both envelopes, from the dialects' own mapping tables."""
    rows = ["| kind | example `code` | OpenAI status, `type` | Anthropic status, `type` |", "|---|---|---|---|"]
    seen: set[str] = set()
    for cls in _error_classes():
        if cls.kind in seen:
            continue
        seen.add(cls.kind)
        error = cls("x")
        status, body = anthropic.error_body(error)
        rows.append(f"| {cls.kind} | `{error.error_code or 'null'}` | {error.status} `{openai_wire.TYPES[cls.kind]}` | "
                    f"{status} `{body['error']['type']}` |")
    return "\n".join(rows)


def _error_classes() -> list[type[errors.DroidpoolError]]:
    out: list[type[errors.DroidpoolError]] = []
    pending = [errors.DroidpoolError]
    while pending:
        cls = pending.pop(0)
        out.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(out[1:], key=lambda c: (c.status, c.__name__))


def thinking_table() -> str:
    rows = ["| `thinking` | droid effort |", "|---|---|", "| `{type: disabled}` or absent | none asked for |",
            "| `{type: adaptive}` | `dynamic` |"]
    low = 1024
    for bound, effort in anthropic.THINKING_EFFORTS:
        rows.append(f"| `{{type: enabled}}`, `budget_tokens` {low} to {bound} | `{effort}` |")
        low = bound + 1
    rows.append(f"| `{{type: enabled}}`, `budget_tokens` above {low - 1} | `{anthropic.THINKING_ABOVE}` |")
    return "\n".join(rows)


TABLES = {"config": config_table, "errors": error_table, "thinking": thinking_table}


def test_config_table_matches_the_code() -> None:
    assert config_table() in (DOCS / "configuration.md").read_text(), \
        "regenerate into docs/configuration.md: python -m tests.unit.test_docs config"


def test_error_and_thinking_tables_match_the_dialects() -> None:
    assert error_table() in (DOCS / "api.md").read_text(), \
        "regenerate into docs/api.md: python -m tests.unit.test_docs errors"
    assert thinking_table() in (DOCS / "dialects.md").read_text(), \
        "regenerate into docs/dialects.md: python -m tests.unit.test_docs thinking"


def test_readme_stays_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: reference belongs in docs/"


# --- links -------------------------------------------------------------------------------------

FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?\1", re.DOTALL)  # not across paragraphs
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where nothing is a link or a heading."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text, lower-cased, without punctuation
    (letters, digits, ``_``, ``-`` and spaces stay), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, GitHub's way (a repeated one gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text())):
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``path`` whose file does not exist, or whose ``#anchor`` is no heading
    of that file (named relative to ``root``)."""
    broken = []
    for target in LINK.findall(_prose(path.read_text())):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where} (no heading with that anchor in {dest.relative_to(root)})")
    return broken


def test_github_slugs() -> None:
    assert github_slug("New conversations: minted sessions") == "new-conversations-minted-sessions"
    assert github_slug("A request's path") == "a-requests-path"
    assert github_slug("The `thinking` field, [linked](x.md)") == "the-thinking-field-linked"
    assert github_slug("pool_events and ToolSearch") == "pool_events-and-toolsearch"


def test_every_relative_link_resolves() -> None:
    assert markdown_files()[1:], "no docs/*.md found"
    broken = [b for path in markdown_files() for b in broken_links(path)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_finds_broken_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page.write_text("# Page\n\n[ok](other.md#a-section) [self](#page) `[code](nowhere.md)`\n"
                    "[gone](missing.md) [bad anchor](other.md#no-section) ![img](missing.png)\n"
                    "```\n[in a block](nowhere.md)\n```\n[web](https://example.com/x.md)\n")
    found = broken_links(page, root=tmp_path)
    assert [f.split(" (")[0] for f in found] == ["page.md: missing.md", "page.md: other.md#no-section",
                                                 "page.md: missing.png"]


# --- the site ----------------------------------------------------------------------------------


def test_mkdocs_nav_lists_every_page() -> None:
    listed = set(re.findall(r"([\w-]+\.md)\b", MKDOCS_YML.read_text()))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - pages == set(), "mkdocs.yml names pages that do not exist"


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    packages = {"mkdocs": "mkdocs", "material": "mkdocs-material"}  # module: distribution
    missing = " and ".join(dist for module, dist in packages.items()
                           if importlib.util.find_spec(module) is None)
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is required in CI; tests/run.sh installs the test extra")
        pytest.skip(f"{missing} not installed (pip install -e '.[test]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(MKDOCS_YML),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").exists()


if __name__ == "__main__":
    import sys

    print(TABLES[sys.argv[1] if len(sys.argv) > 1 else "config"]())
