"""The command-line conventions every tool of the project follows, data/'s and modeling/'s too."""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a usage mistake reported like every other mistake: one `error:` line that
    names the fix, exit code 1 (argparse's own 2 would read as 'non-finite steps' here)."""

    def error(self, message: str):
        self.exit(1, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def comma_choices(parser: argparse.ArgumentParser, flag: str, text: str, choices) -> list[str]:
    """The comma-separated names in `text`; a name not in `choices` is a usage error naming them."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in choices]
    if unknown:
        parser.error(f"unknown {flag} {unknown}; choose from {', '.join(choices)}")
    return names
