"""`python -m bots keys`: create, list and revoke the HTTP channel's API keys."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys

from bots.core.ports import StoreUnavailable
from bots.kb import kb_name
from bots.runtime import open_redis
from bots.settings import BotSettings, SettingsError, load_settings
from bots.store.keys import RedisApiKeys
from bots.store.knowledge import RedisKnowledge


async def run(settings: BotSettings, args: argparse.Namespace) -> int:
    async with open_redis(settings.redis, settings.data_dir) as redis:
        keys = RedisApiKeys(redis, prefix=settings.redis.key_prefix)
        if args.action == "create":
            index = RedisKnowledge(redis, prefix=settings.redis.key_prefix)
            if args.kb is not None and not await index.exists(args.kb):
                print(
                    f"parley: there is no knowledge base {args.kb!r}; add documents to it "
                    "first with `python -m bots kb add`",
                    file=sys.stderr,
                )
                return 2
            key, integration = await keys.create(
                args.integration, messages=args.messages, window=args.window, knowledge=args.kb
            )
            print(key)
            print(
                f"created key {integration.key_id} for {integration.name}; it is shown once, "
                "store it now",
                file=sys.stderr,
            )
        elif args.action == "list":
            for found in await keys.list():
                created = datetime.datetime.fromtimestamp(found.created, datetime.UTC)
                quota = (
                    f"{found.messages}/{found.window or 'default'}s"
                    if found.messages
                    else "default"
                )
                when = f"{created:%Y-%m-%d %H:%M} UTC"
                kb = f"  kb {found.knowledge}" if found.knowledge else ""
                print(f"{found.key_id}  {found.name}  created {when}  quota {quota}{kb}")
        else:
            revoked = await keys.revoke(args.which)
            print(
                f"revoked {revoked} key(s): refused from now on by every replica"
                if revoked
                else f"no key or integration named {args.which!r}; nothing revoked",
                file=sys.stderr,
            )
            return 0 if revoked else 1
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bots keys", description="API keys of the HTTP channel's integrations."
    )
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key for an integration; prints it once")
    create.add_argument("integration", help="name: lowercase letters, digits, - and _")
    create.add_argument(
        "--messages", type=int, help="messages per window (default HTTP_KEY_MESSAGES)"
    )
    create.add_argument("--window", type=float, help="window seconds (default HTTP_KEY_WINDOW)")
    create.add_argument(
        "--kb", type=kb_name, help="the knowledge base its conversations answer from"
    )
    actions.add_parser("list", help="list keys: id, integration, creation, quota")
    revoke = actions.add_parser("revoke", help="revoke one key (by id) or an integration's keys")
    revoke.add_argument("which", help="a key id from `list`, or an integration name")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(BotSettings)
        return asyncio.run(run(settings, args))
    except (SettingsError, ValueError, StoreUnavailable) as error:
        print(f"parley: {error}", file=sys.stderr)
        return 2
