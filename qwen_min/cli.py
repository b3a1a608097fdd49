"""What every qwen-min command line shares: `--help` that shows each flag's default."""

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with ' (default: X)' after each flag that has a default to show.

    Flags without one (None, False, a store_true switch) and help texts that already say their
    default in words are left as they are."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"
