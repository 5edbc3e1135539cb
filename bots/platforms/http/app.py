"""The HTTP channel's web application: the integrations' API and the web chat widget."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from bots.core.ports import ApiKeys
from bots.core.service import ConversationService
from bots.platforms.http import api, web
from bots.platforms.http.errors import EXCEPTION_HANDLERS, BodyLimit
from bots.platforms.http.replies import ReplyHub
from bots.platforms.http.serving import HttpServing, Quota
from bots.settings import HttpSettings


def create_app(
    service: ConversationService,
    keys: ApiKeys,
    hub: ReplyHub,
    settings: HttpSettings,
    quota: Quota | None = None,
) -> FastAPI:
    """Build the API and the widget's routes around one conversation service."""
    app = FastAPI(
        title="Parley HTTP channel",
        version="1",
        summary="Chat with Parley's model from your own product: replies stream as SSE.",
        docs_url=None,
        redoc_url=None,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.serving = HttpServing(service, keys, hub, settings, quota)
    app.state.widget = web.Widget.load(settings.widget_title)
    app.include_router(api.router)
    app.include_router(web.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        expose_headers=["Retry-After", "X-Reply-Id"],
        max_age=600,
    )
    return app
