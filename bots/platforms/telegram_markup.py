"""Model Markdown to Telegram HTML, escaped by construction so Telegram can always parse it."""

from __future__ import annotations

import html
import re

_FENCED = re.compile(
    r"^ {0,3}```([^\n`]*)\n(.*?)(?:^ {0,3}```[ \t]*$|\Z)", re.DOTALL | re.MULTILINE
)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_LANGUAGE = re.compile(r"[^\w+#.-]")


def _inline(text: str) -> str:
    """Escape prose and render `code` and **bold**; every tag we emit is balanced."""
    out = []
    for index, part in enumerate(_INLINE_CODE.split(text)):
        if index % 2:
            out.append(f"<code>{html.escape(part, quote=False)}</code>")
        else:
            out.append(_BOLD.sub(r"<b>\1</b>", html.escape(part, quote=False)))
    return "".join(out)


def to_html(markdown: str) -> str:
    """Render a reply's Markdown as Telegram HTML.

    Only code blocks, inline code and bold become markup; every other character is
    escaped, so no model output (stray `<`, `&`, `*`, `_`) can make Telegram reject the
    message. An unclosed code block, as in a reply still streaming, is closed.
    """
    out, position = [], 0
    for block in _FENCED.finditer(markdown):
        out.append(_inline(markdown[position : block.start()]))
        language = _LANGUAGE.sub("", block.group(1).strip())
        code = html.escape(block.group(2).removesuffix("\n"), quote=False)
        opening = f'<pre><code class="language-{language}">' if language else "<pre><code>"
        out.append(f"{opening}{code}</code></pre>")
        position = block.end()
    out.append(_inline(markdown[position:]))
    return "".join(out)
