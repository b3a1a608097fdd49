"""flops.py's command line: what it prints (text and JSON) on a tiny config counted by hand, each
report's tables as the reports print them, every flag's limits in whole sentences, --help.

TINY's sizes are all different (vocabulary 10, width 4, MLP 6, one layer, 2 query heads on 1 kv head
of 2, 64 positions). Its hand counts, used below (coursework rules: an (m x n)(n x p) product m n p
multiplies and m p (n - 1) adds; exp, log, sqrt 10; the rest 1):

  forward of 1 x 2 tokens: the block 946 (test_flops.py::test_decoder_block_by_hand), the final norm
  56, the head (2 x 4)(4 x 10) 140 and its bias 20: 1162; matmul view 544 + 160 = 704.
  forward with the loss on 1 x 1 token (a window of 2 feeds 1):
    input_layernorm 28 (mul 12, add 4, div 2, sqrt 1); q_proj (1x4)(4x4) + bias 32; k_proj, v_proj
    (1x4)(4x2) + bias 16 each; rotary 2 query and 1 key vectors of 2, 7 each: 21; attention, 2 heads of
    1 x 1: q k^T 6, scale 2, mask 2, softmax 2 adds + 2 exp + 2 div = 24, p v 4: 38; o_proj 28;
    residual 4; post_attention_layernorm 28; MLP gate 42, silu on 6 numbers 78, up 42, product 6,
    down (1x6)(6x4) 44: 212; residual 4 -> block 427; norm 28; head (1x4)(4x10) + bias 80;
    cross-entropy over 10: max 9 cmp, subtract 10, exp 100, sum 9, log 10, z - lse 10, negate 1,
    mean 1 div: 150 -> 685. Matmul view: q 32, k 16, v 16, scores 8, p v 8, o 32, gate, up,
    down 48 each, head 80: 336.
  backward, only the head bias trained: the loss's backward over 10 (1 div, 1 + 9 + 10 add, 10 exp,
    10 mul) 131; the bias's sum over 1 row: nothing. AdamW on the 10 bias numbers: 23 each, 230.
"""

import json

import pytest

import flops
from qwen_min import Qwen2Config
from qwen_min.errors import run_cli

TINY = Qwen2Config(vocab_size=10, dim=4, hidden_dim=6, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2, max_seq_len=64)
REAL = Qwen2Config()


@pytest.fixture
def tiny_model(tmp_path):
    """A checkpoint folder holding only TINY's config.json (flops.py reads nothing else)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    return str(folder)


def lines_of(text):
    """Each printed line with its runs of spaces made one (the columns' widths are not the claim)."""
    return [" ".join(line.split()) for line in text.splitlines()]


def test_text_output_on_tiny_by_hand(tiny_model, capsys):
    flops.main(["--model", tiny_model, "--context", "2", "--batch", "1", "--targets", "none", "--lm-head-bias",
                "--steps", "3", "--eval-every", "2", "--eval-batches", "1", "--forecast-series", "1", "--k", "1",
                "--h", "1", "--tokens-per-step", "1", "--gen-head-rows", "7", "--flops-budget", "1e4"])
    raw = capsys.readouterr().out
    out = lines_of(raw)
    # the forward table's columns: names left-aligned, numbers right-aligned, every line as wide as the header
    table = raw.splitlines()[2:2 + out.index(next(line for line in out if line.startswith("total "))) - 1]
    assert len({len(line) for line in table}) == 1 and table[0].startswith("module ") and table[0].endswith(" coursework")
    assert table[-1].startswith("total ") and table[-1].endswith(" 1162") and table[1].startswith("embed_tokens ")
    assert out.count("") == 3 and "None" not in out  # one blank line between the four sections
    assert out[:3] == ["Convention: ours", "One forward pass: batch 1 x 2 tokens, head 10 rows + bias, LoRA none",
                       "module matmul view add mul div cmp exp log sqrt coursework"]
    assert "layers.*.input_layernorm 0 8 24 4 0 0 0 2 56" in out  # 2 rows of 4
    assert "lm_head 160 80 80 0 0 0 0 0 160" in out  # (2x4)(4x10): 80 mul, 60 add; + bias 20
    total = next(line for line in out if line.startswith("total "))
    assert total.split()[1] == "704" and total.split()[-1] == "1162"
    step = out.index("Training step: windows of 2 tokens (the model reads 1), fused attention")
    assert out[step + 1:step + 8] == [
        "matmul view coursework",
        "forward (with loss) 336 685",
        "backward 0 131",
        "optimizer (AdamW) 0 230",
        "step 336 1046",
        "coursework 3 x forward 1008 2055",
        "executed step / (3 x forward): 0.509 (coursework), 0.333 (matmul view)"]  # 1046 / 2055, 336 / 1008
    # the run: 3 steps; validations at step 2 and at the last step, 3 (as train.py runs them), one batch
    # each: the forward with the loss again, twice; one forecast of
    # 1 token after 1: a prefill of the body (685 - 80 - 150 = 455; matmul 336 - 80 = 256) and the
    # 7-row head with its bias (1x4)(4x7) + 7: 56 (matmul 56)
    run = out.index("Run: 3 steps")
    assert out[run + 1:run + 6] == ["train 1008 3138", "eval 672 1370", "generate 312 511", "total 1992 5019",
                                    "share of the 1e+04 budget: 50.19%"]
    assert "| run | plan | 3.14e+03 | 1.88e+03 | 5.02e+03 | 50.19% |" in out
    assert out[-1] == "| **total** | plan | 3.14e+03 | 1.88e+03 | 5.02e+03 | 50.19% |"


def test_json_output_on_tiny_by_hand(tiny_model, capsys):
    """The 13-row head: forward 1 x 2 with the head (2x4)(4x13) 182 + bias 26 = 208; the step on 1 token:
    head 104, cross-entropy over 13 (12 cmp, 13 + 12 + 13 + 1 add, 130 exp, 10 log, 1 div) 192, so
    685 - 80 - 150 + 104 + 192 = 751 (matmul 256 + 104 = 360); its backward over 13: 1 + 1 + 12 + 130 +
    13 + 13 = 170; AdamW on the full-vocabulary bias (10 numbers) 230."""
    flops.main(["--model", tiny_model, "--context", "2", "--batch", "1", "--targets", "none", "--lm-head-bias",
                "--vocab", "numeric", "--attention", "math", "--steps", "2", "--gen-head-rows", "10", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["convention"] == "ours" and out["config"]["vocab_size"] == 10 and out["config"]["hidden_dim"] == 6
    assert out["shape"] == {"batch": 1, "context": 2, "lora": {}, "lm_head_bias": True, "head_rows": 13,
                            "attention": "math"}
    fwd = out["forward"]
    assert fwd["matmul_view"] == 544 + 208 and fwd["coursework"]["total"] == 946 + 56 + 208
    assert fwd["modules"]["lm_head"] == {"matmul_view": 208, "coursework": {"total": 208, "add": 104, "mul": 104, "div": 0,
                                                                            "cmp": 0, "exp": 0, "log": 0, "sqrt": 0}}
    assert fwd["modules"]["layers.*.mlp.silu"]["coursework"] == {"total": 156, "add": 24, "mul": 0, "div": 12, "cmp": 0,
                                                                 "exp": 12, "log": 0, "sqrt": 0}
    assert "total" not in fwd["modules"] and list(fwd["modules"])[:2] == ["embed_tokens", "rope"]
    assert list(fwd["modules"])[-2:] == ["norm", "lm_head"] and fwd["modules"]["norm"]["coursework"]["total"] == 56
    step = out["train_step"]
    assert step["forward"]["coursework"]["total"] == 751 and step["forward"]["matmul_view"] == 360
    assert step["backward"]["coursework"]["total"] == 170 and step["backward"]["matmul_view"] == 0
    assert step["optimizer"]["coursework"] == {"total": 230, "add": 40, "mul": 70, "div": 20, "cmp": 0, "exp": 0,
                                               "log": 0, "sqrt": 10}
    assert step["coursework"]["total"] == 1151 and step["matmul_view"] == 360
    estimate = step["coursework_estimate"]  # 3 x the forward, primitive by primitive
    assert estimate["matmul_view"] == 3 * 360 and estimate["coursework"]["total"] == 3 * 751
    assert all(estimate["coursework"][k] == 3 * v for k, v in step["forward"]["coursework"].items())
    assert step["executed_over_estimate"] == 1151 / 2253
    run = out["run"]
    assert run["train"]["coursework"]["total"] == 2 * 1151 and run["coursework"]["total"] == 2 * 1151
    assert run["eval"]["coursework"]["total"] == 0 and run["generate"]["matmul_view"] == 0
    assert (run["steps"], run["budget"], run["budget_share"]) == (2, 1e17, 2 * 1151 / 1e17)
    assert "report" not in out


def test_forecasts_with_and_without_the_kv_cache_by_hand(tiny_model, capsys):
    """2 series at once, 1 context token, 2 new tokens, a 7-row head with the bias (1x4)(4x7) + 7 = 56 per row.
    With the cache: a prefill of the 2 rows (2 x 455; matmul 2 x 256), one decode step on 2 keys (the body
    on 1 token whose attention reads 2 keys: softmax over 2 costs 52, the whole attention 84 instead of 38,
    so 2 x 501; matmul 2 x 272), the head on 2 rows twice (4 x 56). Without it: the body on 1 token, then on
    both tokens again (2 x (946 + 56); matmul 2 x 544), the same heads."""
    argv = ["--model", tiny_model, "--context", "2", "--batch", "1", "--targets", "none", "--lm-head-bias", "--steps", "1",
            "--forecast-series", "2", "--forecast-batch", "2", "--k", "1", "--h", "2", "--tokens-per-step", "1",
            "--gen-head-rows", "7", "--json"]
    flops.main(argv)
    cached = json.loads(capsys.readouterr().out)["run"]["generate"]
    assert (cached["matmul_view"], cached["coursework"]["total"]) == (512 + 544 + 4 * 56, 910 + 1002 + 4 * 56)
    flops.main(argv + ["--no-kv-cache"])
    plain = json.loads(capsys.readouterr().out)["run"]["generate"]
    assert (plain["matmul_view"], plain["coursework"]["total"]) == (512 + 1088 + 4 * 56, 910 + 2004 + 4 * 56)


REPORT_A_TEXT = """\
Report A, Table 3: one sequence of 512 tokens, LoRA {'q_proj': 4, 'v_proj': 4} (Exp and Sqrt weighted x 10)
  Operation Cost Add. Mult. Div. Exp. Sqrt Total
  Single Attention Block 2.93e+09 2.94e+09 7.34e+06 3.67e+07 10 5.91e+09
  Single MLP Block 6.69e+09 6.7e+09 2.49e+06 2.49e+07 0 1.34e+10
  RMS, Residual etc 1.83e+06 1.84e+06 9.19e+05 0 1.02e+04 4.6e+06
  Single Transformer Layer 9.63e+09 9.64e+09 1.07e+07 6.16e+07 1.02e+04 1.93e+10
  LoRA Cost in this Layer 7.34e+06 8.26e+06 0 0 0 1.56e+07
  Full Forward Pass 3.01e+11 3.01e+11 2.58e+08 1.48e+09 2.51e+05 6.04e+11
  Percentage of budget: 0.000604%
Report A, Table 4
  Training Setup Total FLOPs LoRA FLOPs % of budget"""


def test_report_a_tables_print_as_the_report_prints_them(capsys):
    """Report A's Tables 3 and 4 (section 4.4.1, 4.5.1), its numbers typed from the report."""
    flops.main(["--convention", "report-a", "--rank", "4", "--steps", "13800"])
    out = lines_of(capsys.readouterr().out)
    assert out[0] == "Convention: report-a (the coursework column is the report's count)"
    assert "Training step: windows of 512 tokens (all of them read), backward = 2 x forward" in out
    assert any(line.startswith("forward ") and "(with loss)" not in line for line in out)
    assert any(line.startswith("optimizer 0 0") for line in out)
    start = out.index("Report A, Table 3: one sequence of 512 tokens, LoRA {'q_proj': 4, 'v_proj': 4} (Exp and Sqrt "
                      "weighted x 10)")
    assert out[start:start + 11] == lines_of(REPORT_A_TEXT)
    step, limit = out[start + 11:start + 13]
    # "7.2455e12 4.4909e9 0.0072%" and "9.9988e16 6.1975e13 99.988%"
    assert step.startswith("Single Step (N = 1, B = 4) 7.2455e+12 4.4909e+09 0.0072") and step.endswith("%")
    assert limit == "Training Limit (N = 13800, B = 4) 9.9988e+16 6.1975e+13 99.988%"
    flops.main(["--convention", "report-a", "--targets", "none", "--steps", "1"])
    assert "Report A, Table 3: one sequence of 512 tokens, LoRA none (Exp and Sqrt weighted x 10)" in lines_of(capsys.readouterr().out)


def test_report_a_json_table_3_columns_are_weighted_as_the_report_prints_them(capsys):
    flops.main(["--convention", "report-a", "--rank", "4", "--steps", "13800", "--json"])
    table3 = json.loads(capsys.readouterr().out)["report"]["table3"]
    row = table3["Single Attention Block"]  # 2.93e9 add, 2.94e9 mul, 7.34e6 div, 3.67e7 exp (x 10), 10 sqrt (x 10)
    assert list(row) == ["add", "mul", "div", "exp", "sqrt", "total"]
    assert [float(f"{row[k]:.3g}") for k in row] == [2.93e9, 2.94e9, 7.34e6, 3.67e7, 10, 5.91e9]
    assert table3["Single MLP Block"]["sqrt"] == 0  # no root in the MLP: a column it lacks is 0


REPORT_B_TEXT = """\
Report B, Table 3: batch 4 x 512 tokens, no LoRA
  Single Forward Pass 2.252e+12 12.353
  Forward + Backward 6.757e+12 12.830
Report B, Table 4: calflops on transformers' Qwen2 (sdpa attention), as it prints
  Single Forward Pass 2.02e+12 12.305
  Forward + Backward 6.07e+12 12.783
Report B, Table 13 row: Steps L r log10(LoRA FLOPs) log10(Qwen FLOPs) log10(Total FLOPs)"""


def test_report_b_tables_print_as_the_report_prints_them(capsys):
    """Report B's Tables 3, 4 and 13 (sections 3.3.5-3.3.7, 4.8), typed from the report; without LoRA its
    Table 13 row has no LoRA FLOPs to take the log of, and the Qwen column is the one it prints for 2000 x 512."""
    flops.main(["--convention", "report-b", "--rank", "4"])
    out = lines_of(capsys.readouterr().out)
    assert out[-8:] == lines_of(REPORT_B_TEXT) + ["2000 512 4 12.822 16.131 16.131"]
    flops.main(["--convention", "report-b", "--targets", "none"])
    assert lines_of(capsys.readouterr().out)[-1] == "2000 512 0 - 16.131 16.131"
    assert flops._log10(0) == "-" and flops._log10(-1.0) == "-" and flops._log10(1) == "0.000" and flops._log10(0.5) == "-0.301"


# ---------------------------------------------------------------- the flags' limits, one sentence each


def problems(*argv):
    """check_flags on TINY (64 positions, vocabulary 10, v_proj 2 wide) for these flags on top of ones TINY accepts
    (the default decoding head of 13 rows is wider than TINY's vocabulary, a default forecast longer than its positions)."""
    a = flops.build_parser().parse_args(["--context", "64", "--rank", "1", "--gen-head-rows", "10", "--k", "1", "--h", "1",
                                         *argv])
    return flops.check_flags(a, TINY)


@pytest.mark.parametrize("flag,low,high,why", [
    ("--context", 2, 64, " (the model's 64 positions)"), ("--batch", 1, 1 << 20, ""), ("--steps", 1, 10**9, ""),
    ("--forecast-series", 0, 10**7, ""), ("--forecast-batch", 1, 1 << 20, ""),
    ("--gen-head-rows", 1, 10, " (the vocabulary)"), ("--k", 1, 64, ""), ("--h", 1, 64, ""),
    ("--tokens-per-step", 1, 64, ""),
])
def test_each_limit_holds_at_its_ends_and_refuses_one_past(flag, low, high, why):
    assert problems(flag, str(low)) == [] and problems(flag, str(high)) == []
    for v in (low - 1, high + 1):
        assert problems(flag, str(v)) == [f"{flag} must be from {low} to {high}{why}, not {v}"]


def test_validation_limits_and_their_pairing():
    assert problems("--eval-every", str(10**9), "--eval-batches", str(10**7)) == []
    assert problems("--eval-every", str(10**9 + 1), "--eval-batches", "1") == [
        "--eval-every must be from 0 to 1000000000, not 1000000001"]
    assert problems("--eval-every", "1", "--eval-batches", str(10**7 + 1)) == [
        "--eval-batches must be from 0 to 10000000, not 10000001"]
    pairing = "--eval-every and --eval-batches go together: give both, or neither, a value above 0"
    assert problems("--eval-every", "5") == [pairing] and problems("--eval-batches", "5") == [pairing]


def test_a_forecast_longer_than_the_positions_is_refused_only_when_the_rest_is_right():
    assert problems("--forecast-series", "1", "--k", "4", "--h", "4", "--tokens-per-step", "8") == []  # 64 tokens
    assert problems("--forecast-series", "1", "--k", "4", "--h", "5", "--tokens-per-step", "8") == [
        "a forecast of --k + --h = 9 steps of 8 tokens is 72 tokens, more than the model's 64 positions"]
    assert problems("--forecast-series", "0", "--k", "40", "--h", "40") == []  # no forecast, no limit
    assert problems("--batch", "0", "--forecast-series", "1", "--k", "40", "--h", "40") == [
        "--batch must be from 1 to 1048576, not 0"]


def test_targets_and_rank_sentences():
    assert problems("--targets", "q,zz") == [
        "--targets: unknown LoRA target 'zz'; use some of q,k,v,o,gate,up,down (or peft's q_proj, ...), all-linear, or none"]
    # a bad target ends the checks: nothing is said about a rank or budget that depend on it
    assert problems("--targets", "q,zz", "--flops-budget", "0") == problems("--targets", "q,zz")
    assert problems("--targets", ",") == [
        "--targets ',' names no layer; give some of q,k,v,o,gate,up,down, all-linear, or none"]
    assert problems("--targets", " none ", "--rank", "0") == []
    assert problems("--rank", "2") == [] and problems("--rank", "3") == ["--rank must be from 1 to 2 (the width of v_proj), not 3"]
    assert problems("--rank", "0") == ["--rank must be from 1 to 2 (the width of v_proj), not 0"]
    assert problems("--targets", "o", "--rank", "4") == []
    assert problems("--targets", "o", "--rank", "5") == ["--rank must be from 1 to 4 (the width of o_proj), not 5"]
    assert problems("--targets", "v,k", "--rank", "3") == ["--rank must be from 1 to 2 (the width of k_proj), not 3"]


def test_budget_attention_and_stage_sentences():
    assert problems("--flops-budget", "1e30") == [] and problems("--flops-budget", "1e-3") == []
    assert problems("--flops-budget", "1.1e30") == [
        "--flops-budget must be a number of FLOPs above 0 and at most 1e+30, not 1.1e+30"]
    assert problems("--flops-budget", "0") == ["--flops-budget must be a number of FLOPs above 0 and at most 1e+30, not 0.0"]
    assert problems("--attention", "math") == [] and problems("--attention", "fused") == []
    assert problems("--attention", "math", "--convention", "report-b") == [
        "--attention chooses the backward kernel, which report-b does not count (backward = 2 x forward); leave it out"]
    assert problems("--stage", " ") == ["--stage must name the stage in the ledger, not be empty"]


def error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        run_cli(flops.main, argv)
    assert exit.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_main_ends_in_the_first_problem_as_a_sentence_and_reads_a_model_folder(tiny_model, tmp_path, capsys):
    assert error_line(["--model", tiny_model, "--context", "65", "--batch", "0"], capsys) == (
        "flops.py: error: --context must be from 2 to 64 (the model's 64 positions), not 65.")
    assert error_line(["--model", tiny_model, "--context", "8", "--rank", "1", "--gen-head-rows", "10",
                       "--ledger", str(tmp_path)], capsys) == (
        f"flops.py: error: --ledger {tmp_path}: Is a directory; give a JSON-lines file that can be written.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[]\n")
    assert error_line(["--model", tiny_model, "--context", "8", "--rank", "1", "--gen-head-rows", "10",
                       "--ledger", str(bad)], capsys) == (
        f"flops.py: error: --ledger {bad}: {bad}, line 1: not a ledger entry (need stage, kind, source, flops).")
    flops.main(["--model", tiny_model, "--context", "64", "--rank", "2", "--gen-head-rows", "10", "--json"])  # a folder: its config.json
    assert json.loads(capsys.readouterr().out)["config"]["max_seq_len"] == 64


def plan_entries(tiny_model, path, *argv):
    flops.main(["--model", tiny_model, "--context", "2", "--batch", "1", "--targets", "none", "--lm-head-bias",
                "--steps", "3", "--gen-head-rows", "10", "--ledger", str(path), "--json", *argv])
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_plan_ledger_names_the_stage(tiny_model, tmp_path, capsys):
    entries = plan_entries(tiny_model, tmp_path / "plan.jsonl", "--stage", "lr 1e-4", "--eval-every", "2",
                           "--eval-batches", "1")
    # 3 steps of 1046 (module docstring), matmul view 3 x 336; validations at step 2 and at the last step,
    # 3, as train.py runs them: two batches of 685, 336
    assert entries == [{"stage": "lr 1e-4", "kind": "train", "source": "plan", "flops": 3138.0, "matmul": 1008.0},
                       {"stage": "lr 1e-4", "kind": "eval", "source": "plan", "flops": 1370.0, "matmul": 672.0}]
    again = plan_entries(tiny_model, tmp_path / "plan.jsonl", "--convention", "report-b", "--stage", "b")
    assert again[:2] == entries and again[2]["convention"] == "report-b" and "convention" not in entries[0]


def test_a_plan_ledger_skips_kinds_that_cost_nothing(tiny_model, tmp_path, capsys):
    entries = plan_entries(tiny_model, tmp_path / "plan.jsonl")  # no validation, no forecasts
    assert [e["kind"] for e in entries] == ["train"]


# ---------------------------------------------------------------- --help and the old spellings


HELP = [
    "usage: flops.py [-h]",
    "[--json] Exact FLOPs of qwen-min: one forward pass, a LoRA training step, a run. options:",
    "--model MODEL a local checkpoint folder or its config.json: the shape to count (default: Qwen2.5-0.5B's) --config",
    "--config FILE flag values from a TOML, YAML or JSON file; flags given here override the file's --convention",
    "--convention {ours,report-a,report-b} ours: every operation as it runs (matmul view equal to FlopCounterMode); "
    "report-a, report-b: the same mirror counted as each published report counted it, with its tables "
    "(docs/flops.md) (default: ours)",
    "--context CONTEXT tokens per training window (default: 512)",
    "--batch BATCH training windows per step (default: 4)",
    "--rank RANK LoRA rank (default: 8)",
    "--targets TARGETS layers LoRA adapts: q,k,v,o,gate,up,down, peft's q_proj,..., all-linear, or none (no LoRA) "
    "(default: q,v)",
    "--steps STEPS training steps (default: 2000)",
    "--lm-head-bias train the coursework's lm_head bias --vocab",
    "--vocab {full,numeric} loss over the full vocabulary or the 13 LLMTIME tokens (head of 13 rows) (default: full)",
    "--attention {math,fused} attention backward: fused (flash / memory-efficient, what training runs; default) or "
    "math; our convention only --eval-every",
    "--eval-every EVAL_EVERY validate every N steps, as train.py's --eval-every (0: never; train.py's default is 100) --eval-batches",
    "--eval-batches EVAL_BATCHES batches per validation, as train.py's --eval-batches (train.py's default is 10) --forecast-series",
    "--forecast-series FORECAST_SERIES series forecast in the final evaluation (evaluate.py) (default: 0)",
    "--forecast-batch FORECAST_BATCH series generated at once, as evaluate.py's --batch (default: 1)",
    "--k K forecast prompt: context time steps, as evaluate.py's --k (default: 50)",
    "--h H forecast: time steps generated, as evaluate.py's --h (default: 50)",
    "--tokens-per-step TOKENS_PER_STEP LLMTIME tokens per time step (10 at 2 decimals) (default: 10)",
    "--gen-head-rows GEN_HEAD_ROWS head rows while decoding (vocab: all) (default: 13)",
    "--no-kv-cache generation recomputes the context every token --flops-budget",
    "--flops-budget FLOPS_BUDGET the FLOP budget the plan is checked against, as train.py's (default: 1e+17)",
    "--stage STAGE stage name in the ledger (default: run)",
    "--ledger LEDGER append the plan to this JSON-lines ledger --json",
    "--json print the numbers as JSON",
]


def test_help_says_what_each_flag_does(capsys):
    with pytest.raises(SystemExit) as exit:
        flops.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit.value.code == 0
    for line in HELP:  # each with its neighbours, so a changed word at either end shows
        assert line in text, line
    assert text.endswith("--json print the numbers as JSON")
    assert "--lora-targets" not in text and "--budget" not in text  # old spellings are hidden


@pytest.mark.parametrize("old,new,value", [
    ("--lora-targets", "--targets", "q,o"), ("--budget", "--flops-budget", "1e16"), ("--val-every", "--eval-every", "7"),
    ("--val-batches", "--eval-batches", "3"), ("--eval-series", "--forecast-series", "4"),
    ("--eval-batch", "--forecast-batch", "5"), ("--eval-context-steps", "--k", "6"), ("--eval-horizon-steps", "--h", "9"),
])
def test_each_old_spelling_sets_its_new_flag_and_names_it(old, new, value, capsys):
    args = flops.build_parser().parse_args([old, value])
    dest = new.removeprefix("--").replace("-", "_")
    default = getattr(flops.build_parser().parse_args([]), dest)
    assert getattr(args, dest) == type(default)(value) != default
    shown = value if old != "--budget" else "1e+16"  # a float is named as Python prints it
    assert capsys.readouterr().err == f"note: {old} is now {new} {shown}; the old name will go.\n"
