"""flops.py's corners that the counts in test_flops.py pass by: the Cost algebra, Setup, the refusals
in whole sentences, the ledger's table and file, forecasts' prompt and defaults, report B's products.

Every expected value is worked out by hand here (the coursework's rules: an (m x n)(n x p) product is
m n p multiplies and m p (n - 1) adds; exp, log, sqrt weigh 10, the rest 1) on TINY, a config whose
sizes are all different: vocabulary 10, width 4, MLP 6, one layer, 2 query heads on 1 kv head of 2.
"""

import json

import pytest

import flops
from flops import Cost, Ledger, Setup
from qwen_min import Qwen2Config

TINY = Qwen2Config(vocab_size=10, dim=4, hidden_dim=6, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2, max_seq_len=64)


def message(excinfo):
    return str(excinfo.value)


# ---------------------------------------------------------------- the Cost algebra


def test_sum_without_a_start_and_refused_operands():
    a = flops.group(x=flops.ops(add=2), y=flops.matmul(1, 2, 3))  # y: 6 mul, 3 add; matmul view 12
    b = flops.group(x=flops.ops(mul=5))
    total = sum([a, b])  # starts from the integer 0
    assert total.ops == {"add": 5, "mul": 11} and total.matmul == 12 and total["x"].ops == {"add": 2, "mul": 5}
    with pytest.raises(TypeError):
        a + 5  # only 0, the start of sum(), is a number a Cost adds
    with pytest.raises(TypeError):
        a + 1.5
    with pytest.raises(ValueError) as e:
        a + flops.ops(add=1)
    assert message(e) == ("adding a Cost without named parts to one with them would lose the names; "
                          "name it with group() or extended().")


def test_what_is_free():
    assert Cost().is_free() and flops.group(x=Cost(), y=Cost(ops={"add": 0})).is_free()
    assert not flops.ops(add=1).is_free() and not Cost(matmul=2).is_free()
    assert not Cost(parts={"x": flops.ops(exp=1)}).is_free()  # a part that costs is not free
    # a free addend leaves the other as it is, even one without parts beside one with them
    a = flops.group(x=flops.ops(add=2))
    assert a + flops.group(z=Cost()) == a and flops.ops() + a == a


def test_extended_refusals_name_the_clash():
    a = flops.group(x=flops.ops(add=2))
    with pytest.raises(ValueError) as e:
        a.extended(x=flops.ops(add=1))
    assert message(e) == "extended() adds new names to a cost with parts; got ['x']."
    with pytest.raises(ValueError) as e:
        flops.ops(add=1).extended(y=flops.ops(add=1))
    assert message(e) == "extended() adds new names to a cost with parts; got a cost without parts."


def test_paths_get_flat_and_to_dict():
    inner = flops.group(b=flops.ops(sqrt=3), c=flops.matmul(2, 2, 2))  # c: 8 mul, 4 add, matmul view 16
    cost = flops.group(a=inner, d=flops.ops(log=1, cmp=2))
    assert cost["a.b"].ops == {"sqrt": 3} and cost.get("a.c").matmul == 16
    assert cost.get("a.z") is None and cost.get("nowhere", 7) == 7
    with pytest.raises(KeyError):
        cost["a.z"]
    assert [name for name, _ in cost.flat()] == ["a", "a.b", "a.c", "d"]
    assert [name for name, _ in cost.flat("top")] == ["top.a", "top.a.b", "top.a.c", "top.d"]
    # 8 mul + 4 add + 3 sqrt (30) + 1 log (10) + 2 cmp = 54
    assert cost.to_dict() == {"matmul_view": 16, "coursework": {"total": 54, "add": 4, "mul": 8, "div": 0, "cmp": 2,
                                                                "exp": 0, "log": 1, "sqrt": 3}}


def test_ops_refuses_an_unknown_primitive_and_drops_zeros():
    with pytest.raises(ValueError) as e:
        flops.ops(sin=1)
    assert message(e) == "unknown primitive 'sin'; use one of add, mul, div, cmp, exp, log, sqrt."
    assert flops.ops(add=0, mul=3).ops == {"mul": 3}
    # a batch of 3 products (2 x 3)(3 x 4): 72 mul, 3 x 2 x 4 x 2 = 48 add; 144 in the matmul view
    assert flops.matmul(2, 3, 4, 3) == Cost(144, {"mul": 72, "add": 48})


# ---------------------------------------------------------------- Setup and the conventions' refusals


def test_setup_refusals_and_no_lora():
    assert Setup(TINY, None).lora == {} and Setup(TINY, {}).lora == {}
    assert Setup(TINY, {"q_proj": 0, "v_proj": 3}).lora == {"v_proj": 3}
    with pytest.raises(ValueError) as e:
        Setup(TINY, kernel="flash")
    assert message(e) == "kernel must be 'math' or 'fused', got 'flash'."
    with pytest.raises(ValueError) as e:
        flops.scaled_dot_product_attention_backward(1, 2, 3, 3, 2, kernel="flash")
    assert message(e) == "kernel must be 'math' or 'fused', got 'flash'."
    with pytest.raises(ValueError) as e:
        Setup(TINY, convention="report-c")
    assert message(e) == "unknown FLOP convention 'report-c'; use one of ours, report-a, report-b."


def test_lora_targets_and_layer_widths():
    assert flops.lora_targets("q,v", 0) == {}
    assert flops.lora_targets("all-linear", 3) == dict.fromkeys(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 3)
    # AdamW's numbers with rank 1 on every linear layer of TINY: r (d_in + d_out) each:
    # q 4 + 4, k 4 + 2, v 4 + 2, o 4 + 4, gate 4 + 6, up 4 + 6, down 6 + 4 = 58; with the head bias + 10
    every = flops.lora_targets("all-linear", 1)
    assert flops.trainable_parameters(Setup(TINY, every)) == 58
    assert flops.trainable_parameters(Setup(TINY, every, lm_head_bias=True)) == 68
    assert flops.trainable_parameters(Setup(TINY, {"o_proj": 2})) == 16


def test_report_b_products_and_parts():
    """Report B counts a product (m x n)(n x p) as 2 m n p, n multiplies and n adds per output number."""
    assert flops.matmul_2mnp(2, 3, 4) == Cost(48, {"mul": 24, "add": 24})
    assert flops.matmul_2mnp(2, 3, 4, 5).matmul == 240
    Bc = flops.convention_named("report-b")
    sdpa = Bc.scaled_dot_product_attention(1, 2, 3, 3, 2)  # q k^T and p v, 2 heads: 2 x 2 x 3 x 2 x 3 each
    assert list(sdpa.parts) == ["scores", "mask", "softmax", "weighted_sum"]
    assert sdpa.matmul == 2 * 72 and sdpa["mask"] == Cost() and sdpa["softmax"] == Cost()
    # a report-B linear layer, biased or not: (2 x 4)(4 x 10) as 2 m n p = 160, in both views
    assert Bc.linear(2, 4, 10, True) == Bc.linear(2, 4, 10) == Cost(160, {"mul": 80, "add": 80})
    assert Bc.lora_linear(2, 4, 10, 1, True).coursework == 160 + 2 * 2 * 1 * (4 + 10)


# ---------------------------------------------------------------- generation: the prompt, and a run's defaults


def test_forecast_prompt_is_context_steps_times_tokens_per_step():
    """3 context steps of 2 tokens: a prefill of 6 tokens; 1 step ahead: 2 new tokens, the second
    decoded once at position 7, the head on 2 positions."""
    cost = flops.forecast(Setup(TINY, head_rows=13), 1, 3, 1, tokens_per_step=2)
    assert cost["prefill.layers.0.self_attn.q_proj"].matmul == 2 * 6 * 4 * 4  # (6 x 4)(4 x 4)
    # 2 heads x 6 x 6 scores of 2 numbers: q k^T and p v, 2 x 144 multiply-adds each
    assert cost["prefill.layers.0.self_attn.sdpa"].matmul == 2 * 2 * 144
    assert cost["decode.layers.0.self_attn.sdpa"].matmul == 2 * 2 * (2 * 1 * 7 * 2)  # 1 query on 7 keys
    assert prims(cost["lm_head"]) == {"mul": 2 * 52, "add": 2 * 39}  # (1 x 4)(4 x 13) per new token


def test_a_runs_forecasts_default_to_evaluations_of_50_steps_from_50():
    """Forecasts(series): 50 context steps of 10 tokens (a prefill of 500), 50 steps ahead (500 new tokens),
    one series at a time, a 13-row head, the KV cache."""
    gen = flops.plan_run(Setup(TINY), steps=1, batch=1, context=2, forecasts=flops.Forecasts(2))["generate"]
    assert set(gen.parts) == {"prefill", "decode", "lm_head"}  # the cache: a prefill, then decode steps
    assert gen["prefill.layers.0.self_attn.q_proj"].matmul == 2 * (2 * 500 * 4 * 4)  # 2 series, one by one
    assert prims(gen["lm_head"]) == {"mul": 2 * 500 * 52, "add": 2 * 500 * 39}
    assert flops.plan_run(Setup(TINY), 1, 1, 2, forecasts=flops.Forecasts(0))["generate"] == Cost()


def test_samples_multiply_the_decoding_rows_and_no_new_token_costs_no_head():
    """3 samples of 2 prompts: a prefill of the 2 prompts, then 6 rows; the head on each new token of each row."""
    cost = flops.generate(Setup(TINY), 2, 3, 2, samples=3)
    assert cost["prefill.layers.0.self_attn.q_proj"].matmul == 2 * (2 * 3) * 4 * 4  # (6 x 4)(4 x 4): 2 x 3 tokens
    assert cost["decode.layers.0.self_attn.q_proj"].matmul == 2 * 6 * 4 * 4  # one token for each of the 6 rows
    assert prims(cost["lm_head"]) == {"mul": 2 * 6 * 40, "add": 2 * 6 * 30}  # 2 tokens x 6 rows x (1x4)(4x10)
    none = flops.generate(Setup(TINY), 2, 3, 0)
    assert none["lm_head"] == Cost() and none["decode"] == Cost() and none.matmul == none["prefill"].matmul > 0


def test_long_generations_are_counted_in_whole_numbers():
    """20 rows of 30,000 tokens on the 0.5B: the closed form of the decode steps multiplies one step's count
    (about 1e10) by C(k, 2) (about 4.5e8), past 2**53, where a float would be rounded: it must stay in
    integers (Python's, which never round)."""
    cost = flops.generate(Setup(Qwen2Config(), head_rows=13), 20, 500, 30_000)
    for name, piece in [("all", cost), *cost.flat()]:
        assert type(piece.matmul) is int and all(type(v) is int for v in piece.ops.values()), name


def test_report_a_attention_has_the_mirrors_parts():
    """Report A counts attention differently but names the same pieces (scores, mask, softmax, weighted sum)."""
    A = flops.convention_named("report-a")
    sdpa = A.scaled_dot_product_attention(1, 2, 3, 3, 2)
    assert list(sdpa.parts) == ["scores", "mask", "softmax", "weighted_sum"] and sdpa["mask"] == Cost()


def test_backward_defaults_are_a_layer_above_the_first_and_the_fused_kernel():
    """Called without them, the backward functions count a layer whose input needs a gradient (every layer
    but the first) and the fused attention kernel (what training runs); TINY, 1 x 2 tokens (n 2, D 4)."""
    assert prims(flops.linear_backward(2, 3, 4)) == {"mul": 24, "add": 18}  # dx = dy W (2x4)(4x3), no LoRA
    assert prims(flops.attention_backward(Setup(TINY, kernel="math"), 1, 2)["inputs"]) == {"add": 16}  # 2 n D
    assert prims(flops.mlp_backward(Setup(TINY), 2)["inputs"]) == {"add": 8}  # n D
    block = flops.decoder_block_backward(Setup(TINY), 1, 2)
    assert prims(block["residual_attn"]) == {"add": 8} and prims(block["residual_mlp"]) == {"add": 8}
    # 1 head of 2 x 2, head_dim 2: the scores recomputed: q k^T (2x2)(2x2) 8 mul, 4 add; scale 4; mask 4;
    # softmax of 2 rows of 2: 2 cmp, 4 + 2 add, 4 exp, 4 div
    sdpa = flops.scaled_dot_product_attention_backward(1, 1, 2, 2, 2)
    assert prims(sdpa["recompute"]) == {"mul": 12, "add": 14, "cmp": 2, "exp": 4, "div": 4}


def prims(cost):
    return {k: v for k, v in cost.ops.items() if v}


# ---------------------------------------------------------------- the ledger


def test_ledger_totals_add_up_and_its_table_in_full(tmp_path):
    ledger = Ledger()  # the coursework's budget, 1e17
    assert ledger.budget == 1e17 and ledger.path is None
    ledger.add("a", "train", 2e15, source="plan")
    ledger.add("a", "train", 1e15, source="plan")  # a second train entry of the same stage adds
    ledger.add("a", "eval", 4e14, source="plan")
    ledger.add("a", "generate", 1e14, source="plan")
    ledger.add("b", "train", 5e15)
    assert ledger.totals() == {("a", "plan"): {"train": 3e15, "eval": 4e14, "generate": 1e14, "total": 3.5e15},
                               ("b", "spent"): {"train": 5e15, "eval": 0.0, "generate": 0.0, "total": 5e15}}
    assert ledger.total() == 5e15 and ledger.total("plan") == 3.5e15
    assert ledger.markdown() == "\n".join([
        "| stage | source | training | evaluation | total | % of budget |",
        "|---|---|---|---|---|---|",
        "| a | plan | 3e+15 | 5e+14 | 3.5e+15 | 3.50% |",  # evaluation: eval + generate
        "| b | spent | 5e+15 | 0 | 5e+15 | 5.00% |",
        "| **total** | plan | 3e+15 | 5e+14 | 3.5e+15 | 3.50% |",
        "| **total** | spent | 5e+15 | 0 | 5e+15 | 5.00% |"])
    only_spent = Ledger(budget=1e16)
    only_spent.add("c", "eval", 1e14)
    assert only_spent.markdown().splitlines()[-1] == "| **total** | spent | 0 | 1e+14 | 1e+14 | 1.00% |"
    assert len(only_spent.markdown().splitlines()) == 4  # no plan total without a plan


def test_ledger_add_refusals_and_entries(tmp_path):
    ledger = Ledger(tmp_path / "deep" / "er" / "ledger.jsonl")
    with pytest.raises(ValueError) as e:
        ledger.add("x", "training", 1)
    assert message(e) == "kind must be one of train, eval, generate, got 'training'."
    with pytest.raises(ValueError) as e:
        ledger.add("x", "train", 1, source="guess")
    assert message(e) == "source must be 'plan' or 'spent', got 'guess'."
    entry = ledger.add(3, "train", flops.matmul(2, 3, 4), note="n")  # 40 coursework, 48 matmul view
    assert entry == {"stage": "3", "kind": "train", "source": "spent", "flops": 40.0, "matmul": 48.0, "note": "n"}
    lines = (tmp_path / "deep" / "er" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [entry]


def test_ledger_read_skips_blank_lines_keeps_its_budget_and_refuses_each_bad_entry(tmp_path):
    path = tmp_path / "l.jsonl"
    good = '{"stage": "a", "kind": "train", "source": "spent", "flops": 2}'
    path.write_text(f"{good}\n\n   \n{good}\n")  # blank lines between entries are skipped, not an end
    read = Ledger.read(path, budget=8.0)
    assert read.budget == 8.0 and read.total() == 4.0 and read.entries[0]["flops"] == 2.0
    assert Ledger.read(path).budget == 1e17
    bad = ['{"stage": 1, "kind": "train", "source": "spent", "flops": 2}',  # a stage that is no string
           '{"kind": "train", "source": "spent", "flops": 2}',
           '{"stage": "a", "kind": "training", "source": "spent", "flops": 2}',
           '{"stage": "a", "kind": "train", "source": "guess", "flops": 2}',
           '{"stage": "a", "kind": "train", "flops": 2}',
           '{"stage": "a", "kind": "train", "source": "spent", "flops": "lots"}',
           '{"stage": "a", "kind": "train", "source": "spent", "flops": null}',
           '{"stage": "a", "kind": "train", "source": "spent"}',
           '[1, 2]', 'not json']
    for line in bad:
        path.write_text(f"{good}\n{line}\n{good}\n")
        with pytest.raises(ValueError) as e:
            Ledger.read(path)
        assert message(e) == f"{path}, line 2: not a ledger entry (need stage, kind, source, flops).", line
