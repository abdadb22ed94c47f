"""User-facing errors and the CLI wrapper that turns them into one clear line."""

from __future__ import annotations

import reprlib
import sys
import warnings
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A mistake in the user's input (paths, configs, weights): reported as one line, no traceback."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a CLI entry point; a `UserError` prints `error: ...` on stderr and exits with status 2.
    Python warnings print as one `warning: ...` line (no source line)."""
    warnings.formatwarning = one_line_warning
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    """`warnings.formatwarning` for the CLIs: `warning: MESSAGE (Category)`."""
    return f"warning: {message} ({category.__name__})\n"


def shown(value: Any, limit: int = 60) -> str:
    """repr of a user's value for an error message, cut to `limit` characters (it may be huge)."""
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
