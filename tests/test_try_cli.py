"""`python -m qwen_min` with a fine-tune: --adapter / --run, the chat loop, forecast mode; and
lora.load_adapter reading a peft folder in one call."""

import json

import numpy as np
import pytest
import torch

import lora
from conftest import hf_twin, random_model, tiny_config, write_checkpoint
from data import llmtime
from qwen_min import Tokenizer
from qwen_min import __main__ as cli
from qwen_min.errors import UserError


def adapted(seed=3):
    """A tiny model with random LoRA on q, v and down (B nonzero, so the adapter changes the output)."""
    model = random_model(tiny_config())
    lora.inject_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def run(ckpt, tmp_path_factory):
    """A run folder as train.py leaves one: args.json, scaler.json, best/ (with an lm_head bias)."""
    folder = tmp_path_factory.mktemp("run")
    model = adapted()
    bias = torch.linspace(-1, 1, 160)
    lora.save_adapter(model, folder / "best", extra={"lm_head_bias": bias})
    (folder / "args.json").write_text(json.dumps({"model": str(ckpt), "scaling": "global", "decimals": 2,
                                                  "percentile": 95.0, "scale_target": 10.0}))
    (folder / "scaler.json").write_text(json.dumps(llmtime.Scaler(np.float64(4.0), 95.0, 10.0, False).to_dict()))
    return folder


def greedy_by_hand(model, ids, n):
    """n greedy tokens by full forward passes (no cache, no generate()): the independent reference."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def test_peft_adapter_loads_with_one_call(tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted()
    hf = peft.get_peft_model(hf_twin(random_model(tiny_config())),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # peft's own adapter, different from ours
        for n, p in hf.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "peft")
    fresh = random_model(tiny_config())
    assert lora.load_adapter(fresh, tmp_path / "peft") == {}  # no name-mapping argument
    ids = torch.randint(0, 160, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (fresh(ids) - hf.eval()(ids).logits).abs().max().item() <= 1e-5
        assert not torch.allclose(fresh(ids), model(ids), atol=1e-3)


def test_adapter_flag_generates_what_the_merged_fine_tune_writes(ckpt, run, capsys):
    tok = Tokenizer.from_pretrained(ckpt)
    prompt = "abc 12;"
    cli.main(["--model", str(ckpt), "--adapter", str(run / "best"), "--prompt", prompt, "--max-new-tokens", "6",
              "--no-generation-config", "--temperature", "0"])
    printed = capsys.readouterr().out.rstrip("\n")
    model = adapted()
    lora.merge_lora(model)
    model.add_lm_head_bias()
    with torch.no_grad():
        model.lm_head_bias.copy_(torch.linspace(-1, 1, 160))
    expected = greedy_by_hand(model, tok.encode(prompt), 6)
    assert printed == tok.decode(expected)
    base = greedy_by_hand(random_model(tiny_config()), tok.encode(prompt), 6)
    assert expected != base  # the adapter (and its bias) changed what is written
    cli.main(["--run", str(run), "--prompt", prompt, "--max-new-tokens", "6", "--no-generation-config", "--temperature", "0"])
    assert capsys.readouterr().out.rstrip("\n") == printed  # --run finds the same model and adapter


class Model:
    class config:
        max_seq_len = 60


class CharTokenizer:
    """One id per character; chat_prompt as a plain join, so lengths are easy to count."""

    def encode(self, text):
        return list(range(len(text)))

    def chat_prompt(self, history):
        return "".join(f"[{m['role']}]{m['content']}" for m in history)


def test_chat_keeps_the_conversation_and_forgets_the_oldest_when_it_outgrows_the_model():
    lines, written, prompts = iter(["hello", "", "second", "x" * 80]), [], []

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    def reply(ids):
        prompts.append(len(ids))
        return f" answer{len(prompts)} "

    history = cli.chat(Model(), CharTokenizer(), reply, max_new=10, read=read, write=written.append)
    # turn 1: "[user]hello" = 11; turn 2: + "[assistant]answer1" (18) + "[user]second" (12) = 41, fits 60 - 10
    assert prompts == [11, 41]
    assert written[1:] == ["answer1", "answer2", "(that message is too long for the model's 60 positions; try a shorter one)", ""]
    assert [m["content"] for m in history] == ["hello", "answer1", "second", "answer2"]


def test_chat_forgets_old_exchanges_first():
    lines, prompts = iter(["a" * 20, "b" * 20]), []

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    history = cli.chat(Model(), CharTokenizer(), lambda ids: prompts.append(len(ids)) or "ok", max_new=10, read=read,
                       write=lambda _: None)
    # turn 2 whole: 26 + 13 + 26 = 65 > 50, so the first exchange goes, leaving "[user]" + 20 b's = 26
    assert prompts == [26, 26]
    assert [m["content"] for m in history] == ["b" * 20, "ok"]


def test_forecast_mode_scales_with_the_runs_scale_and_reads_back_original_units(ckpt, run, monkeypatch, capsys):
    tok = Tokenizer.from_pretrained(ckpt)
    truth = np.array([[1.0, 0.5], [1.2, 0.6], [1.6, 0.8]])  # at the run's level 4 -> target 10: x * 2.5
    written = "2.50,1.25;3.00,1.50;4.00,2.00;"
    seen = {}

    def oracle(model, prompts, max_new, **kw):
        seen["prompt"] = tok.decode(prompts[0])
        seen["allowed"] = kw["allowed_token_ids"]
        return torch.tensor([prompts[0] + tok.encode(written)])

    monkeypatch.setattr(cli, "generate", oracle)
    values = cli.main(["--run", str(run), "--forecast", "0.4,0.2; 0.8,0.4", "--h", "3"])
    assert seen["prompt"] == "1.00,0.50;2.00,1.00;"  # context x 2.5, two decimals, a trailing ';'
    assert sorted(tok.decode([i]) for i in seen["allowed"]) == sorted("0123456789.,;")
    assert np.allclose(values, truth)
    assert capsys.readouterr().out.strip() == "1,0.5; 1.2,0.6; 1.6,0.8"


def test_forecast_mode_without_a_run_scales_the_series_by_itself(ckpt, monkeypatch):
    tok = Tokenizer.from_pretrained(ckpt)
    monkeypatch.setattr(cli, "generate", lambda model, prompts, max_new, **kw: torch.tensor([prompts[0] + tok.encode("10.00,5.00;")]))
    context = np.array([[2.0, 1.0], [4.0, 2.0]])
    level = np.percentile(context, 95)  # 3.8: LLMTIME's per-series scale, P95 -> 10
    values = cli.main(["--model", str(ckpt), "--forecast", "2,1; 4,2", "--h", "1"])
    assert np.allclose(values, [[level, level / 2]], atol=1e-9)


@pytest.mark.parametrize("flags, says", [
    (["--forecast", "1,2; x,3"], "step 2 ('x,3') is not a pair"),
    (["--forecast", "1,2; -1,3"], "step 2"),
    (["--forecast", " ; "], "--forecast is empty"),
    (["--forecast", "0,0; 0,0"], "all zeros"),
    (["--adapter", "/nonexistent/adapter", "--prompt", "a"], "is not a folder"),
])
def test_bad_input_is_one_sentence(ckpt, flags, says, capsys):
    with pytest.raises(UserError, match=None) as e:
        cli.main(["--model", str(ckpt), *flags])
    assert says in str(e.value)


@pytest.mark.parametrize("flags", [[], ["--prompt", "a", "--forecast", "1,2"], ["--forecast", "1,2", "--chat"],
                                   ["--forecast", "1,2", "--h", "0"]])
def test_nonsense_flag_combinations_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(flags)
    assert "error:" in capsys.readouterr().err


def test_interactive_chat_on_a_tiny_model_replies_as_greedy_decoding_by_hand(ckpt, monkeypatch, capsys):
    """The real --chat path: stdin lines, Qwen's chat template over the whole conversation, greedy replies."""
    tok = Tokenizer.from_pretrained(ckpt)
    lines = iter(["hi", "and now"])

    def fake_input(prompt):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    cli.main(["--model", str(ckpt), "--chat", "--max-new-tokens", "5", "--no-generation-config", "--temperature", "0"])
    out = capsys.readouterr().out.splitlines()
    model = random_model(tiny_config())
    first = tok.decode(greedy_by_hand(model, tok.encode(tok.chat_prompt([{"role": "user", "content": "hi"}])), 5)).strip()
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and now"}]
    second = tok.decode(greedy_by_hand(model, tok.encode(tok.chat_prompt(history)), 5)).strip()
    assert out[1:] == [f"you> {first}", f"you> {second}", "you> "]


def test_chat_refuses_a_reply_length_that_leaves_no_room(ckpt):
    with pytest.raises(UserError, match="leaves no room for a message"):
        cli.main(["--model", str(ckpt), "--chat", "--max-new-tokens", "256"])
