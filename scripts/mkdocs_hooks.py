"""MkDocs hooks: files outside docs/ that the site shows, and the links that reach them.

The pages are written for GitHub, where a page in docs/ links to `../CHANGELOG.md` or
`../benchmarks/results/benchmark/`. The site has no such paths, so:

- `on_files` adds CHANGELOG.md as `changelog.md`, and every file under benchmarks/results/ as
  `results/...` (Markdown as pages; .json, .jsonl and .log as static files);
- `on_page_markdown` rewrites each relative link to the site's path for the same file (a folder
  link `X/` to `X/README.md`) before MkDocs checks it. A link to a repository file the site does
  not hold (`../src/...`) is left alone, so the strict build fails on it: write those as code.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = "benchmarks/results"  # in the repository
SITE_RESULTS = "results"  # in the site
CHANGELOG = "CHANGELOG.md"
SITE_CHANGELOG = "changelog.md"
DOCS = "docs"
PAGES = {".md"}
STATIC = {".json", ".jsonl", ".log"}

# an inline link or image target: ](target) or ](target "title"); <target> too
INLINE = re.compile(r'(\]\(\s*<?)([^()\s<>]+)(>?(?:\s+"[^"]*")?\s*\))')
# a reference definition: [label]: target
REFERENCE = re.compile(r"^(\s{0,3}\[[^\]]+\]:\s*<?)(\S+?)(>?(?:\s.*)?)$")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _repo_path(src_uri: str) -> str:
    """The repository path of a site file."""
    if src_uri == SITE_CHANGELOG:
        return CHANGELOG
    if src_uri.startswith(SITE_RESULTS + "/"):
        return RESULTS + src_uri[len(SITE_RESULTS) :]
    return f"{DOCS}/{src_uri}"


def _site_uri(repo_path: str) -> str | None:
    """The site path of a repository file, or None where the site does not hold it."""
    if repo_path == CHANGELOG:
        return SITE_CHANGELOG
    if repo_path.startswith(RESULTS + "/"):
        return SITE_RESULTS + repo_path[len(RESULTS) :]
    if repo_path.startswith(DOCS + "/"):
        return repo_path[len(DOCS) + 1 :]
    return None


def on_files(files: Files, config) -> Files:
    root = _root(config)
    changelog = root / CHANGELOG
    if changelog.is_file():
        files.append(File.generated(config, SITE_CHANGELOG, abs_src_path=str(changelog)))
    results = root / RESULTS
    for path in sorted(results.rglob("*")):
        if path.is_file() and path.suffix in PAGES | STATIC:
            src_uri = f"{SITE_RESULTS}/{path.relative_to(results).as_posix()}"
            files.append(File.generated(config, src_uri, abs_src_path=str(path)))
    return files


def _rewrite(target: str, page_repo: str, page_uri: str, root: Path) -> str:
    """The link `target` written on the page at `page_repo`, as the site needs it."""
    if SCHEME.match(target) or target.startswith(("#", "/")):
        return target
    path, hash_, anchor = target.partition("#")
    if not path:
        return target
    repo = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo), path))
    if repo.startswith(".."):
        return target
    if path.endswith("/") or (root / repo).is_dir():
        if not (root / repo / "README.md").is_file():
            return target
        repo = f"{repo}/README.md"
    site = _site_uri(repo)
    if site is None:
        return target  # not in the site: MkDocs reports it
    new = posixpath.relpath(site, posixpath.dirname(page_uri) or ".")
    return new + hash_ + anchor


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = _root(config)
    page_uri = page.file.src_uri
    page_repo = _repo_path(page_uri)

    def inline(m: re.Match) -> str:
        return m.group(1) + _rewrite(m.group(2), page_repo, page_uri, root) + m.group(3)

    def text(segment: str) -> str:
        return INLINE.sub(inline, segment)

    out, fenced = [], None
    for line in markdown.split("\n"):
        fence = FENCE.match(line)
        if fenced:
            if fence and fence.group(1) == fenced:
                fenced = None
            out.append(line)
            continue
        if fence:
            fenced = fence.group(1)
            out.append(line)
            continue
        ref = REFERENCE.match(line)
        if ref:
            line = ref.group(1) + _rewrite(ref.group(2), page_repo, page_uri, root) + ref.group(3)
        else:  # links outside code spans
            pieces, last = [], 0
            for span in CODE_SPAN.finditer(line):
                pieces += [text(line[last : span.start()]), span.group(0)]
                last = span.end()
            line = "".join(pieces) + text(line[last:])
        out.append(line)
    return "\n".join(out)
