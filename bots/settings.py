"""Configuration of the bot process, from the environment and `.env`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bots.core.handoff import DEFAULT_PHRASES


def parse_words(value: object) -> object:
    """Read "a, b c" (as an environment variable gives it) into a tuple of words."""
    if isinstance(value, str):
        return tuple(value.replace(",", " ").split())
    return value


Words = Annotated[tuple[str, ...], NoDecode, BeforeValidator(parse_words)]


class RedisSettings(BaseModel):
    url: SecretStr | None = Field(
        default=None, description="redis:// or rediss:// URL; unset runs an embedded Redis."
    )
    key_prefix: str = Field(default="parley", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    context_max_turns: int = Field(default=200, ge=2)
    context_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60)
    max_connections: int = Field(default=256, ge=1, description="Connections per bot process.")
    line_lease_seconds: float = Field(
        default=10.0,
        ge=1,
        le=300,
        description="A replica that dies while answering frees its conversation after this "
        "long; a living one renews its lease every quarter of it.",
    )
    sentinels: Annotated[
        tuple[Annotated[str, Field(pattern=r"^\S+:\d{1,5}$")], ...],
        NoDecode,
        BeforeValidator(parse_words),
    ] = Field(default=(), description="host:port of Redis Sentinels; then REDIS_URL is unused.")
    sentinel_master: str = Field(default="mymaster", description="The master's name.")
    password: SecretStr | None = Field(
        default=None, description="Password of the Redis master found through Sentinel."
    )


class LLMSettings(BaseModel):
    base_url: str | None = Field(
        default=None,
        description="OpenAI-compatible base URL, e.g. http://inference:8000/v1; "
        "unset starts the local inference service.",
    )
    api_key: SecretStr = SecretStr("")
    model: str = "parley"
    reply_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    context_tokens: int | None = Field(default=None, ge=64)
    connect_timeout: float = Field(default=3.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    retry_deadline: float = Field(default=4.0, ge=0)


class ChatSettings(BaseModel):
    system_prompt: str = Field(
        default="", description="Empty keeps the model's own default system prompt."
    )
    group_conversation: Literal["channel", "user"] = Field(
        default="channel", description="In groups, one conversation per channel or per member."
    )
    trim_target: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Share of the context a prompt keeps after a trim; 1.0 = sliding window.",
    )
    max_message_chars: int = Field(default=16_000, ge=100)
    max_persona_chars: int = Field(default=4_000, ge=10)
    collect_default: bool = Field(
        default=False, description="Export conversations for training unless an admin opts out."
    )
    show_reasoning: bool = Field(
        default=False, description="Stream <think> blocks to users; they are never stored."
    )


class LimitsSettings(BaseModel):
    """Limits shared by every bot replica (kept in Redis); 0 turns a limit off."""

    user_messages: int = Field(default=20, ge=0, description="Messages per user per window.")
    user_window: float = Field(default=60.0, gt=0, description="Seconds.")
    conversation_messages: int = Field(default=60, ge=0)
    conversation_window: float = Field(default=60.0, gt=0)
    daily_tokens: int = Field(default=0, ge=0, description="Tokens per user per UTC day.")
    max_in_flight: int = Field(default=64, ge=1, description="Model requests at once.")


def parse_ids(value: object) -> object:
    """Read "1, 2 3" (as an environment variable gives it) into a set of ids."""
    if isinstance(value, str):
        return frozenset(int(part) for part in value.replace(",", " ").split())
    return value


IdSet = Annotated[frozenset[int], NoDecode, BeforeValidator(parse_ids)]


class DiscordSettings(BaseModel):
    token: SecretStr | None = Field(default=None, description="Bot token; set to run the bot.")
    api_base_url: str | None = Field(
        default=None, description="Discord REST base, e.g. a REST proxy; unset: Discord's own."
    )
    gateway_url: str | None = Field(
        default=None, description="Discord gateway URL, e.g. a gateway proxy; unset: Discord's."
    )
    open_channels: IdSet = Field(
        default=frozenset(), description="Channels where every message is answered."
    )
    allow_dms: bool = True
    allow_guilds: IdSet = frozenset()
    deny_guilds: IdSet = frozenset()
    allow_channels: IdSet = frozenset()
    deny_channels: IdSet = frozenset()
    allow_roles: IdSet = frozenset()
    deny_roles: IdSet = frozenset()
    allow_users: IdSet = frozenset()
    deny_users: IdSet = frozenset()
    admins: IdSet = Field(
        default=frozenset(),
        description="Users who may set personas and reset shared conversations, besides "
        "members with the Manage Channels permission.",
    )
    shutdown_seconds: float = Field(
        default=20.0, ge=0, description="On SIGTERM, replies in progress get this long to end."
    )
    shard_count: int | None = Field(
        default=None, ge=1, description="Total shards of the bot; unset: one connection."
    )
    shard_ids: str | None = Field(
        default=None,
        pattern=r"^(ordinal|\d+( *, *\d+)*)$",
        description='This process\'s shards: "0,1", or "ordinal" for the number ending '
        "HOSTNAME (a StatefulSet pod's ordinal).",
    )
    staff_channel: int | None = Field(
        default=None,
        description="Text channel where staff answer conversations handed to people, a "
        "thread each; unset: none on Discord.",
    )
    staff_role: int | None = Field(
        default=None, description="Role pinged once when a thread opens; unset: no ping."
    )


class TelegramSettings(BaseModel):
    token: SecretStr | None = Field(default=None, description="Bot token from @BotFather.")
    base_url: str | None = Field(
        default=None, description="Bot API base, e.g. a local Bot API server; unset: Telegram's."
    )
    trigger_prefix: str | None = Field(
        default=None, description="In groups, also answer messages starting with this."
    )
    allowed_users: IdSet = frozenset()
    allowed_chats: IdSet = frozenset()
    admins: IdSet = frozenset()
    poll_timeout: int = Field(default=10, ge=0, le=50, description="Long-poll seconds.")
    webhook_url: str | None = Field(
        default=None, description="Public HTTPS URL of the webhook; unset: long polling."
    )
    webhook_secret: SecretStr | None = None
    webhook_listen: str = "0.0.0.0"
    webhook_port: int = Field(default=8443, ge=1, le=65535)
    shutdown_seconds: float = Field(
        default=20.0, ge=0, description="On SIGTERM, replies in progress get this long to end."
    )
    answer_channel_posts: bool = Field(
        default=False, description="Answer posts in channels the bot is in; off: stay silent."
    )
    staff_chat: int | None = Field(
        default=None,
        description="Group where staff answer conversations handed to people; unset: none.",
    )


class HttpSettings(BaseModel):
    """The HTTP channel: an API for integrations and the embeddable web chat."""

    enabled: bool = Field(
        default=False, description="`python -m bots run` serves the HTTP channel too."
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on; 0.0.0.0: all.")
    port: int = Field(default=8080, ge=1, le=65535)
    cors_origins: Words = Field(
        default=(), description="Web origins whose pages may call the API, e.g. the widget's."
    )
    max_body_bytes: int = Field(default=65_536, ge=1_024, description="Largest request body.")
    max_header_bytes: int = Field(
        default=16_384, ge=1_024, description="Largest request line and headers together."
    )
    header_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a client has to send a request's headers."
    )
    body_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a client has to send a whole body after them."
    )
    key_messages: int = Field(
        default=600, ge=0, description="Messages per API key per window, unless the key says."
    )
    key_window: float = Field(default=60.0, gt=0, description="Seconds.")
    reply_keep_seconds: float = Field(
        default=120.0, ge=0, description="A finished reply can be streamed again this long."
    )
    shutdown_seconds: float = Field(
        default=20.0, ge=0, description="On SIGTERM, replies in progress get this long to end."
    )
    webhook_url: str | None = Field(
        default=None,
        description="Each finished reply, and each handoff to people and back, is POSTed "
        "here, signed; unset: none.",
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="HMAC-SHA256 key of the webhook's signature."
    )
    webhook_retry_hours: float = Field(
        default=24.0,
        gt=0,
        description="A delivery the receiver keeps refusing is dropped after this.",
    )
    webhook_retry_max_seconds: float = Field(
        default=60.0, gt=0, description="The longest wait between two attempts of a delivery."
    )
    consumer: str | None = Field(
        default=None,
        description="This replica's name in the webhook's delivery queue, the same across "
        "its restarts; unset: the host name.",
    )
    widget_title: str = Field(default="Chat with us", min_length=1, max_length=80)


class KnowledgeSettings(BaseModel):
    """Knowledge bases: answers from the operator's documents (`python -m bots kb`)."""

    default: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="Knowledge base every conversation answers from unless /kb says otherwise.",
    )
    embed_base_url: str | None = Field(
        default=None,
        description="OpenAI-compatible base URL of the embedding model; unset starts the "
        "local one when a knowledge base exists.",
    )
    embed_api_key: SecretStr = SecretStr("")
    embed_model: str = "parley-embed"
    embed_max_tokens: int = Field(
        default=256, ge=16, description="Longer texts are cut to this many tokens when embedded."
    )
    passage_tokens: int = Field(
        default=200, ge=32, description="Tokens per passage at most, its title path included."
    )
    overlap_tokens: int = Field(default=32, ge=0, description="Tokens a passage repeats.")
    max_document_mb: float = Field(default=20.0, gt=0, description="Larger files are refused.")
    top_k: int = Field(default=4, ge=1, le=20, description="Passages an answer is given at most.")
    threshold: float = Field(
        default=0.5,
        ge=-1,
        le=2,
        description="Least relevance a passage needs: cosine, plus up to 0.25 for the "
        "question's words it holds when re-scored.",
    )
    rescore: bool = Field(default=True, description="Re-score candidates by shared words.")
    free_answers: bool = Field(
        default=False,
        description="With nothing relevant found, the model answers anyway; off: NO_ANSWER.",
    )
    no_answer: str = Field(
        default="I don't have that in my documentation.",
        min_length=1,
        description="The answer when nothing relevant is found (and free answers are off).",
    )


class ChatwootSettings(BaseModel):
    """Parley as the agent bot of a Chatwoot help desk (`python -m bots chatwoot`)."""

    url: str | None = Field(
        default=None,
        description="Chatwoot's address, e.g. https://support.example.com; set to run.",
    )
    bot_token: SecretStr | None = Field(
        default=None, description="The agent bot's access token (Settings > Bots in Chatwoot)."
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="The agent bot's secret (Chatwoot 4.13+): webhooks must carry its signature.",
    )
    url_secret: SecretStr | None = Field(
        default=None,
        description="Older Chatwoot: a secret the bot's URL carries (…/chatwoot?secret=…).",
    )
    accounts: IdSet = Field(default=frozenset(), description="Chatwoot account ids served.")
    inboxes: IdSet = Field(default=frozenset(), description="Inbox ids served; empty: all.")
    host: str = Field(default="127.0.0.1", description="Address of the webhook; 0.0.0.0: all.")
    port: int = Field(default=8090, ge=0, le=65535)
    handoff_team: int | None = Field(
        default=None, description="Team a handed-off conversation is assigned to."
    )
    kb: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="Knowledge base Chatwoot conversations answer from; unset: KB_DEFAULT.",
    )
    max_chars: int = Field(
        default=4000, ge=100, description="Longer replies are posted as several messages."
    )
    typing: bool = Field(default=True, description='Show "typing…" while the model works.')
    retry_hours: float = Field(
        default=24.0, gt=0, description="A reply Chatwoot keeps refusing is dropped after this."
    )
    retry_max_seconds: float = Field(
        default=60.0, gt=0, description="The longest wait between two attempts of a delivery."
    )
    consumer: str | None = Field(
        default=None,
        description="This replica's name in the delivery queue, the same across its "
        "restarts; unset: the host name.",
    )


class HandoffSettings(BaseModel):
    """Handing conversations to people, where a staff place or help desk is set up."""

    phrases: tuple[str, ...] = Field(
        default=DEFAULT_PHRASES,
        description="A message holding one of these (any case) asks for a person; "
        'a JSON list, e.g. ["talk to a human", "agent please"]; [] turns phrases off.',
    )
    idle_seconds: float = Field(
        default=3600.0, ge=0, description="A handed-off conversation silent this long comes "
        "back to the bot; 0: only staff (or /bot) hand it back.",
    )  # fmt: skip
    after_failures: int = Field(
        default=3, ge=0, description="Messages in a row left unanswered (the model failed, or "
        "the knowledge base had nothing) that hand the conversation off; 0: never.",
    )  # fmt: skip
    on_no_answer: Literal["offer", "hand_off", "never"] = Field(
        default="offer",
        description="When the knowledge base has nothing: offer a person (/human), hand off "
        "at once, or neither.",
    )


class OpsSettings(BaseModel):
    """Each bot process's endpoints for its operators: /healthz, /readyz, /metrics."""

    host: str = Field(default="127.0.0.1", description="0.0.0.0 in a container.")
    port: int = Field(default=9464, ge=0, le=65535, description="0: no endpoints.")


class ConsoleSettings(BaseModel):
    conversation: str = Field(default="local", min_length=1)


class BotSettings(BaseSettings):
    """Everything the bot process reads; variables are named SECTION_FIELD, e.g. REDIS_URL."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
    )

    data_dir: Path = Path("data")
    log_level: str = Field(default="WARNING", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    log_format: Literal["text", "json"] = "text"
    redis: RedisSettings = RedisSettings()
    llm: LLMSettings = LLMSettings()
    chat: ChatSettings = ChatSettings()
    limits: LimitsSettings = LimitsSettings()
    console: ConsoleSettings = ConsoleSettings()
    http: HttpSettings = HttpSettings()
    ops: OpsSettings = OpsSettings()
    kb: KnowledgeSettings = KnowledgeSettings()
    handoff: HandoffSettings = HandoffSettings()
    chatwoot: ChatwootSettings = ChatwootSettings()
    discord: DiscordSettings = DiscordSettings()
    telegram: TelegramSettings = TelegramSettings()


class SettingsError(Exception):
    """The configuration is invalid; the message names each bad variable."""


Settings = TypeVar("Settings", bound=BaseSettings)


def env_name(settings: type[BaseSettings], loc: tuple[int | str, ...]) -> str:
    """Name the environment variable behind an error location."""
    field = settings.model_fields.get(str(loc[0]))
    alias = field.validation_alias if field else None
    if isinstance(alias, AliasChoices):
        alias = alias.choices[0]
    if isinstance(alias, str):
        return alias.upper()
    prefix = settings.model_config.get("env_prefix", "")
    return (prefix + "_".join(str(part) for part in loc)).upper()


def env_names(settings: type[BaseSettings]) -> list[str]:
    """List every environment variable a settings class reads."""
    names = []
    for field_name, field in settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += [env_name(settings, (field_name, sub)) for sub in annotation.model_fields]
        else:
            names.append(env_name(settings, (field_name,)))
    return names


def load_settings(settings: type[Settings]) -> Settings:
    """Read settings, turning validation errors into one line per variable (values never shown)."""
    try:
        return settings()
    except ValidationError as error:
        lines = [f"  {env_name(settings, e['loc'])}: {e['msg']}" for e in error.errors()]
        raise SettingsError("invalid configuration:\n" + "\n".join(lines)) from None
