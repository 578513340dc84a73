"""Split names: validated as strings (Hydra may pass ``16`` as an int)."""

from __future__ import annotations

from collections.abc import Sequence

from brpg_lightning.errors import BRPGInputError


def validate_split(split: str | int, valid_splits: Sequence[str | int] | None, dataset: str) -> str:
    """Return ``str(split)``; raise a one-line error when it is not in ``valid_splits`` (None: any split).

    >>> validate_split(16, ["16", 32, "full"], "synthetic")
    '16'
    >>> validate_split("17", [16, 32, "full"], "synthetic")
    Traceback (most recent call last):
    ...
    brpg_lightning.errors.BRPGInputError: split '17' is not valid for dataset 'synthetic'; valid splits: 16, 32, full
    """
    name = str(split)
    if valid_splits is None:
        return name
    valid = [str(s) for s in valid_splits]
    if name not in valid:
        raise BRPGInputError(f"split '{name}' is not valid for dataset '{dataset}'; valid splits: {', '.join(valid)}")
    return name
