"""Every error the toolkit raises on purpose derives from CompressError; the CLI prints it as one line, exit 2."""

MAX_MESSAGE_CHARS = 300


class CompressError(Exception):
    """A problem with the user's input or request, explained in one line."""


class DataError(CompressError):
    """A data source that cannot be read or does not have the expected layout."""


class ConfigError(CompressError):
    """A setting out of range, an unknown name, or a malformed recipe."""


class ModelError(CompressError):
    """A model file that cannot be loaded, or a model a technique cannot handle."""


class ExportError(CompressError):
    """A model that cannot be converted, or an exported file that fails its parity check."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's text (or its type's name), cut to `limit` characters.

    Library errors can hold a whole model config on one line; the user needs the gist, and --debug shows the rest.
    """
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def listed(items: list[str], shown: int = 4, separator: str = ", ") -> str:
    """The first `shown` items joined, the rest counted: a refusal naming many layers stays one short line."""
    rest = len(items) - shown
    return separator.join(items[:shown]) + (f"{separator}and {rest} more" if rest > 0 else "")
