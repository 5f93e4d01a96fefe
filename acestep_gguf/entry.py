"""The console script: imports the CLI (typer, rich) inside a guard, so that Ctrl-C at any moment —
start-up included — ends with "interrupted" and exit code 130, never a traceback."""

import sys


def main() -> None:
    try:
        from .cli import main as cli_main
        cli_main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
