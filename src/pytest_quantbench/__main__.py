"""``python -m pytest_quantbench <subcommand> …``: the plugin's command-line tools.

Each subcommand lives in its own module and is imported only when called.
"""

from __future__ import annotations

import importlib
import sys

#: subcommand → "module:function"; the function takes argv (a list) and returns an exit code.
SUBCOMMANDS = {
    "recipe": "pytest_quantbench.recipes_cli:main",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; exit 4 (usage) for a missing or unknown one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        given = f"unknown subcommand {argv[0]!r}; " if argv and not argv[0].startswith("-") else ""
        print(f"usage: python -m pytest_quantbench {{{','.join(sorted(SUBCOMMANDS))}}} …\n"
              f"{given}subcommands: {', '.join(sorted(SUBCOMMANDS))}", file=sys.stderr)
        return 4
    module, function = SUBCOMMANDS[argv[0]].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
