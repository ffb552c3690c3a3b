"""argparse help shared by every `esd` sub-command.

A module of its own so that `esd.cli` and the feature modules that register sub-commands (`esd.app`, ...)
can all use it: `esd.cli` imports those modules, so they cannot import from `esd.cli`.
"""

from __future__ import annotations

import argparse


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Help that states each flag's default once, and only a default worth stating.

    argparse's ArgumentDefaultsHelpFormatter appends "(default: X)" to every flag, also to help texts that
    already say what the default means ("(default: the shipped testbed)") and to flags whose default is
    None or "" (which reads "(default: None)", "(default: )").
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "%(default)" in text:  # the help says it already (or argparse will)
            return text
        if action.default in (None, "", argparse.SUPPRESS):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional has no default
        return f"{text} (default: %(default)s)"


class GroupedHelpFormatter(DefaultsOnceFormatter, argparse.RawDescriptionHelpFormatter):
    """DefaultsOnceFormatter keeping the description's own line breaks (its paragraphs explain the layers)."""
