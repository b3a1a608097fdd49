"""Parity with transformers on the real Qwen2.5 0.5B weights (QWEN_MIN_CHECKPOINT; skipped without)."""

import os
from pathlib import Path

import pytest
import torch

from qwen_min import GenerationConfig, KVCache, Qwen2, Tokenizer, generate
from qwen_min.errors import UserError
from qwen_min.generate import pad_left

LLMTIME = "2.73,2.99;2.13,2.24;1.96,1.62;2.06,1.17;2.37,0.86;"
# QWEN_MIN_TEST_DEVICE=cuda runs the parity tests below with both models on a GPU (default: cpu).
DEVICE = os.environ.get("QWEN_MIN_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def models(checkpoint):
    transformers = pytest.importorskip("transformers")
    ours = Qwen2.from_pretrained(checkpoint, dtype=torch.float32).to(DEVICE)
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    return ours, ref.to(DEVICE).eval(), Tokenizer.from_pretrained(checkpoint)


def padded(rows, pad_id):
    """pad_left's (ids, mask), on DEVICE."""
    ids, mask = pad_left(rows, pad_id)
    return ids.to(DEVICE), mask.to(DEVICE)


def prompts(tok):
    return [tok.chat_prompt("Continue this predator-prey series, prey,predator per step:\n" + LLMTIME),
            tok.chat_prompt("What is 17 * 23?"),
            LLMTIME]


def test_float32_logits_match_transformers_eager_and_sdpa(models):
    ours, ref, tok = models
    ids = torch.tensor([tok.encode(prompts(tok)[0])], device=DEVICE)
    with torch.no_grad():
        logits = ours(ids)
        sdpa = ref(ids).logits
        ref.config._attn_implementation = "eager"
        try:
            eager = ref(ids).logits
        finally:
            ref.config._attn_implementation = "sdpa"
    assert logits.shape == (1, ids.shape[1], 151936)
    assert (logits - sdpa).abs().max().item() <= 1e-4
    assert (logits - eager).abs().max().item() <= 1e-4


def test_kv_cache_matches_full_forward(models):
    ours, _, tok = models
    rows = [tok.encode(p) for p in prompts(tok)]
    ids, mask = padded(rows, tok.pad_id)
    T = ids.shape[1]
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = KVCache.for_model(ours, 3, T)
        pre = ours(ids[:, :T - 4], attention_mask=mask[:, :T - 4], cache=cache)
        steps = [ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(T - 4, T)]
    inc = torch.cat([pre] + steps, dim=1)
    # float32 rounding on logits of magnitude ~30 (different kernel shapes for 1 and T queries)
    assert (inc - full)[mask.bool()].abs().max().item() <= 1e-4


@pytest.mark.parametrize("batched", [False, True])
def test_greedy_generation_equals_transformers(models, batched):
    ours, ref, tok = models
    rows = [tok.encode(p) for p in prompts(tok)]
    if not batched:
        rows = rows[:1]
    ids, mask = padded(rows, tok.pad_id)
    mine = generate(ours, ids, max_new_tokens=64, attention_mask=mask, stop_token_ids=tok.stop_ids, pad_token_id=tok.pad_id)
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, repetition_penalty=1.0,
                          temperature=None, top_p=None, top_k=None, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
    assert mine.shape[1] > ids.shape[1] + 8  # it really generated
    assert mine.tolist() == theirs.tolist()


def llmtime_prompts():
    """Numeric LLMTIME prompts of three lengths (left-padded in a batch), as a forecast sends them."""
    longer = "3.10,0.71;3.95,0.65;4.88,0.74;5.61,1.02;"
    return [LLMTIME + longer, LLMTIME, LLMTIME[:24]]


def test_checkpoint_generation_config_is_qwens(checkpoint):
    gc = GenerationConfig.from_pretrained(checkpoint)
    assert gc == GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1,
                                  eos_token_id=(151645, 151643), pad_token_id=151643)


def test_greedy_with_the_checkpoints_generation_config_equals_transformers(models, checkpoint):
    """As the reports decoded: transformers' generate with the checkpoint's generation_config.json
    (repetition penalty 1.1) and do_sample=False, batched over LLMTIME prompts of different lengths."""
    ours, ref, tok = models
    ids, mask = padded([tok.encode(p) for p in llmtime_prompts()], tok.pad_id)
    gc = GenerationConfig.from_pretrained(checkpoint)
    mine = generate(ours, ids, max_new_tokens=48, attention_mask=mask, generation_config=gc, do_sample=False)
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False)  # ref carries the same file
    assert ref.generation_config.repetition_penalty == 1.1
    assert mine.shape[1] > ids.shape[1] + 8 and mine.tolist() == theirs.tolist()
    plain = generate(ours, ids, max_new_tokens=48, attention_mask=mask, use_generation_config=False,
                     stop_token_ids=tok.stop_ids, pad_token_id=tok.pad_id)
    assert plain.tolist() != mine.tolist()  # the penalty changed the forecasts


def test_sampling_with_the_checkpoints_generation_config_equals_transformers(models, checkpoint):
    """Same seed, same draws: temperature 0.7, top-k 20, top-p 0.8, penalty 1.1 from the file.
    Holds while no row has finished (finished rows leave our batch, not transformers'), so the
    prompts are bare numbers, which the model continues without an end token."""
    ours, ref, tok = models
    ids, mask = padded([tok.encode(p) for p in llmtime_prompts()], tok.pad_id)
    gc = GenerationConfig.from_pretrained(checkpoint)
    mine = generate(ours, ids, max_new_tokens=24, attention_mask=mask, generation_config=gc, seed=1234)
    torch.manual_seed(1234)
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=24)
    assert mine.shape[1] == ids.shape[1] + 24 and mine.tolist() == theirs.tolist()
    greedy = generate(ours, ids, max_new_tokens=24, attention_mask=mask, generation_config=gc, do_sample=False)
    assert greedy.tolist() != mine.tolist()  # it really sampled


# Real-weight only for the ids (15-24, 13, 11, 26 are Qwen's vocabulary's) and the template against
# transformers'; the ".," merge and the multi-token refusal also run on a tiny BPE in test_tokenizer.py.
def test_real_tokenizer_digits_separators_and_chat_template(models, checkpoint):
    transformers = pytest.importorskip("transformers")
    _, _, tok = models
    assert [tok.encode(c)[0] for c in "0123456789"] == list(range(15, 25))
    assert (tok.encode("."), tok.encode(","), tok.encode(";")) == ([13], [11], [26])
    assert len(tok.encode(LLMTIME)) == len(LLMTIME)  # one token per character
    assert tok.character_ids("0123456789.,;") == list(range(15, 25)) + [13, 11, 26]
    assert len(tok.encode("0123456789.,;")) == 12  # BPE merges ".," when they touch
    with pytest.raises(UserError, match="one token each"):
        tok.character_ids("1\U0001d11e")  # the G clef is two byte-level tokens
    assert (tok.pad_id, tok.im_start_id, tok.eos_id) == (151643, 151644, 151645)
    hf_tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": "Forecast: " + LLMTIME}]
    assert tok.chat_prompt(messages) == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = prompts(tok)[0]
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]


# Real-weight only: a tiny model's bytes vanish in the interpreter's RSS noise. The tiny counterpart
# (built on meta, no random init) is test_model.py's test_loading_builds_on_meta_and_runs_no_random_init.
def test_loading_does_not_need_twice_the_model_in_memory(checkpoint, tmp_path):
    """Built on the meta device and filled tensor by tensor: peak memory is one float32 model plus
    the memory-mapped bfloat16 file, not a random-initialised model and a loaded copy (> 2x)."""
    import subprocess
    import sys

    script = ("import resource, sys, torch\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "from qwen_min import Qwen2\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "m = Qwen2.from_pretrained(sys.argv[1])\n"
              "size = sum(p.numel() * p.element_size() for p in m.parameters())\n"
              "print(size, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n")
    out = subprocess.run([sys.executable, "-c", script, str(checkpoint)], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    size, grown = map(float, out.stdout.split())
    assert size > 1.9e9  # the float32 model really was loaded
    assert grown < 1.75 * size
