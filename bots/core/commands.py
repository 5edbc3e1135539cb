"""The commands every platform shares, and how a message is read as one."""

from __future__ import annotations

import re
from dataclasses import dataclass

HELP_TEXT = (
    "Talk to me and I answer, remembering this conversation.\n"
    "/reset    forget this conversation and start over\n"
    "/retry    answer your last message again\n"
    "/usage    how many tokens you have used today\n"
    "/persona  show who I am here; admins: /persona set <text>, /persona clear\n"
    "/adapter  show the fine-tuned model answering here; admins: /adapter <name>, /adapter off\n"
    "/collect  show whether this conversation may train me; admins: /collect on, /collect off\n"
    "/help     show this help"
)

# "/name", "/name@bot" (Telegram's form in groups), then arguments after a space. A
# path such as "/usr/bin" is not a command: a slash right after the name is not allowed.
_COMMAND = re.compile(r"/([A-Za-z][A-Za-z0-9_]*)(?:@\w+)?(?:\s+(.*))?", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # lower case, without the slash
    args: str


def parse_command(text: str) -> Command | None:
    """Read a message as a command, or return None when it is an ordinary message."""
    match = _COMMAND.fullmatch(text.strip())
    if match is None:
        return None
    return Command(match[1].lower(), (match[2] or "").strip())
