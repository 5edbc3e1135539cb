"""Model Markdown to Telegram HTML, escaped by construction so Telegram can always parse it.

A CommonMark parser (markdown-it-py, raw HTML off) reads the model's text; the tree is
written out in Telegram's subset of HTML, where every piece of text is escaped and every
tag is opened and closed by the same call. What Telegram has no tag for becomes text
laid out like it: headings bold lines, list items "• " and "1. " lines, rules a dash
line. The visible text is never longer than the Markdown, so a message cut to 4096
characters of Markdown stays within Telegram's limit once rendered.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Sequence
from urllib.parse import quote, urlsplit

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

from bots.core.knowledge import is_web_link
from bots.core.models import Source

BULLET = "• "
RULE = "———"
INDENT = 2  # spaces per level of list nesting
LINK_SCHEMES = ("http", "https", "mailto", "tg")
_INLINE_TAGS = {"em": "i", "strong": "b", "s": "s"}
_LANGUAGE = re.compile(r"[^\w+#.-]")
_NEWLINES = re.compile(r"\r\n?|\n")  # markdown-it's own line breaks, for its line numbers
_TAG = re.compile(r"<[^>]*>")  # every "<" we write opens a tag: text "<" is escaped
# What could start markup inside a line; a line starting with "_" starts no block.
_INLINE_MARKUP = re.compile(r"([\\`*_\[\]<&~])")
# What stays as it is in a link's address; the rest (spaces, parentheses) is %-escaped.
_URL_SAFE = ":/?#[]@!$&'*+,;=%~-._"

_escape = functools.partial(html.escape, quote=False)


class _Parser(MarkdownIt):
    """CommonMark with strikethrough, raw HTML as text, and every link parsed."""

    def __init__(self) -> None:
        super().__init__("commonmark", {"html": False})
        self.enable("strikethrough")

    def validateLink(self, url: str) -> bool:
        """Parse every link: the renderer decides which may stay links (`_is_safe`)."""
        return True


_PARSER = _Parser()
_DEEPEST = _PARSER.options["maxNesting"] - 1


def italic(text: str) -> str:
    """Mark `text` up as Markdown shown in italics, every character as written."""
    lines = (_INLINE_MARKUP.sub(r"\\\1", line.strip()) for line in _NEWLINES.split(text))
    return "\n".join(f"_{line}_" if line else "" for line in lines)


def sources_markup(sources: Sequence[Source]) -> str:
    """An answer's sources as Markdown: "Sources:" in italics, then a link per source.

    Titles keep every character as written; a source without a web address (a file on
    the operator's machine) is its title alone.
    """
    items = [
        f"[{_escaped(s.title)}]({quote(s.link, safe=_URL_SAFE)})"
        if is_web_link(s.link) and s.link
        else _escaped(s.title)
        for s in sources
    ]
    return f"{italic('Sources:')} " + " · ".join(items)


def _escaped(text: str) -> str:
    return _INLINE_MARKUP.sub(r"\\\1", " ".join(text.split()))


def to_html(markdown: str) -> str:
    """Render a reply's Markdown as Telegram HTML.

    Whatever the model writes (stray `<`, `&`, `*`, raw HTML, unsafe links), the output
    holds only Telegram's tags, balanced and properly nested. A code block left open,
    as in a reply still streaming, is closed.
    """
    tokens = _PARSER.parse(markdown)
    # Two rare cases go as plain text: nesting past the parser's limit, where it drops
    # the rest, and tabs in an indented code block, which it may widen into spaces.
    if all(token.level < _DEEPEST for token in tokens):
        rendered = _Renderer(_NEWLINES.split(markdown)).blocks(SyntaxTreeNode(tokens).children)
        if len(html.unescape(_TAG.sub("", rendered))) <= len(markdown):
            return rendered
    return _escape(markdown)


def _wrap(tag: str, inner: str) -> str:
    return f"<{tag}>{inner}</{tag}>" if inner else ""


def _is_safe(href: str) -> bool:
    """Tell whether a link may stay one: a web, mail or Telegram address."""
    try:
        url = urlsplit(href)
    except ValueError:
        return False
    if url.scheme in ("http", "https"):
        return bool(url.netloc)
    return url.scheme in LINK_SCHEMES and bool(url.netloc or url.path)


class _Renderer:
    """Write one parsed reply as Telegram HTML; `lines` is its source, for blank lines."""

    def __init__(self, lines: Sequence[str]) -> None:
        self._lines = lines
        self._depth = 0  # lists around the blocks being written
        self._quoted = False  # inside a quote: Telegram's quotes can't be nested

    def blocks(self, nodes: Sequence[SyntaxTreeNode]) -> str:
        """Write blocks a line apart, or a blank line where the source has one."""
        return "".join(
            (self._gap(node) if index else "") + self.block(node)
            for index, node in enumerate(nodes)
        )

    def _gap(self, node: SyntaxTreeNode) -> str:
        """Start a block on a new line, indented for its list, never wider than the source."""
        start = node.map[0] if node.map else 0
        after_blank = start > 0 and not self._lines[start - 1].strip(" \t>")
        levels = self._depth - 1 if node.type == "list_item" else self._depth
        line = self._lines[start]
        indent = min(INDENT * levels, len(line) - len(line.lstrip(" \t>")))
        return ("\n\n" if after_blank else "\n") + " " * indent

    def block(self, node: SyntaxTreeNode) -> str:
        match node.type:
            case "paragraph":
                return self.inline(node.children[0].children)
            case "heading":
                return _wrap("b", self.inline(node.children[0].children))
            case "bullet_list" | "ordered_list":
                self._depth += 1
                try:
                    return self.blocks(node.children)
                finally:
                    self._depth -= 1
            case "list_item":  # numbered as written: renumbering could lengthen the text
                marker, body = f"{node.info}. " if node.info else BULLET, self.blocks(node.children)
                return marker + body if body else marker.rstrip()
            case "blockquote":
                return self._quote(node.children)
            case "fence" | "code_block":
                return self._code(node)
            case "hr":
                return RULE
            case _:
                return self.blocks(node.children) if node.children else _escape(node.content)

    def _quote(self, nodes: Sequence[SyntaxTreeNode]) -> str:
        if self._quoted:
            return self.blocks(nodes)
        self._quoted = True
        try:
            return _wrap("blockquote", self.blocks(nodes))
        finally:
            self._quoted = False

    @staticmethod
    def _code(node: SyntaxTreeNode) -> str:
        code = _escape(node.content.removesuffix("\n"))
        words = node.info.split(maxsplit=1)
        language = _LANGUAGE.sub("", words[0]) if words else ""
        opening = f'<pre><code class="language-{language}">' if language else "<pre><code>"
        return f"{opening}{code}</code></pre>"

    def inline(self, nodes: Sequence[SyntaxTreeNode], *, linked: bool = False) -> str:
        """Write inline nodes; inside a link (`linked`) no code and no other link."""
        return "".join(self._span(node, linked) for node in nodes)

    def _span(self, node: SyntaxTreeNode, linked: bool) -> str:
        match node.type:
            case "softbreak" | "hardbreak":
                return "\n"
            case "code_inline":
                code = _escape(node.content)
                return code if linked else _wrap("code", code)
            case "em" | "strong" | "s":
                return _wrap(_INLINE_TAGS[node.type], self.inline(node.children, linked=linked))
            case "link":
                text = self.inline(node.children, linked=True)
                return self._link(str(node.attrs["href"]), text, linked)
            case "image":  # its description, linking to the picture
                alt, src = self.inline(node.children, linked=True), str(node.attrs["src"])
                return self._link(src, alt or "image", linked) if _is_safe(src) else alt
            case _:
                return _escape(node.content)

    @staticmethod
    def _link(href: str, text: str, linked: bool) -> str:
        if linked or not text or not _is_safe(href):
            return text
        return f'<a href="{html.escape(href)}">{text}</a>'
