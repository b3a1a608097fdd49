"""docs/tour.md runs: its Python blocks, in order, in one namespace, on a tiny random model (or the
real one when QWEN_MIN_CHECKPOINT names it), so the tour cannot fall behind the code."""

import os
import re

import pytest

from conftest import REPO, random_model, tiny_config, write_checkpoint


def blocks():
    return re.findall(r"```python\n(.*?)```", (REPO / "docs" / "tour.md").read_text(), flags=re.S)


def test_the_tour_has_its_six_stops_in_order():
    text = (REPO / "docs" / "tour.md").read_text()
    heads = re.findall(r"^## (\d)\. ", text, flags=re.M)
    assert heads == ["1", "2", "3", "4", "5", "6"] and len(blocks()) >= 7


def test_every_block_of_the_tour_runs_in_order(tmp_path, monkeypatch, capsys):
    if not os.environ.get("QWEN_MIN_CHECKPOINT"):  # a tiny model of the same architecture
        folder = write_checkpoint(random_model(tiny_config(max_seq_len=512)), tmp_path / "tiny")
        monkeypatch.setenv("QWEN_MIN_CHECKPOINT", str(folder))
    namespace = {"__name__": "tour"}
    for i, code in enumerate(blocks(), 1):
        try:
            exec(compile(code, f"docs/tour.md block {i}", "exec"), namespace)
        except Exception as e:  # name the block, so the page is easy to fix
            pytest.fail(f"docs/tour.md block {i} failed: {type(e).__name__}: {e}")
    out = capsys.readouterr().out
    assert "FlopCounterMode" in out and "repairs:" in out  # the last blocks ran and printed
