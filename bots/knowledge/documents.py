"""Read an operator's documents and split them into passages for the retrieval index.

`find_documents` lists the supported files under the paths an operator gives,
`read_document` turns one into sections (a title path, an anchor and the text), and
`split` cuts each section into passages that fit the embedding model, at paragraph, then
sentence, line and word boundaries, with a little overlap between neighbours.
"""

from __future__ import annotations

import codecs
import itertools
import math
import re
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bs4 import BeautifulSoup
from bs4.element import NavigableString, PageElement, PreformattedString, Tag
from markdown_it import MarkdownIt
from markdown_it.token import Token
from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, PyPdfError

SUFFIXES = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".txt": "text",
    ".text": "text",
    ".pdf": "pdf",
}
MAX_DOCUMENT_BYTES = 20 * 1024 * 1024

_MB = 1024 * 1024
_KB = 1024
# A NUL this early means a binary file; text never holds one.
_BINARY_PROBE_BYTES = 8 * 1024
_BLANK_RUNS = re.compile(r"\n{3,}")
_SPACE_RUNS = re.compile(r"\s+")
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n(?:---|\.\.\.)(?:\n|\Z)", re.DOTALL)
_FRONT_MATTER_KEY = re.compile(r"^[\w-]+\s*:", re.MULTILINE)
_FRONT_MATTER_TITLE = re.compile(r"^title\s*:\s*(.*?)\s*$", re.MULTILINE)
_SLUG_DROP = re.compile(r"[^\w\- ]")

_REMOVED_TAGS = ["script", "style", "nav", "header", "footer", "noscript", "template", "svg"]
# An article's own header holds its title; only the page's banner and footer are noise.
_KEPT_INSIDE = ["article", "main"]
_SECTION_LEVELS = {"h1": 1, "h2": 2, "h3": 3}
_PARAGRAPH_TAGS = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "details",
        "dl",
        "div",
        "fieldset",
        "figcaption",
        "figure",
        "form",
        "h4",
        "h5",
        "h6",
        "hr",
        "main",
        "ol",
        "p",
        "pre",
        "section",
        "summary",
        "table",
        "ul",
    }
)
_LINE_TAGS = frozenset({"br", "caption", "dd", "dt", "li", "option", "tr"})
_CELL_TAGS = frozenset({"td", "th"})

# pypdf reports a damaged file through its own errors and through whichever built-in
# exception the broken structure happens to trigger.
_PDF_ERRORS = (
    PyPdfError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    OSError,
    RecursionError,
    zlib.error,
)

TokenCounter = Callable[[Sequence[str]], Awaitable[list[int]]]
"""Count the embedding model's tokens of each text (special tokens excluded)."""

_TITLE_SEPARATOR = " > "
# The smallest budget that leaves room for a title path and some text.
_MIN_TOKENS = 16
# Boundaries from the coarsest to the finest; each pattern's group is the separator.
_PARAGRAPHS = re.compile(r"(\n{2,})")
_SENTENCE_END = r"[.!?\u2026\u3002\uff01\uff1f]"
_CLOSING = r"\"'\u201d\u2019)\]\u300d\u300f"
_SENTENCES = re.compile(
    rf"((?:(?<={_SENTENCE_END})|(?<={_SENTENCE_END}[{_CLOSING}]))\s+"
    # Chinese and Japanese sentences often follow each other without a space.
    rf"|(?<=[\u3002\uff01\uff1f])(?=[^\s{_CLOSING}]))"
)
_LINES = re.compile(r"(\n)")
_WORDS = re.compile(r"(\s+)")
_BOUNDARIES = (_PARAGRAPHS, _SENTENCES, _LINES, _WORDS)
_PARAGRAPH_DEPTH = 1
_SENTENCE_DEPTH = 2
# A counter that keeps disagreeing with its own sums gets this many re-splits.
_MAX_ROUNDS = 12


class DocumentError(Exception):
    """A document cannot be read; the message names the file and says why."""


@dataclass(frozen=True, slots=True)
class Section:
    """A run of a document's text under one heading (or one PDF page).

    Args:
        titles: the document's title, then its headings down to this section.
        anchor: where the section starts: a heading's id or slug, "page=3" for a PDF page,
            None for the top of the document.
        text: the section's text (Markdown source for Markdown, plain text otherwise).
    """

    titles: tuple[str, ...]
    anchor: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Document:
    """A document read into sections.

    Args:
        doc_id: its POSIX path under the folder it was found in, or its name if given alone.
    """

    doc_id: str
    path: Path
    title: str
    sections: tuple[Section, ...]


@dataclass(frozen=True, slots=True)
class Draft:
    """A passage before embedding."""

    titles: tuple[str, ...]
    anchor: str | None
    text: str

    @property
    def embedded_text(self) -> str:
        """Return the text that is embedded and counted: the title path, then the text."""
        return _TITLE_SEPARATOR.join(self.titles) + "\n" + self.text


def find_documents(paths: Sequence[Path]) -> list[tuple[str, Path]]:
    """List (doc_id, path) of each supported file under `paths`, folders recursively, once.

    Args:
        paths: files and folders. A file named here must have a supported suffix; in a
            folder, hidden entries and unsupported files are skipped.

    Raises:
        DocumentError: a path does not exist, a named file is not supported, or two
            different files would have the same doc_id.
    """
    found: dict[str, Path] = {}
    seen: set[Path] = set()
    for given in paths:
        for doc_id, path in _candidates(given):
            resolved = path.resolve()
            if resolved in seen:
                continue
            if doc_id in found:
                raise DocumentError(
                    f"{found[doc_id]} and {path} would both be {doc_id!r}; rename one, "
                    "or give the folder that holds both"
                )
            seen.add(resolved)
            found[doc_id] = path
    return list(found.items())


def _candidates(given: Path) -> list[tuple[str, Path]]:
    """List (doc_id, path) for one path an operator gave."""
    if given.is_dir():
        return [(path.relative_to(given).as_posix(), path) for path in _walk(given, set())]
    if given.is_file():
        if given.suffix.lower() not in SUFFIXES:
            raise DocumentError(
                f"{given} is not a supported document; supported: {', '.join(SUFFIXES)}"
            )
        return [(given.name, given)]
    if given.exists():
        raise DocumentError(f"{given} is not a file or a folder")
    raise DocumentError(f"{given} does not exist")


def _walk(folder: Path, visited: set[Path]) -> Iterator[Path]:
    """Yield the supported files under `folder` in sorted order, skipping hidden entries."""
    # A symbolic link back up the tree would otherwise be walked forever.
    visited.add(folder.resolve())
    try:
        entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
    except OSError as error:
        raise DocumentError(f"{folder} cannot be listed ({error.strerror})") from error
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.resolve() not in visited:
                yield from _walk(entry, visited)
        elif entry.is_file() and entry.suffix.lower() in SUFFIXES:
            yield entry


def read_document(doc_id: str, path: Path, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> Document:
    """Read one file into its sections, by its suffix.

    Args:
        doc_id: the name the document is known by (see `find_documents`).
        path: the file; its suffix says its format (`SUFFIXES`).
        max_bytes: larger files are refused before they are read.

    Raises:
        DocumentError: the file is too large, not of a supported format, damaged, or has
            no text; the message starts with the path.
    """
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DocumentError(f"{path} is not a supported document; supported: {', '.join(SUFFIXES)}")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise DocumentError(f"{path} cannot be read ({error.strerror})") from error
    if size > max_bytes:
        raise DocumentError(
            f"{path} is {_size(size)}; the limit is {_size(max_bytes)}; split it into smaller files"
        )
    if kind == "pdf":
        title, sections = _read_pdf(path)
    else:
        text = _decode(path, _read_bytes(path))
        if kind == "markdown":
            title, sections = _read_markdown(path, text)
        elif kind == "html":
            title, sections = _read_html(path, text)
        else:
            title, sections = _read_text(path, text)
    if not sections:
        raise DocumentError(f"{path} has no text")
    return Document(doc_id=doc_id, path=path, title=title, sections=sections)


def _size(count: int) -> str:
    """Write a byte count for people."""
    if count >= _MB:
        return f"{count / _MB:.1f} MB"
    if count >= _KB:
        return f"{count / _KB:.1f} KB"
    return f"{count} bytes"


def _read_bytes(path: Path) -> bytes:
    """Read a file whole, naming it in the error if that fails."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise DocumentError(f"{path} cannot be read ({error.strerror})") from error


def _decode(path: Path, data: bytes) -> str:
    """Decode a text file as UTF-8, refusing binary files and other encodings clearly."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            data.decode("utf-16")
        except UnicodeDecodeError:
            pass
        else:
            raise DocumentError(f"{path} is UTF-16 text; save it as UTF-8")
    if b"\x00" in data[:_BINARY_PROBE_BYTES]:
        raise DocumentError(f"{path} looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        # The decoder counts from after the byte order mark; the operator counts from 0.
        offset = error.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        raise DocumentError(
            f"{path} is not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}); "
            "save it as UTF-8"
        ) from None


def _normalize(text: str) -> str:
    """Use "\\n" line ends, drop trailing spaces, keep at most one blank line, and strip."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def _collapse(text: str) -> str:
    """Make `text` one line with single spaces."""
    return " ".join(text.split())


class _Slugger:
    """Make GitHub's heading anchors: lowercase, punctuation dropped, -1, -2 for repeats."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def slug(self, heading: str) -> str:
        base = _SLUG_DROP.sub("", heading.strip().lower()).replace(" ", "-")
        slug = base
        while slug in self._seen:
            self._seen[base] += 1
            slug = f"{base}-{self._seen[base]}"
        self._seen[slug] = 0
        return slug


@dataclass(frozen=True, slots=True)
class _Part:
    """A heading and the text up to the next one; level 0 is the text before any heading."""

    level: int
    heading: str
    anchor: str | None
    text: str


def _sections(title: str, parts: Sequence[_Part]) -> tuple[Section, ...]:
    """Give each part its title path and drop the empty ones."""
    sections: list[Section] = []
    open_headings: list[tuple[int, str]] = []
    for index, part in enumerate(parts):
        if part.level:
            while open_headings and open_headings[-1][0] >= part.level:
                open_headings.pop()
            # The heading that names the document is its title, not a level below it.
            names_document = index == 1 and part.level == 1 and part.heading == title
            if not names_document:
                open_headings.append((part.level, part.heading))
        text = _normalize(part.text)
        if text:
            titles = (title, *(heading for _, heading in open_headings if heading))
            sections.append(Section(titles=titles, anchor=part.anchor, text=text))
    return tuple(sections)


def _read_text(path: Path, text: str) -> tuple[str, tuple[Section, ...]]:
    """Read plain text as one section."""
    text = _normalize(text)
    sections = (Section((path.stem,), None, text),) if text else ()
    return path.stem, sections


def _read_markdown(path: Path, source: str) -> tuple[str, tuple[Section, ...]]:
    """Cut Markdown source into sections at its headings (not those in code blocks)."""
    source = _normalize(source)
    front_title, source = _front_matter(source)
    lines = source.split("\n")
    tokens = MarkdownIt("commonmark").parse(source)
    slugger = _Slugger()
    # (level, text, first line, first line after it) of each top-level heading.
    headings: list[tuple[int, str, int, int]] = []
    for index, token in enumerate(tokens):
        # A heading inside a list or a quote is part of that block, not a section.
        if token.type == "heading_open" and token.level == 0 and token.map:
            text = _inline_text(tokens[index + 1])
            headings.append((int(token.tag[1:]), text, token.map[0], token.map[1]))
    lead_end = headings[0][2] if headings else len(lines)
    parts = [_Part(0, "", None, "\n".join(lines[:lead_end]))]
    for index, (level, text, _, body_start) in enumerate(headings):
        body_end = headings[index + 1][2] if index + 1 < len(headings) else len(lines)
        body = "\n".join(lines[body_start:body_end])
        parts.append(_Part(level, text, slugger.slug(text) or None, body))
    title = front_title or path.stem
    starts_with_h1 = bool(headings) and headings[0][0] == 1 and not parts[0].text.strip()
    if not front_title and starts_with_h1 and parts[1].heading:
        title = parts[1].heading
    return title, _sections(title, parts)


def _front_matter(source: str) -> tuple[str | None, str]:
    """Split off a YAML front matter block; return its title, if any, and the rest."""
    match = _FRONT_MATTER.match(source)
    if match is None or not _FRONT_MATTER_KEY.search(match.group(1)):
        return None, source
    title_match = _FRONT_MATTER_TITLE.search(match.group(1))
    title = title_match.group(1).strip("\"'").strip() if title_match else ""
    return title or None, source[match.end() :]


def _inline_text(token: Token) -> str:
    """Return the text a heading shows, without its Markdown markup."""
    pieces: list[str] = []
    for child in token.children or []:
        if child.type in ("text", "text_special", "code_inline", "image"):
            pieces.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            pieces.append(" ")
    return _collapse("".join(pieces))


def _read_html(path: Path, source: str) -> tuple[str, tuple[Section, ...]]:
    """Cut an HTML page's visible text into sections at its h1, h2 and h3 headings."""
    soup = BeautifulSoup(source, "html.parser")
    for tag in soup.find_all(_REMOVED_TAGS):
        if tag.decomposed:
            continue
        if tag.name in ("header", "footer") and tag.find_parent(_KEPT_INSIDE):
            continue
        tag.decompose()
    title = _collapse(soup.title.get_text()) if soup.title else ""
    for tag in soup.find_all("title"):
        tag.decompose()
    if not title:
        first_h1 = soup.find("h1")
        title = _collapse(first_h1.get_text()) if first_h1 else ""
    title = title or path.stem
    return title, _sections(title, _html_parts(soup.body or soup))


def _html_parts(root: Tag) -> list[_Part]:
    """Walk the page in reading order, collecting the text between its section headings."""
    slugger = _Slugger()
    parts: list[_Part] = []
    level, heading, anchor = 0, "", None
    text = _HtmlText()
    # An explicit stack: unclosed tags nest as deep as the page is long.
    stack: list[tuple[PageElement, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        if isinstance(node, Tag):
            name = node.name
            if closing:
                text.close(name)
            elif name in _SECTION_LEVELS:
                parts.append(_Part(level, heading, anchor, text.take()))
                level, heading = _SECTION_LEVELS[name], _collapse(node.get_text())
                anchor = _heading_id(node) or slugger.slug(heading) or None
            else:
                text.open(name)
                stack.append((node, True))
                stack.extend((child, False) for child in reversed(node.contents))
        elif isinstance(node, NavigableString) and not isinstance(node, PreformattedString):
            text.add(str(node))
    parts.append(_Part(level, heading, anchor, text.take()))
    return parts


def _heading_id(heading: Tag) -> str | None:
    """Return a heading's own id, else that of an `<a name>` or `<a id>` inside it."""
    if own := _attribute(heading, "id"):
        return own
    for link in heading.find_all("a"):
        if found := _attribute(link, "name") or _attribute(link, "id"):
            return found
    return None


def _attribute(tag: Tag, name: str) -> str | None:
    """Return a single-valued attribute, stripped, or None when absent or empty."""
    value = tag.get(name)
    return (value.strip() or None) if isinstance(value, str) else None


class _HtmlText:
    """Visible text as a browser lays it out: blocks on their own lines, spaces collapsed."""

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._pending_newlines = 0
        self._pre_depth = 0

    def open(self, name: str) -> None:
        if name == "pre":
            self._pre_depth += 1
        if name in _CELL_TAGS:
            self.add(" ")
        self._break(name)

    def close(self, name: str) -> None:
        if name == "pre":
            self._pre_depth -= 1
        self._break(name)

    def add(self, text: str) -> None:
        if not self._pre_depth:
            text = _SPACE_RUNS.sub(" ", text)
            at_line_start = not self._pieces or self._pending_newlines > 0
            if at_line_start or self._pieces[-1].endswith(" "):
                text = text.lstrip(" ")
            if not text:
                return
        if self._pending_newlines and self._pieces:
            self._pieces.append("\n" * self._pending_newlines)
        self._pending_newlines = 0
        self._pieces.append(text)

    def take(self) -> str:
        """Return the text so far and start again."""
        text = "".join(self._pieces)
        self._pieces, self._pending_newlines = [], 0
        return text

    def _break(self, name: str) -> None:
        if name in _PARAGRAPH_TAGS:
            self._pending_newlines = 2
        elif name in _LINE_TAGS:
            self._pending_newlines = max(self._pending_newlines, 1)


def _read_pdf(path: Path) -> tuple[str, tuple[Section, ...]]:
    """Read a PDF's text layer, one section per page that has text."""
    try:
        reader = PdfReader(path)
        # A PDF with only an owner password opens with the empty user password.
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise DocumentError(f"{path} is encrypted; save a copy without a password")
        metadata = reader.metadata
        title = _collapse(str(metadata.title or "")) if metadata else ""
        pages = [_normalize(page.extract_text()) for page in reader.pages]
    except DependencyError as error:
        raise DocumentError(
            f"{path} is encrypted in a way this reader cannot open ({error}); "
            "save a copy without a password"
        ) from error
    except _PDF_ERRORS as error:
        reason = str(error) or type(error).__name__
        raise DocumentError(f"{path} is not a readable PDF ({reason})") from error
    if not pages:
        raise DocumentError(f"{path} has no pages")
    title = title or path.stem
    sections = tuple(
        Section((title, f"page {number}"), f"page={number}", text)
        for number, text in enumerate(pages, start=1)
        if text
    )
    if not sections:
        raise DocumentError(f"{path} has no text layer (a scanned PDF?); run OCR on it first")
    return title, sections


async def split(
    document: Document, count: TokenCounter, *, max_tokens: int = 200, overlap_tokens: int = 32
) -> list[Draft]:
    """Split a document into passages of at most `max_tokens` tokens, following its structure.

    A section that fits is one passage; a longer one is cut at paragraph boundaries, then
    sentence ends, line breaks, spaces, and at last inside a word. Each later passage of a
    section starts with up to `overlap_tokens` of the one before. A title path too long
    for half the budget is shortened. `count` is asked in a few batches: once for the
    units, once more if a sentence is too long, and once to check the passages, again
    only if a passage turns out too long.

    Args:
        document: the document to split.
        count: the embedding model's token counter.
        max_tokens: the most tokens of a passage's `embedded_text` (title path included).
        overlap_tokens: the most tokens a passage repeats from the one before it.

    Raises:
        ValueError: the budgets are out of range, or the counter contradicts itself.
    """
    if max_tokens < _MIN_TOKENS:
        raise ValueError(f"max_tokens must be at least {_MIN_TOKENS}, not {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"overlap_tokens must be at least 0 and less than max_tokens ({max_tokens}), "
            f"not {overlap_tokens}"
        )
    splitter = _Splitter(count)
    jobs = [_Job(s.titles, s.anchor, s.text, max_tokens, overlap_tokens) for s in document.sections]
    planned = [
        (job, draft)
        for job, drafts in zip(jobs, await splitter.plan(jobs), strict=True)
        for draft in drafts
    ]
    for _ in range(_MAX_ROUNDS):
        await splitter.learn(draft.embedded_text for _, draft in planned)
        over: dict[int, _Job] = {}
        for index, (job, draft) in enumerate(planned):
            tokens = splitter.tokens(draft.embedded_text)
            if tokens > max_tokens:
                # Shrink the limit by the counter's own ratio, so that the next cut lands inside.
                limit = min(job.limit - 1, job.limit * max_tokens // tokens)
                over[index] = _Job(draft.titles, draft.anchor, draft.text, limit, 0)
        if not over:
            return [draft for _, draft in planned]
        if any(job.limit < 1 for job in over.values()):
            break
        replanned = dict(zip(over, await splitter.plan(list(over.values())), strict=True))
        rebuilt: list[tuple[_Job, Draft]] = []
        for index, pair in enumerate(planned):
            if index in over:
                rebuilt.extend((over[index], draft) for draft in replanned[index])
            else:
                rebuilt.append(pair)
        planned = rebuilt
    raise ValueError(f"the token counter keeps counting passages over max_tokens={max_tokens}")


@dataclass(frozen=True, slots=True)
class _Job:
    """A text to split under a token limit: a section, or a passage that came out too long."""

    titles: tuple[str, ...]
    anchor: str | None
    text: str
    limit: int
    overlap: int


@dataclass(frozen=True, slots=True)
class _Atom:
    """The smallest piece a passage is built from, with the whitespace that preceded it."""

    separator: str
    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class _Budget:
    """How a job's limit is shared between its title path, its text and the overlap."""

    titles: tuple[str, ...]
    body: int
    content: int


class _Splitter:
    """Cut texts into passages, asking the counter for the tokens of their units in batches."""

    def __init__(self, count: TokenCounter) -> None:
        self._count = count
        self._known: dict[str, int] = {}

    async def learn(self, texts: Iterable[str]) -> None:
        """Count, in one call, those of `texts` not counted yet."""
        missing = list(dict.fromkeys(text for text in texts if text not in self._known))
        if not missing:
            return
        counts = await self._count(missing)
        if len(counts) != len(missing):
            raise ValueError(
                f"the token counter gave {len(counts)} counts for {len(missing)} texts"
            )
        self._known.update(zip(missing, counts, strict=True))

    def tokens(self, text: str) -> int:
        return self._known[text]

    async def plan(self, jobs: Sequence[_Job]) -> list[list[Draft]]:
        """Split each job into drafts whose estimated tokens fit its limit."""
        await self.learn(
            text
            for job in jobs
            for text in (
                ">",
                *job.titles,
                # A title too long for its share of the budget is cut after a word.
                *(word for title in job.titles for _, word in _split_at(title, _WORDS)),
                *(sentence for _, sentence in _units(job.text, _SENTENCE_DEPTH)),
            )
        )
        budgets = [self._budget(job) for job in jobs]
        # Only sentences too long for a passage, in texts too long for one, are counted
        # word by word.
        await self.learn(
            word
            for job, budget in zip(jobs, budgets, strict=True)
            if self._estimate(job.text, 0) > budget.body
            for _, sentence in _units(job.text, _SENTENCE_DEPTH)
            if self._known[sentence] > budget.content
            for _, word in _units(sentence, len(_BOUNDARIES), start=_SENTENCE_DEPTH)
        )
        return [self._drafts(job, budget) for job, budget in zip(jobs, budgets, strict=True)]

    def _budget(self, job: _Job) -> _Budget:
        titles, title_tokens = self._fit_titles(job.titles, job.limit // 2)
        body = job.limit - title_tokens
        return _Budget(titles, body, body - min(job.overlap, body // 2))

    def _fit_titles(self, titles: tuple[str, ...], budget: int) -> tuple[tuple[str, ...], int]:
        """Shorten a title path to `budget` tokens: drop middle titles, then the first, then cut."""
        while titles:
            tokens = sum(self._known[t] for t in titles) + self._known[">"] * (len(titles) - 1)
            if tokens <= budget:
                return titles, tokens
            if len(titles) > 2:
                titles = (titles[0], *titles[2:])
            elif len(titles) == 2:
                titles = titles[1:]
            else:
                return self._cut_title(titles[0], budget)
        return (), 0

    def _cut_title(self, title: str, budget: int) -> tuple[tuple[str, ...], int]:
        """Keep the first words of a title that fit `budget`, or else a piece of its first word."""
        words = [
            _Atom(separator, word, self._known[word])
            for separator, word in _split_at(title, _WORDS)
        ]
        kept: list[_Atom] = []
        used = 0
        for word in words:
            if used + word.tokens > budget:
                break
            kept.append(word)
            used += word.tokens
        if kept:
            return (_joined(kept),), used
        first = words[0]
        piece = first.text[: len(first.text) * budget // first.tokens]
        if not piece:
            return (), 0
        return (piece,), math.ceil(first.tokens * len(piece) / len(first.text))

    def _drafts(self, job: _Job, budget: _Budget) -> list[Draft]:
        if self._estimate(job.text, 0) <= budget.body:
            return [Draft(budget.titles, job.anchor, job.text)]
        chunks = self._pack(job.text, 0, budget.content, "")
        if job.overlap:
            chunks = _overlapped(chunks, job.overlap, budget.body)
        return [Draft(budget.titles, job.anchor, text) for text in map(_joined, chunks) if text]

    def _estimate(self, text: str, depth: int) -> int:
        """Sum the counts of a text's units (WordPiece counts add up across whitespace)."""
        if text in self._known or depth == len(_BOUNDARIES):
            return self._known[text]
        return sum(self._estimate(unit, depth + 1) for _, unit in _units(text, depth + 1, depth))

    def _pack(self, text: str, depth: int, budget: int, separator: str) -> list[list[_Atom]]:
        """Cut `text` into runs of atoms of at most `budget` tokens, at its coarsest boundaries."""
        if depth == len(_BOUNDARIES):
            return self._cut_word(text, budget, separator)
        chunks: list[list[_Atom]] = []
        current: list[_Atom] = []
        used = 0
        for index, (unit_separator, unit) in enumerate(_split_at(text, _BOUNDARIES[depth])):
            unit_separator = separator if index == 0 else unit_separator
            tokens = self._estimate(unit, depth + 1)
            if tokens > budget:
                if current:
                    chunks.append(current)
                current, used = [], 0
                chunks.extend(self._pack(unit, depth + 1, budget, unit_separator))
                continue
            if current and used + tokens > budget:
                chunks.append(current)
                current, used = [], 0
            current.extend(self._atoms(unit, depth + 1, unit_separator, tokens))
            used += tokens
        return [*chunks, current] if current else chunks

    def _atoms(self, unit: str, depth: int, separator: str, tokens: int) -> list[_Atom]:
        """Break a paragraph into sentence atoms, so that overlap can take its last sentences."""
        if depth != _PARAGRAPH_DEPTH:
            return [_Atom(separator, unit, tokens)]
        sentences = _split_at(unit, _SENTENCES)
        return [
            _Atom(separator if index == 0 else sentence_separator, sentence, self._known[sentence])
            for index, (sentence_separator, sentence) in enumerate(sentences)
        ]

    def _cut_word(self, word: str, budget: int, separator: str) -> list[list[_Atom]]:
        """Cut a word too long for any passage (a base64 blob, say) into even pieces."""
        tokens = self._known[word]
        size = max(1, len(word) * budget // tokens)
        pieces = [word[start : start + size] for start in range(0, len(word), size)]
        return [
            [
                _Atom(
                    separator if index == 0 else "",
                    piece,
                    math.ceil(tokens * len(piece) / len(word)),
                )
            ]
            for index, piece in enumerate(pieces)
        ]


def _split_at(text: str, boundary: re.Pattern[str]) -> list[tuple[str, str]]:
    """Split `text` at `boundary` into (separator before it, unit) pairs, no unit empty."""
    pieces = boundary.split(text)
    units: list[tuple[str, str]] = []
    separator = ""
    for index, piece in enumerate(pieces):
        if index % 2:
            separator += piece
        elif piece:
            units.append((separator, piece))
            separator = ""
    return units


def _units(text: str, depth: int, start: int = 0) -> list[tuple[str, str]]:
    """Split `text`, a unit at depth `start`, down to its units at `depth`."""
    units = [("", text)]
    for boundary in _BOUNDARIES[start:depth]:
        units = [pair for _, unit in units for pair in _split_at(unit, boundary)]
    return units


def _overlapped(chunks: list[list[_Atom]], overlap: int, budget: int) -> list[list[_Atom]]:
    """Start each chunk after the first with the last atoms of the one before, as room allows."""
    result = chunks[:1]
    for previous, chunk in itertools.pairwise(chunks):
        room = min(overlap, budget - sum(atom.tokens for atom in chunk))
        taken: list[_Atom] = []
        # Never the whole previous chunk: a passage inside the next one is only repetition.
        for atom in reversed(previous[1:]):
            if atom.tokens > room:
                break
            taken.insert(0, atom)
            room -= atom.tokens
        result.append([*taken, *chunk])
    return result


def _joined(atoms: Sequence[_Atom]) -> str:
    """Put atoms back together with the whitespace that separated them."""
    if not atoms:
        return ""
    return atoms[0].text + "".join(atom.separator + atom.text for atom in atoms[1:])
