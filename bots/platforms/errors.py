"""The error every platform raises when its configuration is refused (imports nothing)."""


class PlatformSetupError(RuntimeError):
    """A platform refused the bot's configuration; the message says what to change."""
