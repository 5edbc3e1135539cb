"""Markdown to Telegram HTML: whatever the model writes, Telegram can parse it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bots.delivery.split import split_message
from bots.platforms.telegram_markup import to_html
from tests.fake_telegram import html_error, visible


def test_code_blocks_inline_code_and_bold() -> None:
    text = "Try **this**: `a < b`\n```python\nif x < 1 and y > 2:\n    pass\n```\nok & done"
    assert to_html(text) == (
        "Try <b>this</b>: <code>a &lt; b</code>\n"
        '<pre><code class="language-python">if x &lt; 1 and y &gt; 2:\n    pass</code></pre>'
        "\nok &amp; done"
    )


def test_an_unclosed_code_block_is_closed() -> None:
    assert (
        to_html("```js\nlet a = 1 <")
        == '<pre><code class="language-js">let a = 1 &lt;</code></pre>'
    )


def test_a_hostile_language_tag_cannot_inject_markup() -> None:
    assert '"' not in to_html('```py" onclick="x\ncode\n```').split(">", 2)[0][9:]


markdownish = st.lists(
    st.sampled_from([*"ab <>&*_`~[]()\n\\\"'#", "```", "```py\n", "**"]), max_size=120
).map("".join)


@settings(max_examples=400, deadline=None)
@given(markdownish)
def test_any_text_renders_to_html_telegram_accepts(text: str) -> None:
    rendered = to_html(text)
    assert html_error(rendered) is None
    assert len(visible(rendered, "HTML")) <= len(text), "markup never adds visible characters"


@settings(max_examples=100, deadline=None)
@given(markdownish.map(lambda t: t * 20))
def test_split_pieces_render_within_telegrams_limit(text: str) -> None:
    for piece in split_message(text, 4096):
        assert len(visible(to_html(piece.text), "HTML")) <= 4096


CONSTRUCTS = [
    pytest.param(
        "# Title\nSome text\n\n## More ##",
        "<b>Title</b>\nSome text\n\n<b>More</b>",
        id="headings become bold lines",
    ),
    pytest.param(
        "- one\n* two\n\n3) three\n4) four",
        "• one\n• two\n\n3. three\n4. four",
        id="lists become bullet and numbered lines",
    ),
    pytest.param(
        "- fruit\n  - apple\n    1. green\n    2. red\n- nuts",
        "• fruit\n  • apple\n    1. green\n    2. red\n• nuts",
        id="nested lists are indented",
    ),
    pytest.param(
        "*stars* and _underscores_, **bold**, __also bold__, ~~gone~~, snake_case_name",
        "<i>stars</i> and <i>underscores</i>, <b>bold</b>, <b>also bold</b>, <s>gone</s>, "
        "snake_case_name",
        id="italics bold and strikethrough",
    ),
    pytest.param(
        '[site](https://example.com/a?b=1&c="2") [bad](javascript:alert(1)) [rel](/x)',
        '<a href="https://example.com/a?b=1&amp;c=%222%22">site</a> bad rel',
        id="only safe links stay links, their address escaped",
    ),
    pytest.param(
        "<mailto:ada@example.com> ![a cat](https://example.com/cat.png)",
        '<a href="mailto:ada@example.com">mailto:ada@example.com</a> '
        '<a href="https://example.com/cat.png">a cat</a>',
        id="autolinks and images",
    ),
    pytest.param(
        "[`code` and ![img](https://b.example)](https://a.example)",
        '<a href="https://a.example">code and img</a>',
        id="a link holds no code and no other link",
    ),
    pytest.param(
        "> quoted *line*\n> > inner\n\nafter",
        "<blockquote>quoted <i>line</i>\ninner</blockquote>\n\nafter",
        id="quotes, nested ones flattened",
    ),
    pytest.param(
        "1. Run:\n   ~~~bash\n   echo '<hi>' && exit\n   ~~~\n2. Done",
        "1. Run:\n  <pre><code class=\"language-bash\">echo '&lt;hi&gt;' &amp;&amp; exit"
        "</code></pre>\n2. Done",
        id="a code block with its language in a list",
    ),
    pytest.param(
        "<b>not bold</b> <think>leftover</think>\n\n<div>\nblock\n</div>",
        "&lt;b&gt;not bold&lt;/b&gt; &lt;think&gt;leftover&lt;/think&gt;\n\n"
        "&lt;div&gt;\nblock\n&lt;/div&gt;",
        id="html in the input is shown as text",
    ),
    pytest.param(
        "**not closed\n\n---\n\nend *",
        "**not closed\n\n———\n\nend *",
        id="a rule and unbalanced markers",
    ),
]


@pytest.mark.parametrize(("markdown", "expected"), CONSTRUCTS)
def test_each_construct_renders_to_telegrams_tags(markdown: str, expected: str) -> None:
    assert to_html(markdown) == expected


@pytest.mark.parametrize("marker", ["- ", "> ", "1. ", "- > "])
def test_deep_nesting_stays_valid(marker: str) -> None:
    rendered = to_html(marker * 200 + "**deep** [x](https://x.example)")
    assert html_error(rendered) is None
    assert "deep" in visible(rendered, "HTML")


HOSTILE_PIECES = [
    *"ab <>&*_`~[]()!|#>-+.=\n\t\\\"'",
    *["```", "~~", "**", "__", "***", "![", "](", "<b>", "</i>", "<think>", "<a@b.c>"],
    *["1. ", "10) ", "- ", "> ", "# ", "    ", "&amp;", "&#0;", "http://x.y", "](javascript:x)"],
    "](https://a.example/?q=<&>)",
]
hostile = st.lists(st.sampled_from(HOSTILE_PIECES), max_size=150).map("".join)


@settings(max_examples=600, deadline=None)
@given(hostile)
def test_hostile_markdown_renders_to_html_telegram_accepts(text: str) -> None:
    rendered = to_html(text)
    assert html_error(rendered) is None, rendered
    assert len(visible(rendered, "HTML")) <= len(text), "markup never adds visible characters"


words = st.text("abcdefghij", min_size=1, max_size=6)
inline = st.one_of(
    words,
    words.map("*{}*".format),
    words.map("_{}_".format),
    words.map("**{}**".format),
    words.map("~~{}~~".format),
    words.map("`{}`".format),
    words.map("[{}](https://example.com/x_y*z)".format),
    words.map("[{}](javascript:alert(1))".format),
    words.map("![{}](https://example.com/a.png)".format),
)
line = st.tuples(
    st.sampled_from(["", "# ", "### ", "- ", "* ", "1. ", "> ", "  - ", "> - "]),
    st.lists(inline, min_size=1, max_size=5).map(" ".join),
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(line, min_size=1, max_size=8), st.sampled_from(["\n", "\n\n"]))
def test_rendered_constructs_leave_no_markup_characters(lines: list[str], gap: str) -> None:
    rendered = to_html(gap.join(lines))
    assert html_error(rendered) is None
    assert not set("#*_~`[]()>") & set(visible(rendered, "HTML")), rendered
    assert "javascript" not in rendered
