"""What the command lines share: every flag's default is shown by --help."""

import argparse

import pytest

import evaluate
import flops
import train
from qwen_min import __main__ as generate_cli
from qwen_min.cli import HelpFormatter, renamed

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
        if action.default is not None and action.default is not False:  # `is`: a default of 0 must show too
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
    proc.stdout.close()  # the reader is gone before the writer (still importing torch) prints a line
    err = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# One vocabulary: each concept has one flag in every script that has it; older spellings are hidden aliases.
VOCABULARY = {"--model": "checkpoint folder or hub id", "--rank": "LoRA rank", "--targets": "layers LoRA adapts",
              "--dtype": "weights and activations dtype", "--device": "torch device",
              "--flops-budget": "FLOP budget", "--eval-every": "steps between validations",
              "--eval-batches": "batches per validation", "--context": "tokens per window", "--k": "context steps",
              "--h": "forecast steps", "--seed": "seed", "--temperature": "sampling temperature", "--top-k": "top-k",
              "--top-p": "top-p", "--lm-head-bias": "the coursework's output bias"}
OLD_SPELLINGS = {"--precision": "--dtype", "--lora-targets": "--targets", "--budget": "--flops-budget",
                 "--val-every": "--eval-every", "--val-batches": "--eval-batches", "--eval-context-steps": "--k",
                 "--eval-horizon-steps": "--h", "--eval-series": "--forecast-series", "--eval-batch": "--forecast-batch"}


def visible_flags(parser):
    return {s for a in flags(parser) if a.help != argparse.SUPPRESS for s in a.option_strings}


def test_one_flag_per_concept_across_the_scripts():
    shown = {script: visible_flags(build()) for script, build in PARSERS.items()}
    for script, names in shown.items():
        assert not names & set(OLD_SPELLINGS), f"{script} shows old spellings {names & set(OLD_SPELLINGS)}"
    # each concept that two or more scripts share appears under its one name (a spelling variant would be missed)
    by_dest = {}
    for script, build in PARSERS.items():
        for a in flags(build()):
            if a.help != argparse.SUPPRESS:
                by_dest.setdefault(a.dest, set()).add(a.option_strings[0])
    assert all(len(names) == 1 for names in by_dest.values()), {d: n for d, n in by_dest.items() if len(n) > 1}
    assert all(sum(flag in names for names in shown.values()) >= 2 for flag in VOCABULARY), \
        [flag for flag in VOCABULARY if sum(flag in names for names in shown.values()) < 2]


@pytest.mark.parametrize("script, old, new, value", [
    ("train.py", ["--precision", "bf16"], ["--dtype", "bfloat16"], "bfloat16"),
    ("flops.py", ["--lora-targets", "q,o"], ["--targets", "q,o"], "q,o"),
    ("flops.py", ["--budget", "1e16"], ["--flops-budget", "1e16"], 1e16),
    ("flops.py", ["--val-every", "7"], ["--eval-every", "7"], 7),
    ("flops.py", ["--eval-batch", "3"], ["--forecast-batch", "3"], 3),
    ("flops.py", ["--eval-horizon-steps", "9"], ["--h", "9"], 9),
])
def test_old_spellings_still_work_with_one_line_naming_the_new(script, old, new, value, capsys):
    parser = PARSERS[script]()
    dest = next(a.dest for a in parser._actions if new[0] in a.option_strings)
    assert getattr(parser.parse_args(old), dest) == value == getattr(PARSERS[script]().parse_args(new), dest)
    err = capsys.readouterr().err
    assert err.count(f"note: {old[0]} is now {new[0]}") == 1, err


def test_the_formatter_shows_zero_and_leaves_positionals_and_suppressed_defaults_alone():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("files", nargs="*", default=["a.json"], help="inputs")
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    p.add_argument("--old", default=argparse.SUPPRESS, help="an old flag")
    text = " ".join(p.format_help().split())
    assert "warm-up steps (default: 0)" in text  # 0 == False, yet 0 is a default to show
    assert "learning rate (default: 0.0001)" in text
    assert "inputs" in text and "inputs (default" not in text  # a positional: argparse's own text
    assert "an old flag" in text and "an old flag (default" not in text


def renaming_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--h", type=int, default=20)
    p.add_argument("--device", default=None)
    renamed(p, "--precision", "--dtype", {"fp32": "float32", "bf16": "bfloat16"})
    renamed(p, "--steps", "--h")
    renamed(p, "--on", "--device", {"auto": None})
    return p


def test_an_old_flag_says_its_new_name_and_value_once_per_parser(capsys):
    p = renaming_parser()
    assert p.parse_args(["--precision", "bf16", "--steps", "7"]).dtype == "bfloat16"
    assert capsys.readouterr().err == ("note: --precision is now --dtype bfloat16; the old name will go.\n"
                                       "note: --steps is now --h 7; the old name will go.\n")
    args = p.parse_args(["--precision", "fp32", "--steps", "9"])  # the same parser again: no second note
    assert (args.dtype, args.h) == ("float32", 9) and capsys.readouterr().err == ""
    assert p.parse_args(["--on", "auto"]).device is None  # an old value that maps to no value: none to name
    assert capsys.readouterr().err == "note: --on is now --device; the old name will go.\n"
    with pytest.raises(SystemExit):  # the new flag's choices and the old names' values, nothing else
        p.parse_args(["--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the new flag's type
        p.parse_args(["--steps", "seven"])
    assert "--steps" not in p.format_help()  # hidden from --help
