"""Unreadable samples of file-backed datasets: skipped (or fatal), the same in every layout.

A sample whose file is missing, does not decode, or (image-text) has no caption is counted
in the dataset's `bad` (index -> reason), reported once per process (a loader worker is one)
by a `DataWarning` naming the file, and replaced by the next readable sample: index i ->
the first readable index of i, i + 1, ..., wrapping around. Which samples are bad depends
only on the files, so every rank, loader worker and layout maps an index to the same
replacement and sees the same sequence (a replacement appears twice in that epoch). With
`strict` (--fatal-data-errors) the first bad sample raises `DataError` instead.

    sample = read_or_replace(i, len(ds), ds._read, ds.bad, ds.strict, ds.name)
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from megavit.errors import UserError


class DataError(UserError, RuntimeError):
    """A dataset cannot be read; the message names the file or package and the fix."""


class DataWarning(UserWarning):
    """A sample was skipped; the message names the file and the row or key."""


class BadSample(Exception):
    """Raised by a dataset's reader: str(e) says where (file, row or key) and what is wrong."""


def read_or_replace(i: int, n: int, read: Callable[[int], Any], bad: dict[int, str],
                    strict: bool, name: str) -> Any:
    """`read(j)` of the first readable index j of i, i + 1, ... (mod n); `bad` records the
    unreadable ones (and is consulted first)."""
    if not 0 <= i < n:
        raise IndexError(f"{name}: index {i} out of range [0, {n})")
    for step in range(n):
        j = (i + step) % n
        if j in bad:
            continue
        try:
            return read(j)
        except BadSample as e:
            bad[j] = str(e)
            if strict:
                raise DataError(f"{e} (sample {j} of {name}; drop --fatal-data-errors to skip "
                                "bad samples)") from None
            warnings.warn(f"{e}: skipped (sample {j} of {name} reads the next readable sample "
                          "instead, in every layout)", DataWarning, stacklevel=3)
    raise DataError(f"{name}: none of its {n} samples is readable (see the warnings)")
