"""bench/roofline.py: the floor of a forecast, against bytes and FLOPs counted by hand on a tiny model."""

import sys
from pathlib import Path

import pytest

from tests.conftest import random_model, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import roofline  # noqa: E402

# tiny_config: V 160, D 64, F 112, 2 layers, 4 query heads, 2 kv heads of 16. Per layer:
# q 64x64 + 64, k and v 64x32 + 32 each, o 64x64, gate/up/down 3 x 64x112, two norms of 64.
BODY = 4 * (2 * (64 * 64 + 64 + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 112 + 2 * 64) + 64)  # float32 bytes, final norm too
HEAD13 = 4 * 13 * 64


def cache(rows, slots):  # k and v, 2 layers, 2 kv heads of 16, float32
    return 2 * 2 * rows * 2 * slots * 16 * 4


def test_body_and_head_bytes():
    model = random_model(tiny_config())
    assert roofline.body_weight_bytes(model) == BODY == 272_640
    assert roofline.head_bytes(model, 13) == HEAD13
    assert roofline.head_bytes(model, None) == 4 * 160 * 64  # free decoding: the whole vocabulary


def test_memory_bound_floor_sums_bytes_over_the_prefill_and_each_step_with_rows_leaving():
    """At unlimited FLOP/s and 1 byte/s the floor is the bytes: prompts of 5, rows of 3 and 1 new tokens.
    The first token comes from the prefill; step i feeds token i for the rows that need more."""
    model = random_model(tiny_config())
    prefill, decode = roofline.forecast_floor(model, 5, [3, 1], 13, bw=1.0, peak=1e30)
    assert prefill == BODY + HEAD13 + cache(2, 5)
    assert decode == (BODY + HEAD13 + cache(1, 6)) + (BODY + HEAD13 + cache(1, 7))  # only the 3-token row goes on


def test_compute_bound_prefill_counts_matmul_flops():
    """At 1 FLOP/s and unlimited bandwidth: 2 rows of 5 tokens. Per token and layer the projections
    are 2 x (64x64 + 2 x 64x32 + 64x64 + 3 x 64x112) FLOPs; attention adds 2 x 5 x 16 x 5 per head and
    row for the scores and again for the weighted sum; the head runs on each row's last position."""
    model = random_model(tiny_config())
    per_token_layer = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 112)
    attention = 2 * (2 * 5 * 16 * 5) * 4 * 2  # scores + weighted sum, 4 heads, 2 rows
    prefill, _ = roofline.forecast_floor(model, 5, [1, 1], 13, bw=1e30, peak=1.0)
    assert prefill == pytest.approx(2 * (10 * per_token_layer + attention) + 2 * 2 * 64 * 13)


def test_samples_share_one_prefill():
    model = random_model(tiny_config())
    one, _ = roofline.forecast_floor(model, 5, [2, 2], None, bw=1.0, peak=1e30)
    shared, decode = roofline.forecast_floor(model, 5, [2, 2, 2, 2], None, bw=1.0, peak=1e30, samples=2)
    assert shared == one  # two prompts prefilled once each, then four rows decode
    assert decode == BODY + 4 * 160 * 64 + cache(4, 6)


def test_an_untied_head_is_counted_once_as_head_rows():
    model = random_model(tiny_config(tie_embeddings=False))
    assert roofline.body_weight_bytes(model) == BODY  # neither the embedding table nor the separate head
    assert roofline.head_bytes(model, None) == 4 * 160 * 64


def test_each_phase_takes_the_larger_of_its_two_bounds():
    """With both bounds finite, the prefill (10 tokens) is bound by FLOPs and the decode step (1 row)
    by bytes: a sum of the two bounds, or the wrong one, gives other numbers."""
    model = random_model(tiny_config())
    flop_only, _ = roofline.forecast_floor(model, 5, [1, 1], 13, bw=1e30, peak=1.0)
    _, bytes_only = roofline.forecast_floor(model, 5, [2, 1], 13, bw=1.0, peak=1e30)
    bw, peak = 1.0, flop_only / (BODY + HEAD13 + cache(2, 5)) / 2  # the prefill's FLOPs take twice its bytes' time
    prefill, decode = roofline.forecast_floor(model, 5, [2, 1], 13, bw=bw, peak=peak)
    assert prefill == pytest.approx(flop_only / peak)
    assert decode == pytest.approx(bytes_only)  # one row: 1/10 of the prefill's FLOPs, far under its bytes


def test_compute_bound_decode_counts_each_step_with_its_rows_and_keys():
    """Rows of 3 and 2 new tokens: step 1 feeds 2 rows attending to 6 keys, step 2 one row to 7."""
    model = random_model(tiny_config())
    per_token_layer = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 112)

    def step(rows, keys):  # projections, then scores and weighted sum for 4 heads of 16, then 13 head rows
        return rows * (2 * (per_token_layer + 2 * (2 * 16 * keys) * 4) + 2 * 64 * 13)
    _, decode = roofline.forecast_floor(model, 5, [3, 2], 13, bw=1e30, peak=1.0)
    assert decode == pytest.approx(step(2, 6) + step(1, 7))
