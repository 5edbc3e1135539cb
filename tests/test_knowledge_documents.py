"""Reading an operator's documents into sections, and splitting them into passages."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from fpdf import FPDF
from pypdf import PdfWriter

from bots.knowledge.documents import (
    MAX_DOCUMENT_BYTES,
    Document,
    DocumentError,
    Draft,
    Section,
    find_documents,
    read_document,
    split,
)

# The fake tokenizer counts a word as one token per this many characters, as WordPiece
# cuts a long word into several pieces.
CHARACTERS_PER_TOKEN = 20


def tokens(text: str) -> int:
    """Count a text's tokens the way the fake counter does."""
    return sum(-(-len(word) // CHARACTERS_PER_TOKEN) for word in text.split())


class WordCounter:
    """A token counter that counts words and remembers the size of each batch it was asked."""

    def __init__(self, extra_per_newline: int = 0) -> None:
        self.batches: list[int] = []
        self._extra_per_newline = extra_per_newline

    async def __call__(self, texts: Sequence[str]) -> list[int]:
        self.batches.append(len(texts))
        return [tokens(text) + self._extra_per_newline * text.count("\n") for text in texts]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def read(path: Path, max_bytes: int = MAX_DOCUMENT_BYTES) -> Document:
    return read_document(path.name, path, max_bytes=max_bytes)


def outline(document: Document) -> list[tuple[tuple[str, ...], str | None, str]]:
    return [(s.titles, s.anchor, s.text) for s in document.sections]


def refusal(path: Path, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """Read a document that must be refused; return the message, checked to name the file."""
    with pytest.raises(DocumentError) as caught:
        read(path, max_bytes)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    return message


def pdf_bytes(pages: Sequence[str], title: str | None = None) -> bytes:
    pdf = FPDF()
    if title is not None:
        pdf.set_title(title)
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 10, text)
    return bytes(pdf.output())


def encrypted(source: Path, target: Path, user_password: str) -> Path:
    writer = PdfWriter(clone_from=source)
    writer.encrypt(user_password=user_password, owner_password="owner secret")
    with target.open("wb") as file:
        writer.write(file)
    return target


# Markdown


async def test_markdown_sections_have_title_paths_and_github_anchors(tmp_path: Path) -> None:
    path = write(
        tmp_path / "help.md",
        "# Password help\n\nIntro under the title.\n\n"
        "## Reset your password\n\nGo to settings.\n\n"
        "### On Android\n\nTap the menu.\n\n"
        "## Reset your password\n\nAgain, differently.\n\n"
        "## What's new in `config.yaml` & v2.0?\n\nMore.\n\n"
        "# Appendix\n\nLast words.\n",
    )
    document = read(path)
    assert document.title == "Password help"
    assert document.doc_id == "help.md"
    assert outline(document) == [
        (("Password help",), "password-help", "Intro under the title."),
        (("Password help", "Reset your password"), "reset-your-password", "Go to settings."),
        (
            ("Password help", "Reset your password", "On Android"),
            "on-android",
            "Tap the menu.",
        ),
        (("Password help", "Reset your password"), "reset-your-password-1", "Again, differently."),
        (
            ("Password help", "What's new in config.yaml & v2.0?"),
            "whats-new-in-configyaml--v20",
            "More.",
        ),
        (("Password help", "Appendix"), "appendix", "Last words."),
    ]


async def test_a_heading_in_a_code_block_does_not_start_a_section(tmp_path: Path) -> None:
    path = write(
        tmp_path / "install.md",
        "Read this first.\n\n## Install\n\n```sh\n# not a heading\npip install parley\n```\n\n"
        "> ## A quoted heading\n> stays in its quote.\n",
    )
    document = read(path)
    assert document.title == "install", "no h1 at the start: the file's stem"
    assert outline(document) == [
        (("install",), None, "Read this first."),
        (
            ("install", "Install"),
            "install",
            "```sh\n# not a heading\npip install parley\n```\n\n"
            "> ## A quoted heading\n> stays in its quote.",
        ),
    ]


async def test_an_empty_section_is_dropped_but_its_heading_stays_in_the_path(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "a.md", "# Guide\n\n## Setup\n\n### Linux\n\nUse apt.\n\n## Use\n\nRun."
    )
    assert outline(read(path)) == [
        (("Guide", "Setup", "Linux"), "linux", "Use apt."),
        (("Guide", "Use"), "use", "Run."),
    ]


async def test_a_first_h1_after_text_is_a_heading_not_the_title(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.md", "Preface.\n\nTitle Here\n==========\n\nBody.\n")
    document = read(path)
    assert document.title == "notes"
    assert outline(document) == [
        (("notes",), None, "Preface."),
        (("notes", "Title Here"), "title-here", "Body."),
    ]


async def test_front_matter_gives_the_title_and_is_not_text(tmp_path: Path) -> None:
    path = write(
        tmp_path / "start.md", '---\ntitle: "Getting started"\nlayout: page\n---\n\nWelcome.\n'
    )
    document = read(path)
    assert document.title == "Getting started"
    assert outline(document) == [(("Getting started",), None, "Welcome.")]


# HTML


async def test_html_sections_start_at_h1_to_h3_and_use_their_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path / "page.html",
        """<!DOCTYPE html><html><head><title>Parley  Help</title>
        <style>.hidden { display: none }</style><script>var secret = 1;</script></head>
        <body><nav>Home | Docs</nav><header>Site banner</header>
        <p>Welcome text.</p>
        <h1 id="start">Getting started</h1>
        <p>First   paragraph
        spread over lines.</p>
        <ul><li>one</li><li>two</li></ul>
        <h2><a name="old-anchor"></a>Configure it</h2><p>Set <code>KEY</code> first.</p>
        <h3>Deep &amp; details</h3><div>Deep text</div><h4>Minor</h4><p>minor text</p>
        <table><tr><td>a</td><td>b</td></tr></table>
        <h2>Second</h2><pre>  indented
    code</pre><!-- a comment -->
        <footer>Copyright</footer><noscript>enable scripts</noscript></body></html>""",
    )
    document = read(path)
    assert document.title == "Parley Help"
    assert outline(document) == [
        (("Parley Help",), None, "Welcome text."),
        (
            ("Parley Help", "Getting started"),
            "start",
            "First paragraph spread over lines.\n\none\ntwo",
        ),
        (("Parley Help", "Getting started", "Configure it"), "old-anchor", "Set KEY first."),
        (
            ("Parley Help", "Getting started", "Configure it", "Deep & details"),
            "deep--details",
            "Deep text\n\nMinor\n\nminor text\n\na b",
        ),
        (("Parley Help", "Getting started", "Second"), "second", "indented\n    code"),
    ]
    every_text = " ".join(s.text for s in document.sections)
    for removed in ("secret", "hidden", "Home", "banner", "Copyright", "enable", "comment"):
        assert removed not in every_text


async def test_html_without_a_title_is_named_by_its_h1(tmp_path: Path) -> None:
    path = write(
        tmp_path / "faq.htm",
        "<article><header><h1>FAQ</h1></header><p>Answers.</p><h2>Billing</h2><p>Paid.</p>",
    )
    document = read(path)
    assert document.title == "FAQ"
    assert outline(document) == [
        (("FAQ",), "faq", "Answers."),
        (("FAQ", "Billing"), "billing", "Paid."),
    ]


async def test_unclosed_paragraphs_nesting_deep_are_read(tmp_path: Path) -> None:
    path = write(tmp_path / "old.html", "".join(f"<p>Line {i}." for i in range(5000)))
    (section,) = read(path).sections
    assert section.text.split("\n\n") == [f"Line {i}." for i in range(5000)]


async def test_html_with_only_scripts_has_no_text(tmp_path: Path) -> None:
    path = write(tmp_path / "app.html", "<html><body><script>run()</script></body></html>")
    assert refusal(path).endswith("has no text")


# Plain text


async def test_plain_text_is_one_normalized_section(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.txt", "Line one.  \r\nLine two.\r\n\r\n\r\n\r\nPart two.\r\n")
    document = read(path)
    assert document.title == "notes"
    assert outline(document) == [(("notes",), None, "Line one.\nLine two.\n\nPart two.")]


async def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "bom.text", "\ufeffHello.".encode())
    assert outline(read(path)) == [(("bom",), None, "Hello.")]


# PDF


async def test_pdf_pages_are_sections_with_page_anchors(tmp_path: Path) -> None:
    pages = ["The first page explains resets.", "The second page covers billing."]
    path = write(tmp_path / "manual.pdf", pdf_bytes(pages, title="Parley Manual"))
    document = read(path)
    assert document.title == "Parley Manual"
    assert [(s.titles, s.anchor) for s in document.sections] == [
        (("Parley Manual", "page 1"), "page=1"),
        (("Parley Manual", "page 2"), "page=2"),
    ]
    assert [s.text for s in document.sections] == pages


async def test_a_pdf_without_a_title_is_named_by_its_file(tmp_path: Path) -> None:
    path = write(tmp_path / "guide.pdf", pdf_bytes(["Only page."]))
    document = read(path)
    assert document.title == "guide"
    assert outline(document) == [(("guide", "page 1"), "page=1", "Only page.")]


async def test_a_pdf_with_a_user_password_is_refused(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.pdf", pdf_bytes(["Secret text."]))
    path = encrypted(plain, tmp_path / "locked.pdf", user_password="x")
    assert refusal(path) == f"{path} is encrypted; save a copy without a password"


async def test_a_pdf_with_only_an_owner_password_is_read(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.pdf", pdf_bytes(["Readable text."], title="Owned"))
    document = read(encrypted(plain, tmp_path / "owned.pdf", user_password=""))
    assert outline(document) == [(("Owned", "page 1"), "page=1", "Readable text.")]


async def test_a_truncated_pdf_is_refused(tmp_path: Path) -> None:
    whole = pdf_bytes(["Some text here.", "And more here."])
    path = write(tmp_path / "cut.pdf", whole[: len(whole) // 2])
    assert "is not a readable PDF (" in refusal(path)


async def test_random_bytes_named_pdf_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "noise.pdf", random.Random(7).randbytes(4096))
    assert "is not a readable PDF (" in refusal(path)


async def test_a_pdf_without_a_text_layer_is_refused(tmp_path: Path) -> None:
    pdf = FPDF()
    pdf.add_page()
    pdf.rect(10, 10, 50, 50)
    path = write(tmp_path / "scan.pdf", bytes(pdf.output()))
    assert refusal(path).endswith("has no text layer (a scanned PDF?); run OCR on it first")


# Refusals


async def test_a_binary_file_named_txt_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert refusal(path) == f"{path} looks like a binary file, not text"


async def test_latin_1_text_is_refused_with_the_offset(tmp_path: Path) -> None:
    path = write(tmp_path / "menu.md", "# Menu\n\ncafé au lait".encode("latin-1"))
    assert refusal(path) == (f"{path} is not UTF-8 text (byte 0xe9 at offset 11); save it as UTF-8")


async def test_the_offset_counts_a_byte_order_mark(tmp_path: Path) -> None:
    path = write(tmp_path / "menu.txt", b"\xef\xbb\xbfcaf\xe9")
    assert "(byte 0xe9 at offset 6)" in refusal(path)


async def test_utf_16_text_is_named_as_such(tmp_path: Path) -> None:
    path = write(tmp_path / "windows.txt", "Hello.".encode("utf-16"))
    assert refusal(path) == f"{path} is UTF-16 text; save it as UTF-8"


async def test_a_file_over_the_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "big.md", "word " * 100)

    def no_reading(self: Path) -> bytes:
        raise AssertionError(f"{self} was read")

    monkeypatch.setattr(Path, "read_bytes", no_reading)
    assert refusal(path, max_bytes=100).startswith(f"{path} is 500 bytes; the limit is 100 bytes")


@pytest.mark.parametrize("name", ["huge.txt", "huge.pdf"])
async def test_a_200_mb_file_is_refused_by_its_size(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with path.open("wb") as file:
        file.truncate(200 * 1024 * 1024)
    assert refusal(path).startswith(f"{path} is 200.0 MB; the limit is 20.0 MB")


@pytest.mark.parametrize("content", ["", "   \n\n\t \r\n  "])
@pytest.mark.parametrize("name", ["empty.txt", "empty.md"])
async def test_a_document_without_text_is_refused(tmp_path: Path, name: str, content: str) -> None:
    path = write(tmp_path / name, content)
    assert refusal(path) == f"{path} has no text"


async def test_an_unsupported_suffix_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "sheet.csv", "a,b\n")
    assert ".md" in refusal(path)


# Finding documents


def tree(root: Path) -> Path:
    for name in (
        "a.md",
        "b/c.html",
        "b/.draft.md",
        ".git/x.md",
        "b/deeper/d.PDF",
        "image.png",
        "z.txt",
    ):
        write(root / name, "x")
    return root


def test_folders_are_searched_recursively_in_order(tmp_path: Path) -> None:
    docs = tree(tmp_path / "docs")
    assert find_documents([docs]) == [
        ("a.md", docs / "a.md"),
        ("b/c.html", docs / "b/c.html"),
        ("b/deeper/d.PDF", docs / "b/deeper/d.PDF"),
        ("z.txt", docs / "z.txt"),
    ]


def test_a_named_file_is_known_by_its_name(tmp_path: Path) -> None:
    docs = tree(tmp_path / "docs")
    assert find_documents([docs / "b" / "c.html"]) == [("c.html", docs / "b" / "c.html")]
    hidden = docs / "b" / ".draft.md"
    assert find_documents([hidden]) == [(".draft.md", hidden)], "named, so wanted"


def test_a_named_unsupported_file_is_refused(tmp_path: Path) -> None:
    image = tree(tmp_path / "docs") / "image.png"
    with pytest.raises(DocumentError, match=r"image\.png is not a supported document.*\.md"):
        find_documents([image])


def test_a_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match="does not exist"):
        find_documents([tmp_path / "nowhere"])


def test_the_same_file_twice_is_listed_once(tmp_path: Path) -> None:
    docs = tree(tmp_path / "docs")
    (docs / "b" / "loop").symlink_to(docs, target_is_directory=True)
    found = find_documents([docs / "a.md", docs, docs / "a.md"])
    assert [doc_id for doc_id, _ in found] == ["a.md", "b/c.html", "b/deeper/d.PDF", "z.txt"]


def test_two_files_with_one_doc_id_are_refused(tmp_path: Path) -> None:
    first = write(tmp_path / "one" / "README.md", "x")
    second = write(tmp_path / "two" / "README.md", "y")
    with pytest.raises(DocumentError) as caught:
        find_documents([first, second])
    assert str(first) in str(caught.value)
    assert str(second) in str(caught.value)


# Splitting


def document(*sections: Section) -> Document:
    return Document(doc_id="doc.md", path=Path("doc.md"), title="Doc", sections=sections)


def prose(section: int, paragraphs: int, sentences: int = 3) -> str:
    """Write paragraphs of numbered sentences of six words, each sentence unique."""
    return "\n\n".join(
        " ".join(f"Section {section} paragraph {p} sentence {s}." for s in range(sentences))
        for p in range(paragraphs)
    )


def within(drafts: Sequence[Draft], max_tokens: int) -> bool:
    return all(tokens(draft.embedded_text) <= max_tokens for draft in drafts)


def spans(drafts: Sequence[Draft], text: str) -> list[tuple[int, int]]:
    """Where each draft lies in `text`; each must be a run of it."""
    found = []
    for draft in drafts:
        assert draft.text in text, draft.text
        start = text.index(draft.text)
        found.append((start, start + len(draft.text)))
    return found


async def test_a_section_that_fits_is_one_passage() -> None:
    counter = WordCounter()
    section = Section(("Doc", "Short"), "short", "A short section.\n\nTwo paragraphs.")
    drafts = await split(document(section), counter)
    assert drafts == [Draft(("Doc", "Short"), "short", section.text)]
    assert drafts[0].embedded_text == "Doc > Short\nA short section.\n\nTwo paragraphs."
    assert len(counter.batches) == 2, "once for the units, once to check"


async def test_a_long_sentence_in_a_section_that_fits_is_not_counted_by_word() -> None:
    counter = WordCounter()
    text = " ".join(f"w{i}" for i in range(25)) + "."
    drafts = await split(
        document(Section(("Doc",), None, text)), counter, max_tokens=32, overlap_tokens=16
    )
    assert [d.text for d in drafts] == [text]
    assert counter.batches == [3, 1], "'>', the title and the sentence; then the passage"


async def test_a_long_section_is_cut_at_paragraphs_within_the_budget() -> None:
    text = prose(1, paragraphs=12)
    drafts = await split(
        document(Section(("Doc",), "a", text)), WordCounter(), max_tokens=40, overlap_tokens=0
    )
    assert len(drafts) > 3
    assert within(drafts, 40)
    paragraphs = set(text.split("\n\n"))
    for draft in drafts:
        assert set(draft.text.split("\n\n")) <= paragraphs, "whole paragraphs only"
        assert (draft.titles, draft.anchor) == (("Doc",), "a")
    assert "\n\n".join(d.text for d in drafts) == text, "nothing lost, nothing repeated"


async def test_passages_overlap_within_a_section_but_never_across() -> None:
    first, second = prose(1, paragraphs=10), prose(2, paragraphs=10)
    sections = (Section(("Doc", "One"), "one", first), Section(("Doc", "Two"), "two", second))
    drafts = await split(document(*sections), WordCounter(), max_tokens=40, overlap_tokens=12)
    assert within(drafts, 40)
    for section in sections:
        own = [d for d in drafts if d.anchor == section.anchor]
        assert len(own) > 2
        placed = spans(own, section.text)
        assert placed[0][0] == 0 and placed[-1][1] == len(section.text)
        for (_, previous_end), (next_start, _) in itertools.pairwise(placed):
            repeated = section.text[next_start:previous_end]
            assert next_start < previous_end, "each later passage repeats some of the last"
            assert tokens(repeated) <= 12
    assert not any("Section 1" in d.text for d in drafts if d.anchor == "two")


async def test_without_overlap_passages_do_not_repeat() -> None:
    text = prose(1, paragraphs=1, sentences=30)
    drafts = await split(
        document(Section(("Doc",), None, text)), WordCounter(), max_tokens=30, overlap_tokens=0
    )
    assert within(drafts, 30)
    assert " ".join(d.text for d in drafts) == text, "a long paragraph is cut at sentence ends"
    assert all(d.text.endswith(".") for d in drafts)


async def test_a_sentence_too_long_is_cut_into_word_runs() -> None:
    text = " ".join(f"w{i}" for i in range(200))
    drafts = await split(
        document(Section(("Doc",), None, text)), WordCounter(), max_tokens=30, overlap_tokens=5
    )
    assert len(drafts) >= 7
    assert within(drafts, 30)
    spans(drafts, text)


async def test_a_giant_word_is_cut_by_characters() -> None:
    blob = "QUJD" * 1500
    text = f"Key follows. {blob} Done."
    drafts = await split(
        document(Section(("Doc",), None, text)), WordCounter(), max_tokens=30, overlap_tokens=0
    )
    assert within(drafts, 30)
    pieces = [d.text for d in drafts if set(d.text) <= set("QUJD")]
    assert len(pieces) > 1
    assert "".join(pieces) == blob
    assert drafts[0].text == "Key follows." and drafts[-1].text == "Done."


LONG_TITLE = " ".join(f"w{i}" for i in range(10))


@pytest.mark.parametrize(
    ("titles", "shortened"),
    [
        (("Doc", LONG_TITLE, "Leaf"), ("Doc", "Leaf")),
        ((LONG_TITLE, LONG_TITLE, "Leaf"), ("Leaf",)),
        ((LONG_TITLE, LONG_TITLE + " more"), (LONG_TITLE,)),
    ],
)
async def test_a_title_path_too_long_is_shortened(
    titles: tuple[str, ...], shortened: tuple[str, ...]
) -> None:
    text = prose(1, paragraphs=3)
    drafts = await split(
        document(Section(titles, "x", text)), WordCounter(), max_tokens=20, overlap_tokens=4
    )
    assert within(drafts, 20)
    assert {d.titles for d in drafts} == {shortened}
    spans(drafts, text)


async def test_a_single_title_too_long_is_cut() -> None:
    title = " ".join(f"word{i}" for i in range(30))
    text = prose(1, paragraphs=2)
    drafts = await split(
        document(Section((title,), None, text)), WordCounter(), max_tokens=20, overlap_tokens=4
    )
    assert within(drafts, 20)
    assert {d.titles for d in drafts} == {(" ".join(f"word{i}" for i in range(10)),)}, "half"
    spans(drafts, text)


async def test_overlap_never_repeats_a_whole_passage() -> None:
    text = "Tiny note.\n\n" + prose(1, paragraphs=1, sentences=10)
    drafts = await split(
        document(Section(("Doc",), None, text)), WordCounter(), max_tokens=30, overlap_tokens=12
    )
    assert drafts[0].text == "Tiny note."
    assert drafts[1].text.startswith("Section 1 paragraph 0 sentence 0.")
    assert drafts[2].text.startswith("Section 1 paragraph 0 sentence 1."), "overlap"


async def test_counting_is_batched() -> None:
    sections = tuple(Section(("Doc", f"S{i}"), f"s{i}", prose(i, paragraphs=6)) for i in range(30))
    counter = WordCounter()
    drafts = await split(document(*sections), counter, max_tokens=40, overlap_tokens=8)
    assert len(drafts) > 60
    assert len(counter.batches) == 2, counter.batches


async def test_a_counter_that_disagrees_with_its_sums_is_checked() -> None:
    # Newlines cost a token here, so the sums of the units undercount whole passages.
    counter = WordCounter(extra_per_newline=1)
    text = " ".join(f"w{i}" for i in range(19))
    long_text = prose(1, paragraphs=8)
    sections = (Section(("T",), None, text), Section(("T",), "b", long_text))
    drafts = await split(document(*sections), counter, max_tokens=20, overlap_tokens=4)
    assert all(tokens(d.embedded_text) + d.embedded_text.count("\n") <= 20 for d in drafts)
    assert len([d for d in drafts if d.anchor is None]) == 2, "19 words and a title: re-cut"
    assert 3 <= len(counter.batches) <= 8


async def test_splitting_is_deterministic(tmp_path: Path) -> None:
    path = write(
        tmp_path / "guide.md",
        "# Guide\n\n" + "\n\n".join(f"## Part {i}\n\n{prose(i, 5)}" for i in range(5)),
    )
    first = await split(read(path), WordCounter(), max_tokens=32, overlap_tokens=8)
    second = await split(read(path), WordCounter(), max_tokens=32, overlap_tokens=8)
    assert first == second
    assert {d.anchor for d in first} == {f"part-{i}" for i in range(5)}
    assert all(d.text.strip() for d in first)


@pytest.mark.parametrize(("max_tokens", "overlap_tokens"), [(32, 32), (32, 40), (8, 0), (32, -1)])
async def test_budgets_are_validated(max_tokens: int, overlap_tokens: int) -> None:
    with pytest.raises(ValueError):
        await split(
            document(Section(("Doc",), None, "text")),
            WordCounter(),
            max_tokens=max_tokens,
            overlap_tokens=overlap_tokens,
        )


async def test_a_counter_returning_the_wrong_number_of_counts_is_refused() -> None:
    async def short(texts: Sequence[str]) -> list[int]:
        return [1] * (len(texts) - 1)

    with pytest.raises(ValueError, match="counts for"):
        await split(document(Section(("Doc",), None, "Some text.")), short)
