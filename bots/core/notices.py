"""What Parley itself tells users: notice texts, waits said plainly, failures explained."""

from __future__ import annotations

import logging
import time

from bots.core.models import Admission, Notice, NoticeKind
from bots.core.ports import (
    AdapterUnknown,
    KnowledgeMissing,
    KnowledgeUnavailable,
    ModelError,
    ModelInterrupted,
    ModelRejected,
    ModelTimedOut,
)

log = logging.getLogger(__name__)

_NOTICES = {
    NoticeKind.EMPTY_MESSAGE: "Send me some text and I'll answer.",
    NoticeKind.MODEL_UNAVAILABLE: (
        "The model is unavailable right now. Your message is kept; try again in a moment."
    ),
    NoticeKind.MODEL_REJECTED: (
        "The model server refused the request; an operator should check its configuration. "
        "Your message is kept."
    ),
    NoticeKind.REPLY_INTERRUPTED: (
        "The reply was cut off by the model server. Your message is kept; try again."
    ),
    NoticeKind.MODEL_TIMED_OUT: (
        "The model took too long to answer. Your message is kept; try again in a moment."
    ),
    NoticeKind.STORE_UNAVAILABLE: (
        "I can't reach my conversation memory right now; try again in a moment."
    ),
    NoticeKind.QUEUED: "Many people are talking to me right now; you're in line.",
    NoticeKind.KNOWLEDGE_UNAVAILABLE: (
        "I can't search my documentation right now. Your message is kept; try again in a moment."
    ),
    NoticeKind.HANDED_OFF: "A person will answer here; I'll stay quiet.",
    NoticeKind.HANDED_BACK: "You're talking with the bot again.",
}
KNOWLEDGE_GONE = (
    "The knowledge base chosen here does not exist any more; an admin can pick another "
    "with /kb use <name>. Your message is kept."
)
SHORTENED = (
    "Your message is longer than I can read at once; I read its first {read:,} of {whole:,} "
    "characters."
)
NOT_SAVED = "I couldn't save this exchange, so I may not remember it."
ADAPTER_GONE = (
    "The adapter chosen here is not served any more; an admin can pick another. "
    "Your message is kept."
)


def notice(kind: NoticeKind, text: str | None = None, retry_after: float | None = None) -> Notice:
    """Build the user-facing notice of a kind, with its standard text unless one is given."""
    return Notice(kind, text if text is not None else _NOTICES[kind], retry_after)


def shortened_notice(read: int, whole: int) -> Notice:
    """Tell a user their message was cut, and how many of its characters were read."""
    return notice(NoticeKind.MESSAGE_SHORTENED, SHORTENED.format(read=read, whole=whole))


def knowledge_notice(error: KnowledgeUnavailable) -> Notice:
    """Tell a user the documentation could not be searched, and why in their terms."""
    if isinstance(error, KnowledgeMissing):
        return notice(NoticeKind.KNOWLEDGE_UNAVAILABLE, KNOWLEDGE_GONE)
    return notice(NoticeKind.KNOWLEDGE_UNAVAILABLE)


def wait_text(seconds: float) -> str:
    """Say a wait the way people do: "12 s", "3 min", "5 h 20 min"."""
    seconds = max(1, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(-(-seconds // 60), 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def limited_notice(admission: Admission) -> Notice:
    """Tell a refused user which limit they met and when to try again."""
    kind = NoticeKind.RATE_LIMITED
    if admission.reason == "budget":
        kind = NoticeKind.BUDGET_SPENT
        wording = "You've used today's tokens; the count starts again in {wait} (midnight UTC)."
    elif admission.reason == "conversation":
        wording = "This conversation is getting more messages than I can answer; try in {wait}."
    else:
        wording = "You're sending messages faster than I can answer; try again in {wait}."
    wait = admission.retry_after
    text = wording.format(wait=wait_text(wait))
    return Notice(kind, text, wait, wording, time.monotonic() + wait)


def shown_text(notice: Notice) -> str:
    """A notice's text as it should read now: a wait counts down from when it was said."""
    if notice.wording is None or notice.until is None:
        return notice.text
    return notice.wording.format(wait=wait_text(max(0.0, notice.until - time.monotonic())))


def model_notice(error: ModelError) -> Notice:
    """Tell the user what a failed model call means for them (and log it)."""
    log.warning("model call failed: %s", error)
    if isinstance(error, AdapterUnknown):
        return notice(NoticeKind.MODEL_REJECTED, ADAPTER_GONE)
    if isinstance(error, ModelRejected):
        return notice(NoticeKind.MODEL_REJECTED)
    if isinstance(error, ModelTimedOut):
        return notice(NoticeKind.MODEL_TIMED_OUT)
    if isinstance(error, ModelInterrupted):
        return notice(NoticeKind.REPLY_INTERRUPTED)
    return notice(NoticeKind.MODEL_UNAVAILABLE)
