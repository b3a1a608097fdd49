"""Speculative verification (qwen_min/speculative.py) and the LLMTIME guess it checks (data/draft.py).

The claim: whatever the guesses, the output is plain greedy decoding's, token for token. The tiny
models run in float64, so the two computations (one column per step, or several) cannot round a
near-tie apart and equality is exact. Guesses from an oracle that knows greedy's output must all
be taken, so the number of forward passes is known in advance.
"""

import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import flops
from conftest import random_model, tiny_config
from data.draft import RECALL, LLMTimeDraft, follow_format, guess, recall
from qwen_min import generate
from qwen_min.kv_cache import KVCache
from qwen_min.speculative import NO_GUESS, generate_drafted, seen_by_column

ROWS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), dtype=torch.float64)


def plain(model, rows=ROWS, **kw):
    return generate(model, rows, use_generation_config=False, **kw)


def oracle(reference, prompts, sure):
    """A guess that knows the reference output: the true next tokens, `sure` of them sure."""
    truth = {tuple(p): r for p, r in zip(prompts, reference)}

    def draft(tokens):
        for p, r in truth.items():
            if tuple(tokens[:len(p)]) == p:
                done = len(tokens) - len(p)
                assert tokens[len(p):] == r[:done], "the history a guess sees is not the output so far"
                return r[done:done + 6], sure
        raise AssertionError("unknown prompt")
    return draft


def partly(reference, prompts, seed):
    """Guesses right for a random number of tokens (0 to 4), then wrong: every pass keeps a different
    leading run of its columns and turns off the rest."""
    right, rng = oracle(reference, prompts, 5), random.Random(seed)

    def draft(tokens):
        guess, _ = right(tokens)
        k = rng.randrange(5)
        return guess[:k] + [(t + 1) % 160 for t in guess[k:]], 5
    return draft


def wild(seed, vocab):
    """Random guesses of random length, often sure: nearly always wrong."""
    rng = random.Random(seed)
    return lambda tokens: ([rng.randrange(vocab) for _ in range(rng.randrange(6))], rng.randrange(5))


@pytest.mark.parametrize("kw", [
    dict(stop_token_ids=[]),
    dict(stop_token_ids=[], allowed_token_ids=[3, 17, 42, 99, 120]),
    dict(stop_token_ids=[17], allowed_token_ids=[3, 17, 42, 99, 120]),
    dict(stop_token_ids=[], repetition_penalty=1.3),
    dict(stop_token_ids=[], allowed_token_ids=[3, 17, 42, 99, 120], repetition_penalty=0.8),
], ids=["free", "allowed", "allowed-stop", "penalty", "allowed-penalty"])
@pytest.mark.parametrize("guesser", ["wild", "oracle", "partly", "none"])
def test_any_guess_gives_plain_greedys_tokens(model, kw, guesser):
    ref = plain(model, max_new_tokens=14, **kw)
    T = max(map(len, ROWS))  # rows that stop early leave the output shorter than T + 14
    new = [r[T:] for r in ref.tolist()]
    draft = {"wild": wild(0, 160), "oracle": oracle(new, ROWS, 3), "partly": partly(new, ROWS, 0),
             "none": lambda t: ([], 0)}[guesser]
    out = generate_drafted(model, ROWS, 14, draft, pad_token_id=0, **kw)
    assert out.tolist() == ref[:, :out.shape[1]].tolist() and (ref[:, out.shape[1]:] == 0).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: pins the device= of the masks and indices built per pass"))])
def test_checked_guesses_give_plain_greedys_tokens_on_each_device(device):
    """The tensors built each pass (columns, masks, row indices) must live on the model's device;
    on a CPU every tensor does anyway, so only the CUDA run can catch one left behind."""
    m = random_model(tiny_config(), dtype=torch.float64).to(device)
    kw = dict(stop_token_ids=[], allowed_token_ids=[3, 17, 42, 99, 120], repetition_penalty=1.3)
    ref = plain(m, max_new_tokens=14, **kw)
    draft = partly([r[-14:] for r in ref.tolist()], ROWS, 1)
    gen = generate_drafted(m, ROWS, 14, draft, details=True, **kw)
    assert gen.tokens.device.type == device and torch.equal(gen.tokens, ref) and max(gen.fed) > 1


def test_rows_near_their_budget_get_no_columns_past_it():
    """Rows 0 and 1 guess right and race ahead, row 2 guesses wrong and keeps the passes wide: the
    fast rows' guesses are cut to their own budget, so no position passes the model's last one
    (max_seq_len = prompt + max_new_tokens, as the length check allows)."""
    m = random_model(tiny_config(max_seq_len=8 + 14), dtype=torch.float64)
    ref = plain(m, max_new_tokens=14, stop_token_ids=[])
    right = oracle([r[-14:] for r in ref.tolist()], ROWS, 4)
    def draft(tokens):  # row 2 starts with 30; the others guess on past the end of their budget
        return ([0] * 6, 4) if tokens[0] == 30 else (right(tokens)[0] + [5] * 6, 4)
    gen = generate_drafted(m, ROWS, 14, draft, stop_token_ids=[], details=True)
    assert torch.equal(gen.tokens, ref) and gen.lengths == [14, 14, 14] and max(gen.fed) == 5


def test_no_new_tokens_gives_the_prompts(model):
    assert torch.equal(generate_drafted(model, ROWS, 0, wild(0, 160)), plain(model, max_new_tokens=0))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate_drafted(model, ROWS, -1, wild(0, 160))


@pytest.mark.parametrize("allowed", [None, [3, 17, 42, 99, 120]])
def test_the_penalty_counts_earlier_columns_guesses(model, allowed):
    """With a penalty, each column's choice must see the guesses before it as the row's tokens: the
    oracle's guesses are all taken, so a pass that forgot them would repeat a token greedy avoids."""
    kw = dict(stop_token_ids=[], allowed_token_ids=allowed)
    ref = plain(model, max_new_tokens=14, repetition_penalty=3.0, **kw)
    assert not torch.equal(ref, plain(model, max_new_tokens=14, **kw))  # the penalty changes the output
    new = [r[-14:] for r in ref.tolist()]
    gen = generate_drafted(model, ROWS, 14, oracle(new, ROWS, 4), repetition_penalty=3.0, details=True, **kw)
    assert torch.equal(gen.tokens, ref) and max(gen.fed) == 5


def test_right_guesses_save_passes_and_wrong_ones_cost_none(model):
    ref = plain(model, max_new_tokens=13, stop_token_ids=[])
    new = [r[-13:] for r in ref.tolist()]
    gen = generate_drafted(model, ROWS, 13, oracle(new, ROWS, 3), stop_token_ids=[], max_width=4, details=True)
    assert gen.fed == [1, 4, 4, 4] and gen.active == [3, 3, 3, 3]  # 1 + 3 x 4 tokens: every guess taken
    assert gen.lengths == [13, 13, 13] and torch.equal(gen.tokens, ref)
    gen = generate_drafted(model, ROWS, 13, lambda t: ([], 0), stop_token_ids=[], details=True)
    assert gen.fed == [1] * 13 and torch.equal(gen.tokens, ref)  # no guess: plain greedy, one column a pass


def test_rows_leave_at_their_own_stop_inside_a_pass(model):
    """stop_after ends rows at their 2nd `target`, which falls in the middle of a pass's columns."""
    free = plain(model, max_new_tokens=12, stop_token_ids=[])[:, -12:]
    target = free[0, 0].item()
    ref = plain(model, max_new_tokens=12, stop_token_ids=[], stop_after=(target, 2), pad_token_id=0, details=True)
    gen = generate_drafted(model, ROWS, 12, oracle(free.tolist(), ROWS, 4), stop_token_ids=[],
                           stop_after=(target, 2), pad_token_id=0, details=True)
    assert len(set(ref.lengths)) > 1 and gen.lengths == ref.lengths and torch.equal(gen.tokens, ref.tokens)
    assert gen.active[0] == 3 and gen.active[-1] < 3  # finished rows left the batch


def test_wrong_guesses_take_no_cache_slot(model):
    """Guesses always wrong and always 'sure', 10 columns a pass: each pass attends to the 8 prompt
    slots, one kept slot per earlier pass and its own 10 columns, then drops its 9 guesses; the
    widths shrink only as the rooms do (19 tokens to go after the prefill)."""
    ref = plain(model, max_new_tokens=20, stop_token_ids=[])
    never = next(t for t in range(160) if t not in ref[:, 8:].flatten().tolist())  # a token greedy never picks
    gen = generate_drafted(model, ROWS, 20, lambda t: ([never] * 9, 9), stop_token_ids=[], max_width=10, details=True)
    assert torch.equal(gen.tokens, ref)
    assert gen.fed == [1] + [10] * 10 + list(range(9, 0, -1))
    assert gen.keys == [8] + [8 + i + 10 for i in range(10)] + [27] * 9


def test_holes_close_when_the_cache_runs_short(model):
    """Row 0 guesses 6 right of 9, rows 1 and 2 none: each pass keeps 7 slots for all three, holes in
    rows 1 and 2. After 3 passes row 0 is done (1 + 3 x 7 >= 20 tokens), the cache holds 29 of its
    8 + 2 x 20 slots and rows 1, 2 have 16 tokens to go: 3 spare slots, too few for a pass of 10. The
    holes are closed (row 2: 5 prompt tokens + 3 fed = 8 slots on, row 1: 6), so the 4th pass attends
    to 8 + 10 slots and stays 10 wide; without closing them it would narrow to 4."""
    ref = plain(model, max_new_tokens=20, stop_token_ids=[])
    never = next(t for t in range(160) if t not in ref[:, 8:].flatten().tolist())
    right = oracle([r[-20:] for r in ref.tolist()], ROWS, 9)  # 6 true tokens a guess

    def draft(tokens):
        return ((right(tokens)[0] + [never] * 9)[:9] if tokens[0] == 5 else [never] * 9), 9
    gen = generate_drafted(model, ROWS, 20, draft, stop_token_ids=[], max_width=10, details=True)
    assert torch.equal(gen.tokens, ref)
    assert gen.active[:5] == [3, 3, 3, 3, 2] and gen.keys[:5] == [8, 18, 25, 32, 18] and gen.fed[4] == 10


def test_a_pass_is_as_wide_as_the_median_rows_sure_guess(model):
    """Four rows sure of 0, 1, 2 and 3 guessed tokens: each pass feeds 1 + 2 columns (the median of
    the sorted sures [0, 1, 2, 3] is the third), not 1 + the smallest, the largest or the mean."""
    rows = ROWS + [[40, 41]]
    sure_of = {5: 3, 20: 0, 30: 1, 40: 2}  # by each row's first prompt token
    gen = generate_drafted(model, rows, 10, lambda t: ([1] * 5, sure_of[t[0]]), stop_token_ids=[], details=True)
    assert gen.fed[:4] == [1, 3, 3, 3]  # the prefill, then passes of 3 until the rows' budgets run short
    assert torch.equal(gen.tokens, plain(model, rows, max_new_tokens=10, stop_token_ids=[]))


def test_each_column_is_penalised_for_the_guesses_before_it():
    """seen_by_column by hand: 2 rows, a vocabulary of 4 where the head has tokens 0, 1 and 3 (column
    of token 2: -1). Row 0 guesses [0, 3]: column 1 adds token 0, column 2 adds 0 and 3's column.
    Row 1 guesses [2, hole]: token 2 has no head column and a hole is no token, so nothing is added."""
    seen = torch.tensor([[False, True, False], [False, False, False]])  # row 0 holds token 1 already
    column_of = torch.tensor([0, 1, -1, 2])
    guess = torch.tensor([[0, 3], [2, NO_GUESS]])
    out = seen_by_column(seen, guess, column_of)
    assert out.tolist() == [[[False, True, False], [True, True, False], [True, True, True]],
                            [[False, False, False]] * 3]


def test_a_budget_of_one_token_needs_no_pass(model):
    gen = generate_drafted(model, ROWS, 1, wild(1, 160), stop_token_ids=[], details=True)
    assert torch.equal(gen.tokens, plain(model, max_new_tokens=1, stop_token_ids=[])) and gen.fed == [1]


def test_flops_of_checked_guesses_equal_the_flop_counter():
    """flops.generate with fed and keys counts what runs: holes, wrong guesses, rows leaving, all
    included, each pass attending to the slots the cache kept."""
    cfg = tiny_config()
    model32 = random_model(cfg)
    allowed = list(range(20, 33))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        gen = generate_drafted(model32, ROWS, 9, wild(2, 40), allowed_token_ids=allowed, stop_token_ids=[],
                               stop_after=(25, 2), details=True)
    assert len(set(gen.fed[1:])) > 1  # passes of several widths
    setup = flops.Setup(cfg, head_rows=13)
    assert fc.get_total_flops() == flops.generate(setup, 3, 8, 0, active=gen.active, fed=gen.fed, keys=gen.keys).matmul
    undropped = flops.generate(setup, 3, 8, 0, active=gen.active, fed=gen.fed)  # as if no guess left the cache
    assert undropped.matmul > fc.get_total_flops()
    with pytest.raises(ValueError, match="keys counts the slots of passes with guesses"):
        flops.generate(setup, 3, 8, 5, keys=[8] * 6)
    ones = [3, 3, 2, 2, 1]  # one column a pass is plain decoding's count
    assert flops.generate(setup, 3, 8, 5, active=ones, fed=[1] * 5) == flops.generate(setup, 3, 8, 5, active=ones)


# ---------------------------------------------------------------- the LLMTIME guess

@pytest.mark.parametrize("text, expected", [
    ("0.1;2.73,1.99;2.81,", ("1.99;2.8", 2)),  # the previous predator's integer part and '.', then its decimals (unsure)
    ("0.1;2.73,1.99;2.81,1.9", ("9;2.81,1", 0)),  # a decimal first: nothing sure
    ("0.1;2.73,1.99;2.81,1.94", (";2.81,1.", 3)),  # complete: ';', then the prey's previous integer part and '.'
    ("0.1;2.73,1.99;", ("2.73,1.9", 2)),
    ("0.1;12.73,1.99;1", ("2.73,1.9", 2)),  # an integer part of two digits, digit by digit
    ("0.1;9.73,1.99;1", (".73,1.99", 1)),  # 9 -> 1: the integer part changed; '.' is the best guess
    ("0.1;2.7,1.9;2.8,1.9", (";2.8,1.9", 3)),  # one decimal: values end after one
    ("2.73,1.99", ("", 0)),  # no whole step yet
    ("0.1;2.73,1.99,5;2", ("", 0)),  # a step of three values: no pattern to follow
    ("0.1;2.73,1.99;2.81,1.94,5", ("", 0)),  # the step under way has three values
])
def test_guess_follows_the_format_and_the_previous_step(text, expected):
    assert guess(text) == expected


CYCLE = "2.83,0.47;3.64,0.49;4.58,0.55;5.60,0.67;"  # a closed orbit's text: the model, once it sees it, copies it


def test_a_text_that_repeats_is_guessed_from_what_followed_it_all_sure():
    text = "9.99,0.11;" + CYCLE + "7.20,1.19;2.83,0.47;3.64"  # its last 10 characters, ",0.47;3.64", are in CYCLE
    assert RECALL == 10 and guess(text) == (",0.49;4.", 8) and guess(text, 12) == (",0.49;4.58,0", 12)
    near = "9.99,0.11;" + CYCLE + "7.20,1.19;2.83,0.4"  # ";2.83,0.4" occurred, "9;2.83,0.4" did not
    assert guess(near) == follow_format(near, 8) == ("9;2.83,0", 0)


def test_recall_copies_the_latest_earlier_place_and_only_an_earlier_one():
    assert recall("0.50,0.50;1.00,0.50,0.50;" + "2.00,0.50,0.50;", 4) == "2.00"  # the later of two places
    assert recall("abcdefghij", 4) == ""  # the key itself is not an earlier place
    assert recall("abcdefghijabcdefghij", 4) == "abcd"  # a match may run right up to the key
    assert recall("5.00,5.00;", 4) == "" and recall("5.00,5.00", 4) == ""  # too short for a key of 10


def test_one_decimal_values_are_sure_except_their_decimal():
    assert guess("0.1;2.7,1.9;2.8,") == ("1.9;2.8,", 2)


def test_the_draft_reads_token_ids_up_to_the_first_other_token():
    id_of = {c: 100 + i for i, c in enumerate("0123456789.,;")}
    draft = LLMTimeDraft(id_of, n=4)
    ids = [7, 8] + [id_of[c] for c in "1.5,0.5;2.73,1.99;2.81,1.94"]
    assert draft(ids) == ([id_of[c] for c in ";2.8"], 3)
    assert draft([7] + [id_of[c] for c in "2.73,1.99;2.81,"]) == ([], 0)  # the prompt's first step is cut by token 7
    long = [id_of[c] for c in "1.5,0.5;2.73,1.99;2.81,"]
    assert LLMTimeDraft(id_of)(long) == ([id_of[c] for c in "1.99;2.8"], 2)  # 8 characters unless told
