"""What the command lines share: every flag's default is shown by --help."""

import argparse

import pytest

import evaluate
import flops
import train
from qwen_min import __main__ as generate_cli
from qwen_min.cli import HelpFormatter

PARSERS = {"train.py": train.build_parser, "evaluate.py": evaluate.build_parser, "flops.py": flops.build_parser,
           "python -m qwen_min": generate_cli.build_parser}


def flags(parser):
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("script", PARSERS)
def test_every_flag_has_help_and_every_default_is_shown(script):
    parser = PARSERS[script]()
    for action in flags(parser):
        assert action.help, f"{script} {action.option_strings[0]} has no help text"  # argparse shows no default without one
        entry = parser._get_formatter()._expand_help(action)  # the flag's text as --help prints it
        if action.default not in (None, False):
            assert "default" in entry, f"{script} {action.option_strings[0]} hides its default {action.default!r}"


def test_the_formatter_adds_the_default_only_where_there_is_one_to_show():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--out", default=None, help="run folder")
    p.add_argument("--fast", action="store_true", help="go fast")
    p.add_argument("--alpha", default=2.0, help="scale (default: = rank)")
    text = " ".join(p.format_help().split())
    assert "LoRA rank (default: 8)" in text
    assert "run folder --fast" in text  # nothing added after a None default
    assert "go fast" in text and "go fast (default" not in text
    assert "scale (default: = rank)" in text and "(default: 2.0)" not in text


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`python flops.py | head -1`: the pipe closes under the writer; it stops quietly (exit 1), as Unix tools do."""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.Popen([sys.executable, "flops.py"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait() == 1 and first.startswith(b"Convention")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
