"""A study: many train.py runs under one FLOP budget, laid out by a design, judged at equal compute.

    python study.py studies/cpu-small.toml              # run the study (or continue a killed one)
    python study.py studies/cpu-small.toml --report     # only write its report
    python study.py studies/cpu-small.toml --final      # train the best settings to the end, evaluate them
    python study.py SPEC --storage postgresql://host/db # workers on several machines share one study

A spec file (TOML; studies/*.toml) names the budget, the train.py flags every trial shares
([train]), the axes and their values ([axes]) and the design: "one-at-a-time" (the base, then
each axis varied alone, as both reports did), "grid" (every combination) or "search" (Optuna's TPE
sampler picks `trials` settings). The engine is Optuna with database storage: a SQLite file in the
study folder by default, any database URL to share one study between workers. Each trial is a
train.py run folder, STUDY/trials/NNNN, so everything train.py promises (resume after any kill,
the ledger of FLOPs) holds for it.

The budget belongs to the study. Before a trial starts, its planned FLOPs (flops.py's plan of the
run, at full windows: an upper bound) are reserved against the budget in one atomic database
update, and the trial runs with that as its own --flops-budget, so it cannot overrun; when it ends,
what it did not spend goes back. A trial that does not fit what is left never starts. Trials are
judged at equal compute: each validation is reported at the FLOPs spent so far, and a trial whose
best loss is worse than the median of the finished trials' best at the same FLOPs is stopped
(pruned) and returns the rest of its reservation, so the budget goes to settings that can still win.
"""

import argparse
import contextlib
import fcntl
import io
import itertools
import json
import math
import os
import socket
import statistics
import tomllib
from pathlib import Path

import flops
import train
from qwen_min.cli import HelpFormatter
from qwen_min.errors import UserError, run_cli
from qwen_min.files import FolderLock, atomic_write_json, atomic_write_text

DESIGNS = ("one-at-a-time", "grid", "search")
SPARE = "no slot of the design was left"  # a trial asked for as another worker took the last slot


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("study.py needs Optuna: pip install -r requirements-study.txt") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ---------------------------------------------------------------- the spec

def read_spec(path, overrides=None) -> dict:
    """A study spec file, checked: every trial it lays out is a valid train.py run. `overrides`: [train]
    values given on the command line (a local checkpoint, a data file)."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); pass a study spec file (studies/*.toml).") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{path} is not valid TOML ({e}); see studies/cpu-small.toml for the layout.") from None
    known = {"name", "budget", "design", "trials", "seed", "train", "axes", "prune", "final"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise UserError(f"{path}: '{unknown[0]}' is not a key of a study spec ({', '.join(sorted(known))}).")
    spec.setdefault("name", path.stem)
    spec.setdefault("design", "one-at-a-time")
    spec.setdefault("seed", 0)
    for key in ("train", "axes", "prune", "final"):
        if not isinstance(spec.setdefault(key, {}), dict):
            raise UserError(f"{path}: '{key}' must be a table ([{key}] with its keys below it).")
    spec["train"] = spec["train"] | (overrides or {})
    checks = [
        (isinstance(spec.get("budget"), (int, float)) and 0 < spec["budget"] < math.inf, "'budget' must be a positive number of FLOPs"),
        (spec["design"] in DESIGNS, f"'design' must be one of {', '.join(DESIGNS)}"),
        (spec["axes"] and all(isinstance(v, list) and v for v in spec["axes"].values()),
         "[axes] must give each axis a non-empty list of values"),
        (spec["design"] != "search" or (type(spec.get("trials")) is int and spec["trials"] >= 1),
         "a search needs 'trials', a whole number of trials"),
        (not ({"out", "resume", "flops_budget", "config"} & set(map(_dest, spec["train"]))),
         "[train] may not set out, resume, config or flops-budget: the study sets them"),
    ]
    bad = next((why for ok, why in checks if not ok), None)
    if bad:
        raise UserError(f"{path}: {bad}.")
    entries = spec["final"].get("evaluate", [])
    if not (isinstance(entries, list) and all(isinstance(e, (str, dict)) for e in entries)):
        raise UserError(f"{path}: [final] evaluate must be a list of presets or tables of evaluate.py flags.")
    import evaluate

    for label, argv in evaluations(entries, spec["final"].get("evaluate_flags", [])):
        parsed(evaluate.build_parser().parse_args, argv + ["--run", "RUN"],
               f"{path}: the final evaluation '{label}' is not a valid evaluate.py command")
    for setting in settings(spec if spec["design"] != "search" else spec | {"design": "grid"}):  # a search: every value
        train_args(spec, setting, out="-", source=path)  # refuses a setting train.py would refuse
    return spec


def _dest(key):
    return str(key).replace("-", "_")


def settings(spec) -> list:
    """The trials an enumerated design lays out, as {axis: value}."""
    axes = spec["axes"]
    if spec["design"] == "grid":
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    base = {a: spec["train"].get(a, spec["train"].get(a.replace("_", "-"), values[0])) for a, values in axes.items()}
    out = [base]
    for a, values in axes.items():
        out += [base | {a: v} for v in values if v != base[a]]
    return out


def to_argv(values: dict) -> list:
    """{flag name: value} -> a command line: `true` is a switch given, `false` one left out."""
    argv = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    return argv


def flags(spec, setting) -> list:
    """train.py's command line for one trial: the spec's [train] with the trial's setting over it."""
    return to_argv(spec["train"] | setting) + ["--no-progress"]


def parsed(parse, argv, what):
    """parse(argv), argparse's complaint turned into one sentence about `what`."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(argv)
    except SystemExit:
        why = (err.getvalue().strip().splitlines() or ["--help is not a setting"])[-1].split("error: ")[-1]
        raise UserError(f"{what} ({why}).") from None


def train_args(spec, setting, out, source="the spec"):
    """train.py's parsed flags for one trial; a setting train.py would refuse is refused here, in one sentence."""
    return parsed(train.parse_args, flags(spec, setting) + ["--out", str(out)],
                  f"{source}: the trial {setting} is not a valid train.py run")


def planned_flops(args) -> float:
    """What a trial may spend at most: flops.py's plan of the run at full windows, the step-0 baseline included."""
    from qwen_min import Qwen2Config
    from qwen_min.weights import resolve_checkpoint

    cfg = Qwen2Config.from_json(resolve_checkpoint(args.model) / "config.json")
    budget = train.Budget(args, cfg, [(args.batch, args.context)] * args.eval_batches)  # budget.eval: one full validation
    plan = flops.plan_run(budget.setup, args.steps, args.batch, args.context, args.eval_every, args.eval_batches)
    # a hair above the plan, so that the float rounding of a run's running sum never stops it a step short
    return (args.steps * budget.full_step(args).coursework + plan["eval"].coursework + budget.eval) * (1 + 1e-9)


# ---------------------------------------------------------------- the study's database

class Book:
    """The study's budget and trial slots, in the study's own database beside Optuna's tables.

    Each check-and-change is one SQL statement, which every database runs atomically: a reservation
    is an UPDATE that succeeds only if it fits, a slot is taken by an INSERT that its primary key
    lets succeed once. So workers sharing a study never overrun the budget and never run a slot twice."""

    def __init__(self, url, study, budget):
        import sqlalchemy as sa

        self.sa, self.study = sa, study
        self.engine = sa.create_engine(url, **_engine_kwargs(url))
        with self.engine.begin() as db:
            db.execute(sa.text("CREATE TABLE IF NOT EXISTS qwen_min_budget (study VARCHAR(255) PRIMARY KEY, "
                               "budget FLOAT NOT NULL, reserved FLOAT NOT NULL)"))
            db.execute(sa.text("CREATE TABLE IF NOT EXISTS qwen_min_slots (study VARCHAR(255), slot INTEGER, "
                               "trial INTEGER, PRIMARY KEY (study, slot))"))
        with contextlib.suppress(sa.exc.IntegrityError), self.engine.begin() as db:
            db.execute(sa.text("INSERT INTO qwen_min_budget VALUES (:s, :b, 0)"), {"s": study, "b": budget})

    def _run(self, sql, **values):
        with self.engine.begin() as db:
            return db.execute(self.sa.text(sql), {"s": self.study} | values)

    def reserve(self, x) -> bool:
        """Reserves x FLOPs if they fit in what is left; False (and nothing reserved) if not."""
        return self._run("UPDATE qwen_min_budget SET reserved = reserved + :x "
                         "WHERE study = :s AND reserved + :x <= budget", x=x).rowcount == 1

    def give_back(self, x):
        self._run("UPDATE qwen_min_budget SET reserved = reserved - :x WHERE study = :s", x=x)

    def state(self):
        """(budget, reserved): reserved is what finished trials spent plus what running ones hold."""
        return tuple(self._run("SELECT budget, reserved FROM qwen_min_budget WHERE study = :s").one())

    def take_slot(self, n, trial):
        """The first of slots 0..n-1 no worker has taken, now `trial`'s; None when all are taken."""
        for slot in range(n):
            try:
                self._run("INSERT INTO qwen_min_slots VALUES (:s, :i, :t)", i=slot, t=trial)
                return slot
            except self.sa.exc.IntegrityError:
                continue
        return None

    def slots_taken(self):
        return self._run("SELECT COUNT(*) FROM qwen_min_slots WHERE study = :s").scalar()

    def slot_of(self, trial):
        """The slot `trial` took (None if it took none)."""
        row = self._run("SELECT slot FROM qwen_min_slots WHERE study = :s AND trial = :t", t=trial).first()
        return None if row is None else row[0]


def _engine_kwargs(url):
    # SQLite: wait for another worker's write instead of failing at once
    return {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}


def open_study(spec, out, storage):
    """The Optuna study and the Book, created on first use; a spec that changed since is refused,
    and a database that cannot be read is named in one sentence."""
    import sqlalchemy as sa

    try:
        return _open_study(spec, out, storage)
    except sa.exc.SQLAlchemyError as e:
        where = storage or out / "study.db"
        raise UserError(f"the study's database {where} cannot be used ({str(e.orig if hasattr(e, 'orig') else e)[:80]}); "
                        "restore it, or start the study in a new --out.") from None


def _open_study(spec, out, storage):
    optuna = require_optuna()
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    sampler = optuna.samplers.TPESampler(seed=spec["seed"])
    study = optuna.create_study(study_name=spec["name"], storage=optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url)),
                                sampler=sampler, direction="minimize", load_if_exists=True)
    trials_part = json.loads(json.dumps({k: v for k, v in spec.items() if k != "final"}))  # [final] may change later
    recorded = study.user_attrs.get("spec")
    if recorded is None:
        study.set_user_attr("spec", trials_part)
    elif recorded != trials_part:
        raise UserError(f"the study '{spec['name']}' in {url} was made from another spec; restore that spec, "
                        "or give this one a new name or --out.")
    return study, Book(url, spec["name"], spec["budget"])


# ---------------------------------------------------------------- a worker

def behind(curve, finished, after) -> bool:
    """Equal-compute pruning: True when, `after` validations past the baseline, a trial's best validation
    loss so far is worse than the median of the finished trials' best at the same FLOPs spent.
    curve: {FLOPs spent: validation loss} of this trial; finished: their Optuna trials (the same curves)."""
    if len(curve) <= after:
        return False
    at = max(curve)
    theirs = [min(v for f, v in t.intermediate_values.items() if f <= at) for t in finished
              if any(f <= at for f in t.intermediate_values)]
    return len(theirs) >= 2 and min(curve.values()) > statistics.median(theirs)


def whose():
    """This worker: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def orphaned(t) -> bool:
    """A running trial whose worker was killed: on this machine its process is gone; elsewhere, its run
    folder exists and no process holds its lock (train.py holds it for the whole run)."""
    host, _, pid = t.user_attrs.get("worker", ":").rpartition(":")
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
            return False
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:  # alive, another user's
            return False
    run = Path(t.user_attrs.get("run", ""))
    if not (run / "args.json").is_file():
        return False
    try:
        with FolderLock(run):
            return True
    except UserError:
        return False


def work(study, book, spec, out):
    """Runs trials until every slot of the design is taken: first a trial whose worker was killed
    (continued from its run folder), else the next slot."""
    optuna = require_optuna()
    n_slots = spec["trials"] if spec["design"] == "search" else len(settings(spec))
    while True:
        orphan = next((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if orphaned(t)), None)
        if orphan is not None:  # a kill at any point of a trial's life: continue it from there
            trial = optuna.trial.Trial(study, orphan._trial_id)  # Optuna has no public call to take up a running trial
            trial.set_user_attr("worker", whose())
            slot = book.slot_of(trial.number)
            if orphan.user_attrs.get("reserved"):
                print(f"trial {trial.number}: its worker was killed; continuing {orphan.user_attrs['run']}")
            elif slot is None:  # killed before it took a slot: nothing of the design is lost
                trial.set_user_attr("not_run", "its worker was killed before it took a slot")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            elif not start(study, book, spec, out, trial, slot):  # killed before its reservation: lay it out again
                continue
        elif book.slots_taken() >= n_slots:
            return
        else:
            trial = study.ask()  # before the slot: a kill in between loses no slot
            slot = book.take_slot(n_slots, trial.number)
            if slot is None:  # another worker took the last one since: this trial is no part of the design
                trial.set_user_attr("not_run", SPARE)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                return
            if not start(study, book, spec, out, trial, slot):
                continue
        run_trial(study, book, spec, trial)


def start(study, book, spec, out, trial, slot) -> bool:
    """Lays out the trial of `slot` and reserves its planned FLOPs; False (and the trial marked not run)
    when the plan is more than the budget has left."""
    optuna = require_optuna()
    if spec["design"] == "search":
        setting = {a: trial.suggest_categorical(a, values) for a, values in spec["axes"].items()}
    else:
        setting = settings(spec)[slot]
    run = out / "trials" / f"{trial.number:04d}"
    planned = planned_flops(train_args(spec, setting, run))
    for key, value in {"slot": slot, "setting": setting, "run": str(run), "worker": whose(), "planned": planned}.items():
        trial.set_user_attr(key, value)
    if not book.reserve(planned):
        budget, held = book.state()
        why = f"its plan, {planned:.3g} FLOPs, is more than the {budget - held:.3g} the budget has left"
        trial.set_user_attr("not_run", why)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"trial {trial.number} {setting}: not run: {why}")
        return False
    trial.set_user_attr("reserved", True)  # a kill just before this holds the plan twice: never overruns, at worst idles
    print(f"trial {trial.number} {setting}: {planned:.3g} FLOPs reserved; run folder {run}")
    return True


def run_trial(study, book, spec, trial):
    """Trains the trial's run (continuing it if it has begun), reports each validation at its FLOPs
    spent, prunes it when behind, and gives back what it did not spend."""
    optuna = require_optuna()
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    attrs, curve = frozen.user_attrs, dict(frozen.intermediate_values)
    run, planned = Path(attrs["run"]), attrs["planned"]
    prune = spec["prune"].get("enabled", True)
    after = spec["prune"].get("after", 2)

    def on_validation(step, val_loss, spent):
        curve[int(spent)] = val_loss
        trial.report(val_loss, int(spent))  # Optuna's step axis is FLOPs spent: trials compared at equal compute
        finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return prune and step > 0 and behind(curve, finished, after)

    summary_path = run / "summary.json"
    try:
        if summary_path.is_file():  # it ended before its worker was killed: its result stands
            summary = json.loads(summary_path.read_text())
        else:
            argv = flags(spec, attrs["setting"]) + ["--out", str(run), "--flops-budget", repr(planned)]
            summary = train.main(argv + (["--resume"] if (run / "args.json").is_file() else []), on_validation)
    except UserError as e:
        if "in use by another" in str(e):  # another worker continues it
            return
        print(f"trial {trial.number} failed: {e}")
        trial.set_user_attr("error", str(e))
        summary = {"flops_spent": flops.Ledger.read(run / "ledger.jsonl").total() if (run / "ledger.jsonl").is_file() else 0.0,
                   "stop_reason": "failed"}
    if "spent" not in attrs:  # the order keeps a kill from ever giving back twice (at worst, once too few)
        trial.set_user_attr("spent", summary["flops_spent"])
        trial.set_user_attr("stop_reason", summary["stop_reason"])
        book.give_back(planned - summary["flops_spent"])
    if summary["stop_reason"] == "failed":
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    elif summary["stop_reason"] == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, summary["best_val_loss"])


# ---------------------------------------------------------------- the final run

def evaluations(entries, common) -> list:
    """[final] evaluate's entries as (label, evaluate.py flags): a preset's name ("ours": our protocol),
    or a table of evaluate.py flags with a `label`, e.g. greedy and sampled decoding of one adapter:
    {label = "b-sampled", preset = "report-b", samples = 20, temperature = 0.7}. `common`: flags for all."""
    out = []
    for entry in entries:
        table = dict(entry) if isinstance(entry, dict) else ({} if entry == "ours" else {"preset": entry}) | {"label": entry}
        label = str(table.pop("label", None) or "-".join(f"{k}{v}" for k, v in table.items()) or "ours")
        out.append((label, to_argv(table) + [str(f) for f in common]))
    return out


def final(study, book, spec, out):
    """The best trial's settings with the spec's [final] over them (more steps, early stopping),
    trained under what the budget has left, then evaluated under each of [final]'s presets."""
    import evaluate

    try:
        best = study.best_trial
    except ValueError:  # Optuna's word for "no trial has completed"
        raise UserError(f"no trial of the study in {out} has finished, so there is no best setting to train; "
                        "run the study first.") from None
    fin = dict(spec["final"])
    presets, eval_flags = fin.pop("evaluate", []), fin.pop("evaluate_flags", [])
    setting = best.user_attrs["setting"] | fin
    run = out / "final"
    planned = planned_flops(train_args(spec, setting, run, source=f"{out} [final]"))
    if not (run / "args.json").is_file():
        if not book.reserve(planned):
            budget, held = book.state()
            raise UserError(f"the final run's plan, {planned:.3g} FLOPs, is more than the {budget - held:.3g} the study's "
                            "budget has left; lower [final] steps or raise the budget.")
        atomic_write_json(out / "final.json", {"trial": best.number, "setting": setting, "planned": planned})
    argv = flags(spec, setting) + ["--out", str(run), "--flops-budget", repr(planned)]
    summary = train.main(argv + (["--resume"] if (run / "args.json").is_file() else []))
    results = {}
    for label, argv in evaluations(presets, eval_flags):
        res = evaluate.main(["--run", str(run), *argv, "--plots", "0", "--out", str(run / "eval" / f"study-{label}")])
        results[label] = {"flags": argv, "results": res["results"].get("model"), "flops": sum(res["flops"].values())}
    record = json.loads((out / "final.json").read_text()) | {"spent": summary["flops_spent"], "summary": summary, "evaluations": results}
    atomic_write_json(out / "final.json", record)
    return record


# ---------------------------------------------------------------- the report

def trial_rows(study) -> list:
    """One row per trial: its setting, state, best validation loss, FLOPs planned and spent, and curve."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a, curve = t.user_attrs, t.intermediate_values
        if a.get("not_run") == SPARE:
            continue
        rows.append({"trial": t.number, "setting": a.get("setting", {}), "state": t.state.name.lower(),
                     "best_val_loss": min(curve.values()) if curve else None, "planned": a.get("planned", 0.0),
                     "spent": a.get("spent"), "stop_reason": a.get("stop_reason") or a.get("not_run") or a.get("error"),
                     "curve": [[f, v] for f, v in sorted(curve.items())], "run": a.get("run")})
    return rows


def axis_table(rows, axes) -> dict:
    """Per axis: each value's best validation loss over the trials that ended (complete or pruned) with
    it, and the winner's margin over the runner-up value (how much the choice of this axis mattered)."""
    out = {}
    for axis in axes:
        best = {}
        for r in rows:
            if r["state"] in ("complete", "pruned") and r["best_val_loss"] is not None and axis in r["setting"]:
                v = r["setting"][axis]
                best[v] = min(best.get(v, math.inf), r["best_val_loss"])
        ranked = sorted(best.items(), key=lambda kv: kv[1])
        out[axis] = {"best_by_value": [[v, loss] for v, loss in ranked],
                     "winner": ranked[0][0] if ranked else None,
                     "margin": ranked[1][1] - ranked[0][1] if len(ranked) > 1 else None}
    return out


def budget_table(book, rows, fin) -> list:
    """Report A's Table 5 layout: each phase's FLOPs planned and spent, and its share of the budget."""
    budget, _ = book.state()
    ran = [r for r in rows if r["spent"] is not None]
    phases = [("baseline evaluation (step 0 of each trial)", None, sum(r["curve"][0][0] for r in ran if r["curve"])),
              (f"trials ({len(ran)} run)", sum(r["planned"] for r in ran), sum(r["spent"] for r in ran))]
    if fin:
        phases += [("final training", fin["planned"], fin.get("spent")),
                   ("final evaluation", None, sum(e["flops"] for e in fin.get("evaluations", {}).values()) if "spent" in fin else None)]
    spent = sum(x for name, _, x in phases[1:] if x is not None)  # the baselines are inside the trials' spending
    table = [{"phase": name, "planned": p, "spent": x, "share": None if x is None else x / budget} for name, p, x in phases]
    return table + [{"phase": "total", "planned": None, "spent": spent, "share": spent / budget}]


def plot(rows, axes, out):
    """val_loss_vs_flops.png (every trial's validations at the FLOPs spent) and one axis_<name>.png per axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["curve"]:
            f, v = zip(*r["curve"])
            ax.plot(f, v, "o-" if r["state"] == "complete" else "x--", ms=3, label=f"{r['trial']}: {r['setting']}")
    ax.set(xlabel="FLOPs spent (coursework convention)", ylabel="validation loss", title="every trial at equal compute")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "val_loss_vs_flops.png", dpi=120)
    plt.close(fig)
    for axis, t in axes.items():
        if t["best_by_value"]:
            fig, ax = plt.subplots(figsize=(4, 3))
            values, losses = zip(*sorted(t["best_by_value"], key=lambda vl: str(vl[0])))
            ax.plot([str(v) for v in values], losses, "o-")
            ax.set(xlabel=axis, ylabel="best validation loss")
            fig.tight_layout()
            fig.savefig(out / f"axis_{axis}.png", dpi=120)
            plt.close(fig)


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def write_report(study, book, spec, out) -> dict:
    """report.json and report.md in the study folder, plus the plots."""
    with open(out / ".report.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers that finish together write the report one after the other
        return _write_report(study, book, spec, out)


def _write_report(study, book, spec, out) -> dict:
    rows = trial_rows(study)
    fin = json.loads((out / "final.json").read_text()) if (out / "final.json").is_file() else None
    axes, budget = axis_table(rows, spec["axes"]), budget_table(book, rows, fin)
    report = {"name": spec["name"], "design": spec["design"], "budget": spec["budget"], "budget_table": budget,
              "axes": axes, "trials": rows, "final": fin}
    atomic_write_json(out / "report.json", report)
    plot(rows, axes, out)
    md = [f"# Study {spec['name']}: {spec['design']}, budget {spec['budget']:.3g} FLOPs", "",
          "| phase | planned | spent | share of the budget |", "|---|---|---|---|"]
    md += [f"| {b['phase']} | {fmt(b['planned'])} | {fmt(b['spent'])} | {fmt(b['share'], '.2%')} |" for b in budget]
    md += ["", "| trial | setting | state | best validation loss | FLOPs spent | ended by |", "|---|---|---|---|---|---|"]
    md += [f"| {r['trial']} | {', '.join(f'{k}={v}' for k, v in r['setting'].items())} | {r['state']} | "
           f"{fmt(r['best_val_loss'], '.4f')} | {fmt(r['spent'])} | {r['stop_reason'] or '-'} |" for r in rows]
    md += ["", "| axis | best value | margin over the runner-up | best loss by value |", "|---|---|---|---|"]
    md += [f"| {a} | {t['winner']} | {fmt(t['margin'], '.4f')} | {', '.join(f'{v}: {loss:.4f}' for v, loss in t['best_by_value'])} |"
           for a, t in axes.items()]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return report


# ---------------------------------------------------------------- main

def build_parser():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.splitlines()[0])
    p.add_argument("spec", help="the study's spec file (TOML), e.g. studies/cpu-small.toml")
    p.add_argument("--model", help="checkpoint folder or hub id for every trial (overrides [train] model)")
    p.add_argument("--data", help="h5 file in the coursework layout for every trial (overrides [train] data)")
    p.add_argument("--out", help="the study folder: its database, trials/, report (default: runs/study-<name>)")
    p.add_argument("--storage", help="a database URL several workers share, e.g. postgresql://host/db (default: sqlite in --out)")
    p.add_argument("--report", action="store_true", help="only write the report of the study as it stands")
    p.add_argument("--final", action="store_true", help="after the trials, train the best setting with [final] over it and evaluate it")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    spec = read_spec(args.spec, {k: v for k, v in (("model", args.model), ("data", args.data)) if v})
    out = Path(args.out or f"runs/study-{spec['name']}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the study folder {out} ({e.strerror}); choose another --out.") from None
    with open(out / ".open.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers started together: one creates the database, the others then open it
        study, book = open_study(spec, out, args.storage)
    if not args.report:
        work(study, book, spec, out)
    if args.final:
        final(study, book, spec, out)
    report = write_report(study, book, spec, out)
    print((out / "report.md").read_text())
    return report


if __name__ == "__main__":
    run_cli(main)
