"""What every qwen-min command line shares: `--help` that shows each flag's default, and old flag
names that keep working (hidden from --help) with a line naming the new one."""

import argparse
import sys


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with ' (default: X)' after each flag that has a default to show.

    Flags without one (None, False, a store_true switch) and help texts that already say their
    default in words are left as they are."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Renamed(argparse.Action):
    """An old spelling of a flag: stores into the new flag's dest, after one line saying the new name."""

    def __init__(self, option_strings, dest, new=None, values=None, **kwargs):
        self.new, self.values = new, values or {}
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        value = self.values.get(value, value)
        noted = parser.__dict__.setdefault("renamed_noted", set())  # once per parser, though a script may parse twice
        if option_string not in noted:
            noted.add(option_string)
            print(f"note: {option_string} is now {self.new}{'' if value is None else ' ' + str(value)}; the old name will go.",
                  file=sys.stderr)
        setattr(namespace, self.dest, value)


def renamed(parser, old, new, values=None):
    """Keeps flag `old` working as a hidden alias of the already-added flag `new`, mapping old
    `values` ({old: new}) to the new flag's; its value is checked as the new flag's is."""
    target = next(a for a in parser._actions if new in a.option_strings)
    choices = None if target.choices is None else list(target.choices) + list(values or {})
    parser.add_argument(old, dest=target.dest, action=_Renamed, new=new, values=values, type=target.type,
                        choices=choices, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
