"""Markdown to Telegram HTML: whatever the model writes, Telegram can parse it."""

from __future__ import annotations

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
