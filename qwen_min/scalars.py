"""Scalars for TensorBoard, beside the JSON-lines logs that stay the record.

`--log tensorboard` mirrors what train.py appends to metrics.jsonl (and evaluate.py's overall
metrics) into TensorBoard event files under the run folder, the viewer most fine-tuning users
open first: `tensorboard --logdir runs`. The writer is torch's own; it needs the `tensorboard`
package, which qwen-min does not otherwise require.
"""

import importlib

from .errors import UserError


def require_tensorboard():
    """Checked before long work starts, so a missing package is said at once, not after the run."""
    try:
        importlib.import_module("torch.utils.tensorboard")  # which imports the tensorboard package
    except ImportError:
        raise UserError("--log tensorboard needs the tensorboard package (pip install tensorboard); "
                        "or leave out --log: the JSON logs hold the same numbers.") from None


def _writer(log_dir, purge_step=None):
    require_tensorboard()
    return importlib.import_module("torch.utils.tensorboard").SummaryWriter(log_dir=log_dir, purge_step=purge_step)


class Scalars:
    """add(tag, value, step) to a TensorBoard log in `folder`, or nowhere when `enabled` is False.

    purge_step: on a resume, events a killed run wrote after its last checkpoint are dropped, as
    metrics.jsonl drops its lines, so the curves never show a step twice."""

    def __init__(self, folder, enabled=True, purge_step=None):
        self.writer = _writer(str(folder), purge_step) if enabled else None

    def add(self, tag, value, step):
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
