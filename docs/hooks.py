"""MkDocs hook (mkdocs.yml `hooks:`): links from a docs page to a repository file outside docs/.

A page links to `../benchmarks/results/demo.json` so that the link also works when the Markdown is read in the
repository. MkDocs only knows the files under docs/ and would report such a link as broken, so this hook copies
each linked repository file into the site under `_repo/<its path>` (a Markdown file as `.txt`, so that it is not
made a page) and points the link there: the built site holds the JSON files and curve pictures the pages cite. A link to a repository file that does not exist stops the
build, naming the page and the link. Local only: nothing is fetched.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

PREFIX = "_repo"
# [text](target) and ![alt](target), with an optional "title"; the target has no spaces.
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s#]+)((?:#[^)\s]*)?(?:\s+\"[^\"]*\")?\))")


def _site_path(rel: str) -> str:
    """Where the copy of a repository file lies in the site: a Markdown file as text (MkDocs would make it a page)."""
    return f"{PREFIX}/{rel}" + (".txt" if rel.endswith(".md") else "")


def _outside_target(page_uri: str, target: str) -> str | None:
    """The repository-relative path a page's link points to when it leaves docs/; None for other links."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
        return None  # external (http:, mailto:) or absolute
    joined = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_uri), target))
    if joined.startswith("docs/") or joined.startswith("../") or joined == "..":
        return None
    return joined


def _links(docs_dir: Path) -> dict[str, list[str]]:
    """{repository path: [page uri, ...]} for every link of a page under docs_dir that leaves it."""
    found: dict[str, list[str]] = {}
    for md in sorted(docs_dir.rglob("*.md")):
        uri = md.relative_to(docs_dir).as_posix()
        for m in LINK.finditer(md.read_text()):
            rel = _outside_target(uri, m.group(2))
            if rel is not None:
                found.setdefault(rel, []).append(uri)
    return found


def on_files(files: Files, config: Any) -> Files:
    docs_dir = Path(config["docs_dir"])
    repo = docs_dir.parent
    for rel, pages in _links(docs_dir).items():
        path = repo / rel
        if not path.is_file():
            raise PluginError(f"{pages[0]} links to {rel}, which is not a file of the repository; fix the link "
                              f"(it is taken from the page's folder, docs/{posixpath.dirname(pages[0])})")
        files.append(File.generated(config, _site_path(rel), abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    uri = page.file.src_uri

    def rewrite(m: re.Match) -> str:
        rel = _outside_target(uri, m.group(2))
        if rel is None:
            return m.group(0)
        target = posixpath.relpath(_site_path(rel), posixpath.dirname(uri) or ".")
        return f"{m.group(1)}{target}{m.group(3)}"

    return LINK.sub(rewrite, markdown)
