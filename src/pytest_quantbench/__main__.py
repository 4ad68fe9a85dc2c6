"""``python -m pytest_quantbench COMMAND …``: the plugin's commands outside a pytest run.

Each command is a ``module:function`` taking the remaining arguments and returning the exit
status; its module is imported only when the command runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: Command name -> "module:function" (relative to this package), one line per command.
COMMANDS = {
    "merge": "merge:main",
    "cache": "cachecli:main",
    "recipe": "recipes_cli:main",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its command; exit 4 with the list of commands when unknown."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        print(
            f"usage: python -m pytest_quantbench {{{','.join(COMMANDS)}}} ...\n"
            f"{given}commands: {', '.join(COMMANDS)} (each takes --help)",
            file=sys.stderr if given or not argv else sys.stdout,
        )
        return 4 if given or not argv else 0
    module, function = COMMANDS[argv[0]].split(":")
    command = getattr(importlib.import_module(f".{module}", __package__), function)
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
