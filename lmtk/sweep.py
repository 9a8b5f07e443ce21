"""Sweeps over checkpoints, as values Hydra's sweeper expands into one job each.

``sweep=checkpoints``: the paths matching ``sweep.glob``, as a sweep over ``convert.checkpoint_path``.
``sweep=units``: every checkpoint discovered under ``convert.checkpoint_path`` (a training run), as a
sweep over ``convert.only``, so each job names its folder as a single run over the tree would.
Hydra's own ``glob()`` picks config group options only (on a value key it launches no job at all), so
the group files feed ``hydra.sweeper.params`` through the resolvers below.
"""

from __future__ import annotations

import glob
import os
import re

from pathlib import Path

from hydra.errors import CompactHydraException
from omegaconf.errors import InterpolationResolutionError

from lmtk.discover import discover
from lmtk.errors import ConversionError
from lmtk.storage import BUCKETS, filesystem, reason_of, scheme_of

# A run of backslashes right before a quote, or at the very end (where the closing quote follows).
_BACKSLASHES_BEFORE_QUOTE = re.compile(r"(\\*)('|\Z)")


class SweepError(CompactHydraException, InterpolationResolutionError):
    """A sweep that cannot start, reported as one line.

    OmegaConf passes its own errors out of a resolver unwrapped, and Hydra prints a CompactHydraException
    as its message alone (any other error raised while the sweeper starts comes with a long traceback).
    """


def sweep_values(pattern: str) -> str:
    """``${lmtk.files:PATTERN}``: every match, sorted and absolute, as one comma-separated sweep of quoted values."""
    if not pattern:
        # Also what a pattern with an unquoted comma looks like: Hydra takes it for a sweep of its own.
        raise SweepError("sweep.glob is not set (or has an unquoted comma): add \"sweep.glob='/ckpts/epoch-*'\"")
    if scheme := scheme_of(pattern):
        return ",".join(quote(url) for url in _bucket_matches(pattern, scheme))
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
        raise SweepError(f"sweep.glob={pattern}: no file or directory matches this pattern")
    # Absolute: jobs may start in another working directory (a cluster node, a submitit worker).
    return ",".join(quote(os.path.abspath(m)) for m in matches)


def _bucket_matches(pattern: str, scheme: str) -> list[str]:
    """The objects and folders in a bucket matching ``pattern`` (credentials: the standard chains)."""
    if scheme not in BUCKETS:
        raise SweepError(f"sweep.glob={pattern}: a {scheme}:// URL; lmtk reads local paths, s3:// and gs://")
    try:
        fs, path = filesystem(pattern)
        found = sorted(fs.glob(path))
    except ConversionError as e:
        raise SweepError(f"sweep.glob: {e}") from None
    except Exception as e:  # wrong credentials, no such bucket, the store unreachable
        raise SweepError(f"sweep.glob={pattern}: cannot list it: {reason_of(e)}") from None
    if not found:
        raise SweepError(f"sweep.glob={pattern}: nothing in the bucket matches this pattern")
    return [f"{scheme}://{key.rstrip('/')}" for key in found]


def sweep_units(root: str) -> str:
    """``${lmtk.units:ROOT}``: each checkpoint under ROOT, by its path relative to ROOT, as a sweep of quoted values."""
    try:
        units = discover(Path(root))
    except ConversionError as e:
        raise SweepError(f"sweep=units: {e}") from None
    return ",".join(quote(os.path.relpath(unit.path, root)) for unit in units)


def quote(text: str) -> str:
    """``text`` as a single-quoted value of Hydra's override grammar, whatever it holds (spaces, commas, quotes)."""
    # In a quoted value only quotes, and backslashes before a quote or the closing quote, are escaped.
    return "'" + _BACKSLASHES_BEFORE_QUOTE.sub(lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text) + "'"
