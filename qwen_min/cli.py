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
        hidden = action.default is None or action.default is False or action.default is argparse.SUPPRESS  # `is`: 0 == False
        if "default" in text or hidden or not action.option_strings:
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


def read_config(path) -> dict:
    """A --config file -> {flag name: value}: TOML (.toml), YAML (.yaml, .yml; needs PyYAML), or JSON (a run's args.json)."""
    import json
    from pathlib import Path

    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file; give a TOML, YAML or JSON file of flag values (a run's args.json works).")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            import tomllib  # Python 3.11+

            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UserError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or write the file as TOML or JSON.") from None
            values = yaml.safe_load(text)  # safe_load: a config file can never run code
        else:
            values = json.loads(text)
    except UserError:
        raise
    except ImportError:
        raise UserError(f"--config {path}: reading TOML needs Python 3.11 or later; write the file as JSON instead.") from None
    except Exception as e:  # the parsers' own error types differ (tomllib, yaml, json); all mean a malformed file
        raise UserError(f"--config {path} is not valid {suffix.lstrip('.').upper() or 'JSON'} ({str(e).splitlines()[0][:80]}); fix the file.") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path} holds a {type(values).__name__}, not a table of flag names and values.")
    return values


def parse_with_config(parser, argv=None, skip=()):
    """parser.parse_args(argv) after `with_config`; a bad config file is a usage error (exit 2), as a bad flag is."""
    from .errors import UserError

    try:
        with_config(parser, argv, skip)
    except UserError as e:
        parser.error(str(e).rstrip("."))
    return parser.parse_args(argv)


def with_config(parser, argv, skip=()):
    """If argv names `--config FILE`, the file's values become the parser's defaults, so the flags given
    on the command line still win. Keys are flag names with '-' or '_' ('lora-rank' or 'lora_rank');
    `skip` keys are ignored (what a script records in args.json but no flag sets). Returns the file's
    values ({} without --config)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return {}
    from .errors import UserError

    values = read_config(known.config)
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    defaults = {}
    for key, value in values.items():
        if key in skip:
            continue
        action = by_flag.get("--" + str(key).replace("_", "-"))
        if action is None or action.dest in ("help", "config"):
            hint = " (a model's config.json? give it as --model)" if key in ("hidden_size", "model_type") else ""
            raise UserError(f"--config {known.config}: '{key}' is not a flag of this script{hint}; see --help for the names.")
        if isinstance(action, _Renamed):
            value = action.values.get(value, value)
        defaults[action.dest] = config_value(action, key, value, known.config)
    parser.set_defaults(**defaults)
    return values


def config_value(action, key, value, path):
    """A config file's value for one flag, checked as argparse checks the flag's text: one sentence when wrong."""
    from .errors import UserError

    def refuse(why):
        raise UserError(f"--config {path}: '{key}' is {value!r}; {why}.")

    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            refuse("it is a switch: give true or false")
        return value
    if value is None:
        if action.default is not None:
            refuse(f"--{key} needs a value (leave the key out for its default)")
        return None
    if action.nargs in ("+", "*"):
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            refuse(f"--{key} takes a list")
        return [config_value(argparse.Action([], action.dest, type=action.type, choices=action.choices), key, v, path)
                for v in value]
    if isinstance(value, (bool, list, dict)):
        refuse(f"not a value --{key} takes")
    if action.type is None:
        if not isinstance(value, str):
            refuse(f"--{key} takes text: quote it")
    elif action.type is int and isinstance(value, float) and not value.is_integer():
        refuse(f"--{key} takes a whole number")
    else:
        try:
            value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            refuse(f"not a value --{key} takes")
    if action.choices is not None and value not in action.choices:
        refuse(f"choose from {', '.join(map(str, action.choices))}")
    return value
