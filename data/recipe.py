"""The data of a run, in one place: which trajectories, which split, and how values are scaled.

train.py builds its training and validation windows from a Recipe, and evaluate.py its test
series, so an evaluation of a run scores the series that run held out, by construction: both read
the same flags (a run's args.json; evaluate.py refuses to override them) through the same code.
"""

from dataclasses import dataclass, fields

from data import llmtime, lotka_volterra, splits


@dataclass(frozen=True)
class Recipe:
    data: str = None  # an h5 file in the coursework layout; None: simulate
    n_series: int = 1000  # trajectories to simulate (without data)
    seed: int = 0  # the split's seed (and the simulation's)
    split: str = "ours"  # ours (seeded, 70/15/15) or a report's split as its code drew it
    scaling: str = "global"  # global: one scale fit on the train split; per-series: each series its own
    percentile: float = 95.0  # the percentile of |x| that becomes scale_target
    scale_target: float = 10.0

    @classmethod
    def of(cls, args) -> "Recipe":
        """The recipe a train.py or evaluate.py namespace names."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def trajectories(self):
        """(N, T, 2) [prey, predator] and times (T,): the file's, or simulated."""
        if self.data:
            return lotka_volterra.load(self.data)
        return lotka_volterra.simulate(self.n_series, seed=self.seed)

    def split_of(self, n) -> splits.Split:
        """Train, validation and test rows of n trajectories."""
        return splits.split(n, seed=self.seed) if self.split == "ours" else splits.REPORT_SPLITS[self.split](n)

    def scaler(self, values) -> llmtime.Scaler:
        """A scaler fit on values (N, T, 2): one scale for all of them (global), or one per series.
        Global scaling is fit on the train split; per-series scales on each series' own values."""
        return llmtime.Scaler.fit(values, self.percentile, self.scale_target, self.scaling == "per-series")
