"""Reading and writing trajectory files in the coursework h5 layout.

    trajectories   (N, T, 2) float32   [..., 0] prey, [..., 1] predator; finite, >= 0
    time           (T,)      float64   increasing

`load` checks all of that and fails with a DataFileError (a qwen_min.errors.UserError) whose
message is one sentence saying what was wrong and what to do, so a bad file never ends in a
traceback from h5py. Shapes and dtypes are checked before any data is read, so a file that
declares a huge dataset is refused without allocating it.
"""

from pathlib import Path

import h5py
import numpy as np

from qwen_min.errors import UserError

MAX_VALUES = 1 << 28  # 2 GB of float64; the coursework file holds 200,000 values


class DataFileError(UserError):
    """A trajectory file that is missing or does not follow the coursework layout."""


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """The trajectory file does not exist."""


def save(path, trajectories, time):
    """Write trajectories (N, T, 2) and time (T,) in the coursework layout."""
    with h5py.File(path, "w") as f:
        f.create_dataset("trajectories", data=np.asarray(trajectories, dtype=np.float32))
        f.create_dataset("time", data=np.asarray(time, dtype=np.float64))


def load(path):
    """Read and check a trajectory file.

    Returns trajectories (N, T, 2) float32 and time (T,) float64.
    Raises DataFileError (DataFileNotFoundError for a missing file) with a one-sentence
    message for every way the file can be wrong.
    """
    path = Path(path)
    if path.is_dir():
        raise DataFileError(f"{path} is a folder; pass the path of an h5 file with 'trajectories' and 'time' datasets.")
    if not path.is_file():
        raise DataFileNotFoundError(
            f"No data file at {path}; pass the path of an h5 file, or leave it out to use simulated data."
        )
    if not h5py.is_hdf5(path):
        raise DataFileError(f"{path} is not an HDF5 file; pass an .h5 file with 'trajectories' and 'time' datasets.")
    try:
        with h5py.File(path, "r") as f:
            for name in ("trajectories", "time"):
                if not isinstance(f.get(name), h5py.Dataset):
                    raise DataFileError(f"{path} has no '{name}' dataset; it needs 'trajectories' (N, T, 2) and 'time' (T,).")
            _check_layout(path, f["trajectories"], f["time"])
            trajectories, time = np.asarray(f["trajectories"][()]), np.asarray(f["time"][()])
    except OSError as e:  # h5py's error for a file cut short or damaged inside
        raise DataFileError(f"{path} is a damaged HDF5 file ({e}); write it again or restore it.") from None
    _check_values(path, trajectories, time)
    return trajectories.astype(np.float32), time.astype(np.float64)


def _check_layout(path, trajectories, time):
    """Raise DataFileError unless the datasets' dtypes and shapes follow the layout (nothing is read)."""
    if not np.issubdtype(trajectories.dtype, np.floating) or not np.issubdtype(time.dtype, np.floating):
        raise DataFileError(
            f"{path}: 'trajectories' and 'time' must hold floats, not {trajectories.dtype} and {time.dtype}; rewrite them as float32 / float64."
        )
    shape = trajectories.shape or ()  # None for an HDF5 null dataspace
    if len(shape) != 3 or shape[2] != 2 or 0 in shape:
        raise DataFileError(
            f"{path}: 'trajectories' has shape {trajectories.shape}, expected (N, T, 2) with N, T >= 1 and prey, predator last; fix the file's layout."
        )
    if time.shape != (trajectories.shape[1],):
        raise DataFileError(
            f"{path}: 'time' has shape {time.shape} but trajectories have {trajectories.shape[1]} steps; make 'time' one value per step."
        )
    if trajectories.size > MAX_VALUES:
        raise DataFileError(f"{path}: 'trajectories' holds {trajectories.size} values, more than qwen-min reads ({MAX_VALUES}); "
                            "split the file or keep fewer trajectories.")


def _check_values(path, trajectories, time):
    """Raise DataFileError unless the values are finite, populations >= 0 and time increasing."""
    if not (np.isfinite(trajectories).all() and np.isfinite(time).all()):
        raise DataFileError(f"{path} contains NaN or inf values; remove or repair those trajectories.")
    if not (np.diff(time) > 0).all():
        raise DataFileError(f"{path}: 'time' is not strictly increasing; store the time of each step in order.")
    if (trajectories < 0).any():
        raise DataFileError(f"{path} contains negative populations; populations must be >= 0, so fix or drop those trajectories.")
