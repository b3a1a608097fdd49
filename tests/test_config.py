"""--config FILE: a run relaunched from its own args.json is the same run, bit for bit; TOML/YAML files
with flags overriding them; bad files in one sentence."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import train
from conftest import random_model, tiny_config, write_checkpoint
from qwen_min.cli import parse_with_config, read_config, with_config
from qwen_min.errors import UserError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("tiny") / "ckpt")


def short_run(ckpt, out, *extra):
    return ["--model", str(ckpt), "--n-series", "12", "--context", "48", "--batch", "4", "--rank", "2", "--alpha", "4",
            "--targets", "q,o", "--lr", "3e-3", "--steps", "4", "--eval-every", "2", "--eval-batches", "1",
            "--schedule", "cosine", "--warmup", "1", "--seed", "7", "--out", str(out), "--no-progress", *extra]


def losses(run):
    return [json.loads(line).get("loss", json.loads(line).get("val_loss")) for line in open(run / "metrics.jsonl")]


def test_a_run_relaunched_from_its_args_json_is_the_same_run_bit_for_bit(ckpt, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    train.main(short_run(ckpt, first))
    train.main(["--config", str(first / "args.json"), "--out", str(again)])
    a, b = load_file(first / "best" / "adapter_model.safetensors"), load_file(again / "best" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(first) == losses(again) and len(losses(first)) == 4 + 3  # 4 steps, validations at 0, 2, 4
    recorded = json.loads((again / "args.json").read_text())
    assert recorded == json.loads((first / "args.json").read_text()) | {"out": str(again)}
    assert (recorded["rank"], recorded["alpha"], recorded["targets"], recorded["seed"]) == (2, 4.0, "q,o", 7)


def test_flags_override_a_toml_file(ckpt, tmp_path):
    cfg = tmp_path / "recipe.toml"
    cfg.write_text(f'model = "{ckpt}"\nn-series = 12\ncontext = 48\nrank = 4\ntargets = "q_proj,v_proj"\n'
                   'lr = 0.002\nsteps = 2\neval_every = 2\neval-batches = 1\nno-progress = true\n')
    args = train.parse_args(["--config", str(cfg), "--rank", "2", "--out", str(tmp_path / "r")])
    assert (args.rank, args.targets, args.lr, args.n_series, args.eval_every, args.no_progress) == (2, "q_proj,v_proj", 0.002, 12, 2, True)
    assert {"rank", "lr"} <= set(args.given) and "alpha" not in args.given  # asked for in the file or on the line
    saved = tmp_path / "saved"  # a run made with rank 8: resuming it with this file would change the rank
    saved.mkdir()
    (saved / "args.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k not in ("given", "resume", "config")}
                                                | {"rank": 8}))
    with pytest.raises(UserError, match="--rank cannot change"):
        train.resumed_args(args, saved)


def test_a_yaml_file_and_old_names_in_an_old_args_json(ckpt, tmp_path):
    pytest.importorskip("yaml")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(f"model: {ckpt}\nrank: 3\nprecision: fp32\ndecimals: 3\n")
    args = train.parse_args(["--config", str(cfg), "--out", str(tmp_path / "r")])
    assert (args.rank, args.dtype, args.decimals) == (3, "float32", 3)  # precision fp32: the old name and value


@pytest.mark.parametrize("text, suffix, says", [
    ("rank = 4\nlearning_rate = 1\n", ".toml", "'learning_rate' is not a flag of this script"),
    ('rank = "four"\n', ".toml", "'rank' is 'four'; not a value --rank takes"),
    ('scaling = "log"\n', ".toml", "'scaling' is 'log'; choose from global, per-series"),
    ("no-progress = 3\n", ".toml", "'no-progress' is 3; it is a switch: give true or false"),
    ('{"lr": null}', ".json", "'lr' is None; --lr needs a value"),
    ('{"targets": 1}', ".json", "'targets' is 1; --targets takes text"),
    ("rank = 8.7\n", ".toml", "'rank' is 8.7; --rank takes a whole number"),
    ("rank = true\n", ".toml", "'rank' is True; not a value --rank takes"),
    ('model = ["a", "b"]\n', ".toml", "not a value --model takes"),
    ("rank = 4\n[", ".toml", "is not valid TOML"),
    ("[1, 2]", ".json", "holds a list, not a table"),
    ("{", ".json", "is not valid JSON"),
    ("help = true\n", ".toml", "'help' is not a flag"),
])
def test_a_bad_config_file_is_one_sentence(tmp_path, text, suffix, says, capsys):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    for script in (train, evaluate):  # a usage error, as a bad flag is: argparse's usage, then one line
        with pytest.raises(SystemExit) as e:
            script.parse_args(["--config", str(path)])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and "error: --config" in last, last
        assert says in last or script is evaluate, last  # evaluate.py has no --rank: it refuses these for that reason


def test_a_missing_config_file_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(tmp_path / "nowhere.toml")])
    assert "no such file" in capsys.readouterr().err


def test_a_models_config_json_given_as_config_gets_a_hint(tmp_path, capsys):
    import flops

    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 64, "model_type": "qwen2"}')
    with pytest.raises(SystemExit):
        flops.main(["--config", str(path)])
    assert "give it as --model" in capsys.readouterr().err


def test_evaluate_takes_a_config_file_too(ckpt, tmp_path):
    cfg = tmp_path / "eval.toml"
    cfg.write_text(f'model = "{ckpt}"\nk = 6\nh = 3\nn-series = 20\nno-ce = true\nbatch = 5\n')
    args = evaluate.parse_args(["--config", str(cfg), "--h", "4", "--out", str(tmp_path / "e")])
    assert (args.k, args.h, args.n_series, args.no_ce, args.batch) == (6, 4, 20, True, 5)


def test_config_values_that_are_fine_and_a_list_flag(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text('{"rank": 8.0, "alpha": 16, "out": null}')  # a whole float for an int, an int for a float, null for None
    args = train.parse_args(["--config", str(path)])
    assert (args.rank, args.alpha) == (8, 16.0) and type(args.rank) is int
    path.write_text('{"compare": ["a.json", "b.json"]}')
    assert evaluate.parse_args(["--config", str(path)]).compare == ["a.json", "b.json"]
    path.write_text('{"compare": "a.json"}')
    with pytest.raises(SystemExit):  # a list flag given one string would be read letter by letter
        evaluate.parse_args(["--config", str(path)])


# ---------------------------------------------------------------- qwen_min.cli's config reading, on a small parser

def recipe_parser():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--name", default="run")
    p.add_argument("--out", default=None)
    p.add_argument("--scaling", choices=["global", "per-series"], default="global")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--files", nargs="+", default=["a"])
    p.add_argument("--extra", nargs="*", type=int, choices=[1, 2, 3], default=[])
    return p


def config_error(tmp_path, name, text, argv=()):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as e:
        with_config(recipe_parser(), ["--config", str(tmp_path / name), *argv])
    return str(e.value)


def test_a_config_file_sets_defaults_that_flags_override(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text('{"seed": 3, "lora_rank": 4, "lr": 1, "name": "x", "quiet": true, "files": ["b", "c"], "extra": []}')
    p = recipe_parser()
    values = with_config(p, ["--config", str(path)], skip=("seed",))
    assert values["seed"] == 3 and values["lora_rank"] == 4  # the file's values as written, skipped keys too
    args = p.parse_args(["--config", str(path), "--name", "y"])
    assert (args.lora_rank, args.lr, args.name, args.quiet, args.files, args.extra) == (4, 1.0, "y", True, ["b", "c"], [])
    assert type(args.lr) is float
    assert with_config(recipe_parser(), ["--name", "y"]) == {}  # no --config: nothing read
    path.write_text('{"seed": 3}')
    assert "'seed' is not a flag of this script; see --help for the names." in config_error(tmp_path, "recipe.json", '{"seed": 3}')


def test_parse_with_config_makes_a_bad_file_a_usage_error(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("lora-rank = 2.5\n")
    with pytest.raises(SystemExit) as e:
        parse_with_config(recipe_parser(), ["--config", str(path)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"{Path(sys.argv[0]).name}: error: --config {path}: 'lora-rank' is 2.5; --lora-rank takes a whole number")  # no final '.'
    path.write_text("lora-rank = 2\ngiven = [\"lr\"]\n")  # a key the script records but no flag sets
    assert parse_with_config(recipe_parser(), ["--config", str(path), "--lr", "0.5"], skip=("given",)).lora_rank == 2


@pytest.mark.parametrize("text, says", [
    ('{"quiet": 1}', "'quiet' is 1; it is a switch: give true or false."),
    ('{"lr": null}', "'lr' is None; --lr needs a value (leave the key out for its default)."),
    ('{"files": []}', "'files' is []; --files takes a list."),
    ('{"files": "b"}', "'files' is 'b'; --files takes a list."),
    ('{"extra": [1, 4]}', "'extra' is 4; choose from 1, 2, 3."),
    ('{"extra": [1, "x"]}', "'extra' is 'x'; not a value --extra takes."),
    ('{"lr": false}', "'lr' is False; not a value --lr takes."),
    ('{"lr": {"a": 1}}', "'lr' is {'a': 1}; not a value --lr takes."),
    ('{"lr": [1]}', "'lr' is [1]; not a value --lr takes."),
    ('{"name": 5}', "'name' is 5; --name takes text: quote it."),
    ('{"name": 1.5}', "'name' is 1.5; --name takes text: quote it."),
    ('{"extra": null}', "'extra' is None; --extra needs a value"),  # a default of [] is a default, though falsy
    ('{"lora_rank": "4x"}', "'lora_rank' is '4x'; not a value --lora_rank takes."),
    ('{"scaling": "log"}', "'scaling' is 'log'; choose from global, per-series."),
    ('{"config": "other.json"}', "'config' is not a flag of this script; see --help for the names."),
    ('{"model_type": "qwen2"}', "'model_type' is not a flag of this script (a model's config.json? give it as --model); see --help"),
])
def test_each_bad_value_is_one_sentence_naming_the_file_and_key(tmp_path, text, says):
    message = config_error(tmp_path, "c.json", text)
    assert message.startswith(f"--config {tmp_path / 'c.json'}: ") and says in message, message


def test_an_old_flag_name_in_a_config_file_takes_old_and_new_values(tmp_path):
    from qwen_min.cli import renamed

    p = recipe_parser()
    renamed(p, "--norm", "--scaling", {"each": "per-series"})
    (tmp_path / "old.json").write_text('{"norm": "each"}')  # an old name with an old value
    with_config(p, ["--config", str(tmp_path / "old.json")])
    assert p.parse_args([]).scaling == "per-series"
    (tmp_path / "new.json").write_text('{"norm": "global"}')  # an old name with a new value
    with_config(p, ["--config", str(tmp_path / "new.json")])
    assert p.parse_args([]).scaling == "global"


def test_values_that_are_fine(tmp_path):
    (tmp_path / "c.json").write_text('{"out": null, "lora-rank": 3.0, "extra": [2, 3], "scaling": "per-series", "quiet": false}')
    p = recipe_parser()
    with_config(p, ["--config", str(tmp_path / "c.json")])
    args = p.parse_args([])
    assert (args.out, args.lora_rank, args.extra, args.scaling, args.quiet) == (None, 3, [2, 3], "per-series", False)
    assert type(args.lora_rank) is int


def test_read_config_reads_toml_yaml_and_json_by_suffix(tmp_path):
    (tmp_path / "a.toml").write_text('rank = 4\nname = "x"\n')
    (tmp_path / "b.YML").write_text("rank: 4\nname: x\n")
    (tmp_path / "c.yaml").write_text("rank: 4\nname: x\n")
    (tmp_path / "args").write_text('{"rank": 4, "name": "x"}')  # no suffix: JSON, as a run's args.json
    for name in ("a.toml", "b.YML", "c.yaml", "args"):
        assert read_config(tmp_path / name) == {"rank": 4, "name": "x"}, name


@pytest.mark.parametrize("name, text, says", [
    ("a.toml", "rank = \n", "is not valid TOML (Invalid value (at line 1, column 8)); fix the file."),
    ("a.yaml", "rank: [1\n", "is not valid YAML (while parsing a flow sequence); fix the file."),
    ("a.json", '{"rank": }', "is not valid JSON (Expecting value: line 1 column 10 (char 9)); fix the file."),
    ("args", "{", "is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); fix the file."),
    ("a.yaml", "- 1\n- 2\n", "holds a list, not a table of flag names and values."),
    ("a.json", '"rank"', "holds a str, not a table of flag names and values."),
])
def test_read_config_refuses_a_malformed_file_in_one_sentence(tmp_path, name, text, says):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as e:
        read_config(tmp_path / name)
    assert str(e.value) == f"--config {tmp_path / name} {says}"


def test_read_config_says_what_a_missing_parser_needs(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("rank: 4\n")
    (tmp_path / "a.toml").write_text("rank = 4\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    with pytest.raises(UserError) as e:
        read_config(tmp_path / "a.yaml")
    assert str(e.value) == (f"--config {tmp_path / 'a.yaml'}: reading YAML needs PyYAML (pip install pyyaml); "
                            "or write the file as TOML or JSON.")
    with pytest.raises(UserError) as e:
        read_config(tmp_path / "a.toml")
    assert str(e.value) == f"--config {tmp_path / 'a.toml'}: reading TOML needs Python 3.11 or later; write the file as JSON instead."
    with pytest.raises(UserError) as e:
        read_config(tmp_path / "none.toml")
    assert str(e.value) == (f"--config {tmp_path / 'none.toml'}: no such file; give a TOML, YAML or JSON file of flag values "
                            "(a run's args.json works).")
    with pytest.raises(UserError, match="no such file"):
        read_config(tmp_path)  # a folder is no config file


def test_a_yaml_file_cannot_run_code_and_a_long_message_is_cut_to_its_first_line_and_80_characters(tmp_path):
    (tmp_path / "a.yaml").write_text('!!python/object/apply:os.system ["echo hi"]\n')
    with pytest.raises(UserError) as e:
        read_config(tmp_path / "a.yaml")
    # PyYAML's message is 95 characters, then three more lines
    assert str(e.value) == (f"--config {tmp_path / 'a.yaml'} is not valid YAML (could not determine a constructor for the tag "
                            "'tag:yaml.org,2002:python/object/a); fix the file.")


def test_a_config_file_is_read_as_utf8_whatever_the_locale(tmp_path):
    import locale

    (tmp_path / "a.toml").write_bytes('name = "café"\n'.encode("utf-8"))
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")  # an ASCII locale, as on a bare server (in Python's UTF-8 mode any file reads as UTF-8)
    try:
        assert read_config(tmp_path / "a.toml") == {"name": "café"}
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
