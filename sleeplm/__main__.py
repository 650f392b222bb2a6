"""`python -m sleeplm <command>`."""

from __future__ import annotations

import sys

COMMANDS = {"demo": "sleeplm.demo"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m sleeplm {{{','.join(COMMANDS)}}} [options]  (got {argv[:1] or 'nothing'})")
    module = __import__(COMMANDS[argv[0]], fromlist=["main"])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
