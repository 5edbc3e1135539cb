"""The web chat widget in a real (headless) Chromium.

A customer's page on one origin pastes the snippet that loads the widget from the HTTP
channel on another, so CORS is exercised as in production; /chat is checked under its
Content-Security-Policy. Selenium blocks, so every browser call runs in a thread while
the channel serves from the test's event loop. Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiohttp import web
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement

from bots.core.handoff import HandoffPolicy
from bots.core.models import PromptMessage
from tests.conftest import ROOT
from tests.cut_proxy import CutProxy
from tests.fakes import ScriptedModel
from tests.http_channel import http_channel
from tests.loopback import serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)
T = TypeVar("T")

MARKUP = (
    "<script>window.parleyPwned=1</script> "
    '<img src=x onerror="window.parleyPwned=2"> '
    "[x](javascript:window.parleyPwned=3)"
)
RICH_REPLY = (
    "Sure! Here is **bold** text and the [setup guide](https://example.com/guide) for you.\n\n"
    "```python\ndef hello():\n    print('hello, world')\n```\n\n"
    "- Works with *any* plan\n- Takes `two` minutes\n\n"
    f"Markup stays text: {MARKUP}"
)
WORDS_REPLY = " ".join(f"word{n:02d}" for n in range(1, 61)) + "."

HOST_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Acme Corp</title>
<style>
  /* A careless site: none of this may reach the widget. */
  * {{ font-family: "Comic Sans MS", cursive; color: #c00; letter-spacing: 3px; }}
  button {{ display: none !important; }}
  div, p {{ border: 3px dashed red; }}
  body {{ margin: 40px; background: #fafaf5; }}
</style>
</head>
<body>
<h1>Acme Corp</h1>
<p>We make anvils. <a href="#pricing">Pricing</a></p>
{snippet}
</body>
</html>
"""

# The widget's state, read from its shadow root.
STATE = """
const root = document.querySelector("parley-chat")?.shadowRoot;
const top = root && root.querySelector(".pw");
if (!top || top.hidden) return null;
const panel = root.querySelector(".pw-panel");
const active = root.activeElement;
return {
  open: !panel.hidden,
  focus: active ? active.className : null,
  expanded: root.querySelector(".pw-launcher")?.getAttribute("aria-expanded") ?? null,
  status: root.querySelector(".pw-status").textContent,
  input: root.querySelector("textarea").value,
  notices: Array.from(root.querySelectorAll(".pw-notice"), (n) => n.dataset.kind),
  messages: Array.from(root.querySelectorAll(".pw-msg"), (m) => ({
    role: m.classList.contains("pw-user") ? "user" : "assistant",
    text: m.querySelector(".pw-bubble").innerText,
    busy: m.getAttribute("aria-busy"),
    unsent: m.classList.contains("pw-unsent"),
  })),
};
"""

# Record every state the newest assistant message and the status line go through.
RECORD = """
const root = document.querySelector("parley-chat").shadowRoot;
window.__samples = [];
window.__statuses = [];
new MutationObserver(() => {
  const all = root.querySelectorAll(".pw-assistant");
  const last = all[all.length - 1];
  if (last && !last.querySelector(".pw-typing")) {
    const text = last.querySelector(".pw-bubble").textContent;
    const busy = last.getAttribute("aria-busy");
    const prev = window.__samples[window.__samples.length - 1];
    if (!prev || prev.text !== text || prev.busy !== busy) window.__samples.push({text, busy});
  }
  const status = root.querySelector(".pw-status").textContent;
  if (window.__statuses[window.__statuses.length - 1] !== status) window.__statuses.push(status);
}).observe(root, {subtree: true, childList: true, characterData: true, attributes: true});
"""

# What a reply rendered into the DOM; nothing in it may be live markup.
RENDERED = """
const root = document.querySelector("parley-chat").shadowRoot;
const bubbles = root.querySelectorAll(".pw-assistant .pw-bubble");
const bubble = bubbles[bubbles.length - 1];
const handlers = [];
for (const el of root.querySelectorAll("*")) {
  for (const attr of el.attributes) {
    if (/^on/i.test(attr.name)) handlers.push(el.tagName + " " + attr.name);
  }
}
return {
  text: bubble.innerText,
  live: root.querySelectorAll("script, img, iframe, object, embed, style, svg script").length,
  handlers,
  pwned: typeof window.parleyPwned,
  strong: Array.from(bubble.querySelectorAll("strong"), (e) => e.textContent),
  em: Array.from(bubble.querySelectorAll("em"), (e) => e.textContent),
  code: Array.from(bubble.querySelectorAll("pre code"), (e) => e.textContent),
  inline: Array.from(bubble.querySelectorAll(":not(pre) > code"), (e) => e.textContent),
  items: Array.from(bubble.querySelectorAll("ul > li"), (e) => e.textContent),
  links: Array.from(root.querySelectorAll("a"), (a) => ({
    href: a.getAttribute("href"), rel: a.rel, target: a.target, text: a.textContent,
  })),
};
"""


@dataclass
class Replying(ScriptedModel):
    """Answers every message with `text`, a word every `delay` seconds."""

    text: str = ""

    def reply(self, prompt: Sequence[PromptMessage]) -> str:
        return self.text


async def run(call: Callable[..., T], *args: Any) -> T:
    """Run a blocking Selenium call off the event loop, so the servers keep serving."""
    return await asyncio.to_thread(call, *args)


async def js(driver: webdriver.Chrome, script: str, *args: Any) -> Any:
    return await run(driver.execute_script, script, *args)


async def until(
    driver: webdriver.Chrome, check: Callable[[Any], Any], what: str, seconds: float = 10.0
) -> Any:
    """Poll the widget's STATE until `check(state)` holds; return that state."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    state: Any = None
    while loop.time() < deadline:
        state = await js(driver, STATE)
        if state is not None and check(state):
            return state
        await asyncio.sleep(0.04)
    raise AssertionError(f"timed out waiting for {what}; last state: {state}")


async def keys(driver: webdriver.Chrome, *sequence: str) -> None:
    """Type into whatever has the focus, as a keyboard would."""
    await run(ActionChains(driver).send_keys(*sequence).perform)


async def shift_enter(driver: webdriver.Chrome) -> None:
    actions = ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT)
    await run(actions.perform)


async def shadow(driver: webdriver.Chrome, selector: str) -> WebElement:
    host = await run(driver.find_element, By.CSS_SELECTOR, "parley-chat")
    root = await run(lambda: host.shadow_root)
    return await run(root.find_element, By.CSS_SELECTOR, selector)


async def accessible(element: WebElement) -> tuple[str, str]:
    """The element's computed role and name, as assistive technology gets them."""
    return await run(lambda: (element.aria_role, element.accessible_name))


async def screenshot(driver: webdriver.Chrome, name: str) -> None:
    def save() -> bool:
        ARTIFACTS.mkdir(exist_ok=True)
        return bool(driver.save_screenshot(str(ARTIFACTS / name)))

    assert await run(save)


async def narrow(driver: webdriver.Chrome, width: int = 320, height: int = 640) -> None:
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True}
    await run(driver.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride", metrics)


def last_reply(state: dict[str, Any]) -> dict[str, Any]:
    replies = [m for m in state["messages"] if m["role"] == "assistant"]
    return replies[-1] if replies else {"text": "", "busy": None}


def reply_of(state: dict[str, Any]) -> str:
    return str(last_reply(state)["text"])


def streaming(state: dict[str, Any], words: int = 4) -> bool:
    """A reply is on its way and `words` of its words are in."""
    reply = last_reply(state)
    return bool(reply["busy"] == "true" and reply["text"].count("word") >= words)


def finished(state: dict[str, Any]) -> bool:
    return bool(last_reply(state)["busy"] == "false")


def start_chromium(profile: Path) -> webdriver.Chrome:
    """Headless Chromium with a fresh profile; fails (never skips) when it is missing."""
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        "the widget's tests need Debian's chromium and chromium-driver packages"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[webdriver.Chrome]:
    driver = await run(start_chromium, tmp_path / "chromium")
    try:
        yield driver
    finally:
        await run(driver.quit)


async def history(api: str, key: str, conversation: str) -> list[tuple[str, str]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{api}/v1/conversations/{conversation}/messages",
            headers={"Authorization": f"Bearer {key}"},
        )
    response.raise_for_status()
    return [(m["role"], m["content"]) for m in response.json()["messages"]]


async def conversation_id(driver: webdriver.Chrome) -> str:
    ids = await js(
        driver,
        "return Object.keys(localStorage).filter((k) => k.endsWith(':conversation'))"
        ".map((k) => localStorage.getItem(k));",
    )
    assert len(ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", ids[0]), ids
    return str(ids[0])


class Site:
    """A customer's website on its own origin, whose page pastes the snippet."""

    def __init__(self) -> None:
        self.page = ""
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def origin(self) -> str:
        return f"http://localhost:{self.port}"

    def paste(self, api: str, key: str, title: str = "Support") -> None:
        snippet = (
            f'<script src="{api}/widget.js" data-parley-key="{html.escape(key)}" '
            f'data-parley-title="{html.escape(title)}" async></script>'
        )
        self.page = HOST_PAGE.format(snippet=snippet)

    async def __aenter__(self) -> Site:
        async def index(_: web.Request) -> web.Response:
            return web.Response(text=self.page, content_type="text/html")

        app = web.Application()
        app.router.add_get("/", index)
        self.runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


# ----------------------------------------------------------------------------- tests


async def test_keyboard_chat_renders_markdown_safely(
    browser: webdriver.Chrome, redis_url: str, key_prefix: str
) -> None:
    model = Replying(text=RICH_REPLY, delay=0.03)
    async with (
        Site() as site,
        http_channel(redis_url, key_prefix, model, cors_origins=(site.origin,)) as channel,
    ):
        key = await channel.key()
        site.paste(channel.url, key)
        await run(browser.get, site.origin + "/")
        await until(browser, lambda s: not s["open"], "the launcher")

        # Tab to the launcher (past the page's own link), Enter opens the panel.
        for _ in range(6):
            await keys(browser, Keys.TAB)
            state = await js(browser, STATE)
            if state["focus"] == "pw-launcher":
                break
        assert state["focus"] == "pw-launcher", state
        launcher = await shadow(browser, ".pw-launcher")
        assert await run(launcher.value_of_css_property, "outline-style") == "solid"
        assert await accessible(launcher) == ("button", "Support")
        assert await run(launcher.get_attribute, "aria-controls") == "pw-panel"
        await keys(browser, Keys.ENTER)
        state = await until(browser, lambda s: s["open"], "the panel to open")
        assert state["expanded"] == "true"
        assert state["focus"] == "pw-input", "opening moves the focus to the message box"

        # The panel's structure, as assistive technology sees it.
        assert await accessible(await shadow(browser, "#pw-panel")) == ("dialog", "Support")
        assert await accessible(await shadow(browser, "textarea")) == ("textbox", "Message")
        assert await accessible(await shadow(browser, ".pw-send")) == ("button", "Send")
        log = await shadow(browser, ".pw-log")
        assert await run(log.get_attribute, "role") == "log"
        assert await run(log.get_attribute, "aria-live") == "polite"
        status = await shadow(browser, ".pw-status")
        assert await run(status.get_attribute, "role") == "status"

        # Shift+Enter is a new line; Enter sends.
        await js(browser, RECORD)
        await keys(browser, "Hello")
        await shift_enter(browser)
        await keys(browser, "what can you do?")
        state = await js(browser, STATE)
        assert state["input"] == "Hello\nwhat can you do?" and not state["messages"]
        await keys(browser, Keys.ENTER)
        state = await until(browser, lambda s: s["messages"], "the message to show")
        assert state["messages"][0] == {
            "role": "user",
            "text": "Hello\nwhat can you do?",
            "busy": None,
            "unsent": False,
        }
        assert state["input"] == ""

        state = await until(browser, finished, "the reply", seconds=15)
        shown = [(m["role"], m["text"]) for m in state["messages"]]
        samples = await js(browser, "return window.__samples;")
        final = samples[-1]["text"]
        partial = [s for s in samples if s["busy"] == "true" and 0 < len(s["text"]) < len(final)]
        assert partial, f"the reply never showed while streaming: {samples}"

        # Markdown renders; markup from the model stays text.
        rendered = await js(browser, RENDERED)
        assert MARKUP in rendered["text"]
        assert rendered["live"] == 0 and rendered["handlers"] == []
        assert rendered["pwned"] == "undefined"
        assert rendered["strong"] == ["bold"] and rendered["em"] == ["any"]
        assert rendered["code"] == ["def hello():\n    print('hello, world')"]
        assert rendered["inline"] == ["two"]
        assert rendered["items"] == ["Works with any plan", "Takes two minutes"]
        (link,) = rendered["links"]
        assert link["href"] == "https://example.com/guide" and link["text"] == "setup guide"
        assert link["target"] == "_blank"
        assert set(link["rel"].split()) >= {"noopener", "noreferrer", "nofollow", "ugc"}
        assert not any("javascript" in (a["href"] or "").lower() for a in rendered["links"])
        await asyncio.sleep(0.3)  # let the Send button's transition end
        await screenshot(browser, "widget-chat.png")

        # At 320 px the panel takes the screen, and nothing overflows it.
        await narrow(browser)
        box = await js(
            browser,
            "const r = document.querySelector('parley-chat').shadowRoot;"
            "const b = (s) => r.querySelector(s).getBoundingClientRect();"
            "return {panel: b('.pw-panel').toJSON(), send: b('.pw-send').toJSON(),"
            " width: innerWidth, close: b('.pw-close').toJSON()};",
        )
        assert box["width"] == 320
        assert box["panel"]["left"] >= 0 and box["panel"]["right"] <= 320
        assert box["send"]["right"] <= 320 and box["close"]["right"] <= 320
        await screenshot(browser, "widget-320.png")
        await run(browser.execute_cdp_cmd, "Emulation.clearDeviceMetricsOverride", {})

        # Escape closes the panel and gives the focus back to the launcher.
        await keys(browser, Keys.ESCAPE)
        state = await until(browser, lambda s: not s["open"], "the panel to close")
        assert state["focus"] == "pw-launcher" and state["expanded"] == "false"

        # The server kept the exchange; a reload shows it again.
        conversation = await conversation_id(browser)
        assert await history(channel.url, key, conversation) == [
            ("user", "Hello\nwhat can you do?"),
            ("assistant", RICH_REPLY),
        ]
        await run(browser.refresh)
        await until(browser, lambda s: not s["open"], "the launcher after the reload")
        await run((await shadow(browser, ".pw-launcher")).click)
        state = await until(browser, lambda s: len(s["messages"]) == 2, "the history")
        assert [(m["role"], m["text"]) for m in state["messages"]] == shown
        assert (await js(browser, RENDERED))["strong"] == ["bold"]
        assert await conversation_id(browser) == conversation


async def test_reply_survives_a_cut_connection(
    browser: webdriver.Chrome, redis_url: str, key_prefix: str
) -> None:
    model = Replying(text=WORDS_REPLY, delay=0.03)
    async with (
        Site() as site,
        http_channel(
            redis_url, key_prefix, model, cors_origins=(site.origin,), reply_keep_seconds=0.5
        ) as channel,
        CutProxy(int(channel.url.rsplit(":", 1)[1])) as proxy,
    ):
        key = await channel.key()
        site.paste(proxy.url, key)  # the widget reaches the API through the proxy
        await run(browser.get, site.origin + "/")
        await until(browser, lambda s: not s["open"], "the launcher")
        await run((await shadow(browser, ".pw-launcher")).click)
        await until(browser, lambda s: s["focus"] == "pw-input", "the message box")

        # Cut mid-reply: the widget reads on from the last event it saw.
        await js(browser, RECORD)
        await keys(browser, "Count to sixty", Keys.ENTER)
        state = await until(browser, streaming, "the first words")
        assert proxy.cut() >= 1, "the reply's stream went through the proxy"
        state = await until(browser, finished, "the rest of the reply", seconds=15)
        assert reply_of(state) == WORDS_REPLY
        samples = await js(browser, "return window.__samples;")
        assert len(samples) > 2 and all(WORDS_REPLY.startswith(s["text"]) for s in samples), samples
        statuses = await js(browser, "return window.__statuses;")
        assert "Reconnecting…" in statuses and state["status"] == "", statuses
        requests = proxy.sent.decode("latin-1")
        resumed = re.findall(
            r"GET /v1/conversations/[0-9a-f]{32}/replies/[0-9a-f]{32} HTTP/1.1\r\n"
            r"(?:[^\r\n]+\r\n)*?last-event-id: (\d+)\r\n",
            requests,
            re.IGNORECASE,
        )
        assert resumed and int(resumed[0]) >= 4, requests[-2000:]
        conversation = await conversation_id(browser)
        assert await history(channel.url, key, conversation) == [
            ("user", "Count to sixty"),
            ("assistant", WORDS_REPLY),
        ]

        # Cut, and stay unreachable until the reply has ended and is no longer kept:
        # the widget finds it gone (404) and shows it from the history.
        await keys(browser, "Again", Keys.ENTER)
        await until(browser, lambda s: len(s["messages"]) == 4 and streaming(s, 52), "words")
        proxy.down = True
        assert proxy.cut() >= 1
        for _ in range(100):
            if len(await history(channel.url, key, conversation)) == 4:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.8)  # the reply ended; 0.5 s on, the channel forgets it
        proxy.down = False
        state = await until(
            browser,
            lambda s: len(s["messages"]) == 4 and s["messages"][3]["busy"] is None,
            "the reply from the history",
            seconds=15,
        )
        assert [(m["role"], m["text"]) for m in state["messages"]] == [
            ("user", "Count to sixty"),
            ("assistant", WORDS_REPLY),
            ("user", "Again"),
            ("assistant", WORDS_REPLY),
        ]
        assert state["status"] == ""
        logs = await run(browser.get_log, "browser")
        assert not [e for e in logs if "differs from the final" in e["message"]], logs


async def test_chat_page_under_its_csp(
    browser: webdriver.Chrome, redis_url: str, key_prefix: str
) -> None:
    model = Replying(text="Hello from **Acme**. See https://example.com/help.", delay=0.01)
    title = 'Acme <Help> & "Co"'
    async with http_channel(
        redis_url, key_prefix, model, widget_title=title, user_messages=1
    ) as channel:
        key = await channel.key()

        # A message that cannot be sent stays in the box, with the server's reason.
        await run(browser.get, f"{channel.url}/chat?k=1#key=pk_unknown")
        await until(browser, lambda s: s["focus"] == "pw-input", "the message box")
        await keys(browser, "Will this arrive?", Keys.ENTER)
        state = await until(browser, lambda s: s["status"], "the error")
        assert state["status"] == "Unknown or revoked API key."
        assert state["input"] == "Will this arrive?" and state["messages"] == []
        await run(browser.get_log, "browser")  # the 401 is logged: start clean

        await run(browser.get, f"{channel.url}/chat#key={key}")
        assert await run(lambda: browser.title) == title
        await until(browser, lambda s: s["focus"] == "pw-input", "the message box")
        assert await accessible(await shadow(browser, ".pw-title")) == ("heading", title)
        assert await accessible(await shadow(browser, "#pw-panel")) == ("main", title)
        assert await accessible(await shadow(browser, "textarea")) == ("textbox", "Message")
        log = await shadow(browser, ".pw-log")
        assert await run(log.get_attribute, "role") == "log"
        assert await run(log.get_attribute, "aria-live") == "polite"

        await keys(browser, "Hi there", Keys.ENTER)
        state = await until(browser, finished, "the reply")
        assert [(m["role"], m["text"]) for m in state["messages"]] == [
            ("user", "Hi there"),
            ("assistant", "Hello from Acme. See https://example.com/help."),
        ]
        rendered = await js(browser, RENDERED)
        assert rendered["strong"] == ["Acme"]
        assert [a["href"] for a in rendered["links"]] == ["https://example.com/help"]

        # Over the user's limit: Parley's notice shows, and the refused message is offered
        # again in the box.
        await keys(browser, "One more thing", Keys.ENTER)
        state = await until(browser, lambda s: s["notices"], "the notice")
        assert state["notices"] == ["rate_limited"]
        state = await until(browser, lambda s: s["input"], "the message back in the box")
        assert state["input"] == "One more thing"
        assert [(m["role"], m["unsent"]) for m in state["messages"]] == [
            ("user", False),
            ("assistant", False),
            ("user", True),
        ]
        await asyncio.sleep(0.3)  # let the Send button's transition end
        await screenshot(browser, "chat-page.png")

        await narrow(browser)
        overflow = await js(browser, "return document.documentElement.scrollWidth;")
        assert overflow <= 320
        await screenshot(browser, "chat-page-320.png")

        # No CSP violation, error or warning (Chromium's own /favicon.ico request included).
        logs = await run(browser.get_log, "browser")
        problems = [
            e
            for e in logs
            if e["level"] in ("SEVERE", "WARNING") or "Content Security Policy" in e["message"]
        ]
        assert problems == [], problems

        # Reduced motion: no animations, no transitions.
        send = await shadow(browser, ".pw-send")
        assert await run(send.value_of_css_property, "transition-duration") != "0s"
        reduce = {"features": [{"name": "prefers-reduced-motion", "value": "reduce"}]}
        await run(browser.execute_cdp_cmd, "Emulation.setEmulatedMedia", reduce)
        assert await run(send.value_of_css_property, "transition-duration") == "0s"

        # Start over forgets the conversation, here and on the server.
        conversation = await conversation_id(browser)
        await run((await shadow(browser, ".pw-restart")).click)
        state = await until(browser, lambda s: not s["messages"], "the conversation to clear")
        assert state["status"] == "Started a new conversation." and state["notices"] == []
        assert await history(channel.url, key, conversation) == []


# What the people's side of the chat shows: their replies (named) and the notices.
PEOPLE_STATE = """
const root = document.querySelector("parley-chat").shadowRoot;
return {
  agents: Array.from(root.querySelectorAll(".pw-agent"), (m) => ({
    who: m.querySelector(".pw-who").textContent,
    text: m.querySelector(".pw-bubble").innerText,
    background: getComputedStyle(m.querySelector(".pw-bubble")).backgroundColor,
  })),
  bot: getComputedStyle(root.querySelector(".pw-assistant .pw-bubble")).backgroundColor,
  log: root.querySelector(".pw-log").innerText,
};
"""


async def test_a_person_answers_in_the_web_chat(
    browser: webdriver.Chrome, redis_url: str, key_prefix: str
) -> None:
    model = Replying(text="Hello, I'm the bot.", delay=0.01)
    async with http_channel(
        redis_url, key_prefix, model, handoff=HandoffPolicy(idle_seconds=0)
    ) as channel:
        key = await channel.key()
        await run(browser.get, f"{channel.url}/chat#key={key}")
        await until(browser, lambda s: s["focus"] == "pw-input", "the message box")
        await keys(browser, "Hi", Keys.ENTER)
        await until(browser, finished, "the bot's reply")
        await keys(browser, "I'd like to talk to a human", Keys.ENTER)
        state = await until(browser, lambda s: "handed_off" in s["notices"], "the handoff notice")
        conversation = await conversation_id(browser)
        asked = len(model.prompts)

        async with httpx.AsyncClient(
            base_url=f"{channel.url}/v1/conversations/{conversation}",
            headers={"Authorization": f"Bearer {key}"},
        ) as staff:
            note = {"text": "customer since 2019", "note": True}
            assert (await staff.post("/agent-messages", json=note)).status_code == 201
            reply = {"text": "Hi, I'm **Sam** from support.", "name": "Sam"}
            assert (await staff.post("/agent-messages", json=reply)).status_code == 201

            async def people() -> dict[str, Any]:
                found: dict[str, Any] = await js(browser, PEOPLE_STATE)
                return found

            for _ in range(200):  # the widget looks for people's replies every few seconds
                shown = await people()
                if shown["agents"]:
                    break
                await asyncio.sleep(0.05)
            [agent] = shown["agents"]
            assert agent["who"] == "Sam" and agent["text"] == "Hi, I'm Sam from support."
            assert agent["background"] != shown["bot"], "a person looks unlike the bot"
            assert "customer since 2019" not in shown["log"], "notes never reach the user"

            await keys(browser, "Thanks Sam", Keys.ENTER)
            state = await until(
                browser, lambda s: s["status"] == "Sent. A person will answer here.", "the status"
            )
            assert [m["role"] for m in state["messages"]][-1] == "user"
            assert len(model.prompts) == asked, "the bot stays quiet"
            await screenshot(browser, "chat-handoff.png")

            # Reloaded, the page shows the person's reply from the history.
            await run(browser.refresh)
            await until(browser, lambda s: len(s["messages"]) >= 5, "the history")
            assert [a["who"] for a in (await people())["agents"]] == ["Sam"]

            assert (await staff.delete("/handoff")).status_code == 204
        await keys(browser, "Are you the bot?", Keys.ENTER)
        state = await until(
            browser, lambda s: reply_of(s) == "Hello, I'm the bot." and finished(s), "the bot"
        )
        assert len(model.prompts) == asked + 1
