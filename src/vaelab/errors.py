"""The project's own errors: each carries a one-line message that names the file or option."""


class VaelabError(Exception):
    """Base of every error vaelab raises on purpose; the CLI prints it as one line, exit 2."""


class DataError(VaelabError):
    """A data source is missing, corrupt or inconsistent (names the file and what is wrong)."""


class ConfigError(VaelabError):
    """An option, preset or config file is unknown or has an impossible value."""


class RunError(VaelabError):
    """A run directory is missing, not a run, locked by a live trainer, or corrupt."""


def one_line(e: BaseException, limit: int | None = None) -> str:
    """A foreign exception's message on one line (at most `limit` characters), or its type's
    name when it has none: the reason in parentheses of vaelab's own messages."""
    return " ".join(str(e).split())[:limit] or type(e).__name__
