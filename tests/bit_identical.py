"""Is a refactor behaviour-preserving? The same short training run and evaluations, made by two commits.

    python tests/bit_identical.py --before 270a50a --after HEAD --model CKPT --data FILE

Each commit is cloned into a scratch folder and runs, on the checkpoint given (the real one is the
point): train.py for 3 steps (context 128, batch 2, validation at step 2), evaluate.py on the run
under our protocol (greedy, and sampled with 2 samples) and under report B's preset, and
`flops.py --json`. Then every output file of the two is compared: adapters and state.pt byte
for byte, JSON and JSON-lines value for value, less what records the invocation rather than the
result (wall times, provenance, the folders' own paths). Prints one line per file and ALL SAME or
how many differ; exits 1 when any does. On demand, not in CI: minutes of CPU per commit.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOLATILE = {"timing", "provenance", "wall_s", "tokens_per_s", "out", "settings", "torch_threads"}


def produce(commit, out, model, data):
    """Clones `commit` and runs the fixed pipeline into `out`."""
    code = out / "code"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(code)], check=True)
    subprocess.run(["git", "-C", str(code), "checkout", "--quiet", commit], check=True)
    run = out / "run"
    steps = [
        ["train.py", "--model", model, "--data", data, "--steps", "3", "--context", "128", "--batch", "2",
         "--eval-every", "2", "--eval-batches", "1", "--no-progress", "--out", str(run)],
        ["evaluate.py", "--run", str(run), "--limit", "3", "--k", "20", "--h", "5", "--batch", "3", "--plots", "0",
         "--out", str(out / "eval-ours")],
        ["evaluate.py", "--run", str(run), "--limit", "2", "--samples", "2", "--temperature", "0.8", "--k", "20", "--h", "4",
         "--plots", "0", "--out", str(out / "eval-sampled")],
        ["evaluate.py", "--run", str(run), "--preset", "report-b", "--limit", "2", "--plots", "0", "--out", str(out / "eval-report-b")],
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # one thread: the same summation order in both
    for argv in steps:
        with open(out / f"{argv[0]}.log", "a") as log:
            subprocess.run([sys.executable, *argv], cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    flops_json = subprocess.run([sys.executable, "flops.py", "--json"], cwd=code, env=env, check=True, capture_output=True).stdout
    (out / "flops.json").write_bytes(flops_json)


def comparable(x, folder):
    if isinstance(x, dict):
        return {k: comparable(v, folder) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [comparable(v, folder) for v in x]
    return x.replace(str(folder), "OUT") if isinstance(x, str) else x


def compare(a, b):
    differ = 0
    for name in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "code" not in p.relative_to(a).parts):
        x, y = a / name, b / name
        if name.suffix in (".safetensors", ".pt"):
            same = y.exists() and hashlib.sha256(x.read_bytes()).digest() == hashlib.sha256(y.read_bytes()).digest()
        elif name.suffix == ".json":
            same = y.exists() and comparable(json.loads(x.read_text()), a) == comparable(json.loads(y.read_text()), b)
        elif name.suffix == ".jsonl":
            same = y.exists() and ([comparable(json.loads(line), a) for line in x.read_text().splitlines()]
                                   == [comparable(json.loads(line), b) for line in y.read_text().splitlines()])
        else:
            continue
        print(f"{'same' if same else 'DIFFERENT'}: {name}")
        differ += not same
    print("ALL SAME" if not differ else f"{differ} files differ")
    return differ


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="a commit")
    p.add_argument("--after", default="HEAD", help="a commit (default: HEAD)")
    p.add_argument("--model", required=True, help="checkpoint folder (the real one: the claim is about it)")
    p.add_argument("--data", required=True, help="an h5 file in the coursework layout")
    p.add_argument("--keep", type=Path, help="keep both outputs in this folder")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qwen-min-bit-identical-") as tmp:
        root = a.keep or Path(tmp)
        outs = []
        for name, commit in (("before", a.before), ("after", a.after)):
            out = root / name
            out.mkdir(parents=True)
            print(f"{name}: {commit} ...", flush=True)
            produce(commit, out, str(Path(a.model).resolve()), str(Path(a.data).resolve()))
            outs.append(out)
        return 1 if compare(*outs) else 0


if __name__ == "__main__":
    sys.exit(main())
