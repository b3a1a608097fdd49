"""--config FILE: a run relaunched from its own args.json is the same run, bit for bit; TOML/YAML files
with flags overriding them; bad files in one sentence."""

import json

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import train
from conftest import random_model, tiny_config, write_checkpoint
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
