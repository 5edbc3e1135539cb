"""The web chat: /widget.js and /widget.css for any site to embed, /chat as a page."""

from __future__ import annotations

import html
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response

WIDGET_FILES = resources.files("bots.platforms.http") / "widget"
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'"
)
STATIC_HEADERS = {"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True, slots=True)
class Widget:
    """The widget's files, read once: its script, its style, and the page titled for this site."""

    script: bytes
    style: bytes
    page: str

    @classmethod
    def load(cls, title: str) -> Widget:
        page = (WIDGET_FILES / "chat.html").read_text().replace("{{title}}", html.escape(title))
        script = (WIDGET_FILES / "widget.js").read_bytes()
        return cls(script, (WIDGET_FILES / "widget.css").read_bytes(), page)


router = APIRouter(include_in_schema=False)


def widget(request: Request) -> Widget:
    found: Widget = request.app.state.widget
    return found


@router.get("/widget.js")
async def script(request: Request) -> Response:
    return Response(widget(request).script, media_type="text/javascript", headers=STATIC_HEADERS)


@router.get("/widget.css")
async def style(request: Request) -> Response:
    return Response(widget(request).style, media_type="text/css", headers=STATIC_HEADERS)


@router.get("/chat")
async def chat_page(request: Request) -> Response:
    headers = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"}
    return Response(widget(request).page, media_type="text/html", headers=headers)


@router.get("/")
async def home() -> Response:
    return RedirectResponse("/chat")


@router.get("/favicon.ico")
async def favicon() -> Response:  # browsers ask; "no icon" beats a 404 in their console
    return Response(status_code=204, headers={"Cache-Control": "public, max-age=86400"})


@router.get("/robots.txt")
async def robots() -> Response:
    return PlainTextResponse("User-agent: *\nDisallow: /\n")
