"""
Every input the scripts read, each kind opened and checked in one place, and the folder a run writes
into. A bad input is one line naming the file, what is wrong and what was expected: never a
traceback, never a run that goes on with a wrong or stale result.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np

import addresses
import data


def refuse(path, problem):
    raise SystemExit(f"{path}: {problem}")


def table(path, columns=(), what="table", key=None):
    """A table's rows (CSV, .csv.gz or parquet; data.read_metadata), with the columns `what` needs and,
    with key (columns), no key twice."""
    rows = data.read_metadata(path)
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        refuse(path, f"no column {', '.join(missing)} (a {what} has {', '.join(columns)}; it has {', '.join(rows[0])})")
    if key:
        seen = {}
        for n, r in enumerate(rows, start=2):
            k = tuple(r[c] for c in key)
            if k in seen:
                refuse(path, f"line {n}: {'/'.join(key)} {'/'.join(k)} again (first on line {seen[k]})")
            seen[k] = n
    return rows


def groups(path):
    """{group: [perturbations]} from a CSV with columns perturbation and group (probe.py and
    evaluate.py alike; a perturbation may be in several groups)."""
    found = {}
    for r in table(path, ("perturbation", "group"), "groups table", key=("perturbation", "group")):
        found.setdefault(r["group"], []).append(r["perturbation"])
    return found


def matching_groups(path, perturbations):
    """groups(path), refused when none of its perturbations is in the map (a table of another screen,
    or of gene names where the map has guides)."""
    found = groups(path)
    known = set(perturbations)
    if not any(p in known for members in found.values() for p in members):
        example = next(iter(found.values()))[0]
        refuse(path, f"none of its perturbations is in the data (e.g. {example!r}; the data has e.g. {str(next(iter(known), '-'))!r})")
    return found


def names(path, what="perturbation list"):
    """A text file of names, one a line (blank lines ignored); empty is an error."""
    if not Path(path).is_file():
        refuse(path, f"no such {what}")
    found = [line.strip() for line in open(path, errors="replace") if line.strip()]
    if not found:
        refuse(path, f"an empty {what}")
    return found


def compound_activity(path):
    """[(compound, gene, activity in uM)] from a CSV with columns compound, gene, activity_um."""
    rows = table(path, ("compound", "gene", "activity_um"), "compound-activity table")
    out = []
    for n, r in enumerate(rows, start=2):
        try:
            value = float(r["activity_um"])
        except ValueError:
            refuse(path, f"line {n}: activity_um {r['activity_um']!r} is not a number")
        if not np.isfinite(value) or value < 0:
            refuse(path, f"line {n}: activity_um {value} (a concentration in uM: 0 or more)")
        out.append((r["compound"], r["gene"], value))
    return out


def npy(path):
    """A .npy array, memory-mapped: its header and its size checked (a text file named .npy, a cut
    copy), numeric."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                refuse(path, "not a .npy file (numpy's arrays start with \\x93NUMPY)")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        refuse(path, "no such file")
    except (OSError, ValueError, EOFError) as e:  # numpy says "cannot mmap", "too short", bad magic
        refuse(path, f"not a whole .npy array ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        refuse(path, f"holds {getattr(array, 'dtype', type(array).__name__)}, not numbers")
    return array


def output_folder(out, *inputs):
    """The folder a run writes into: created, writable (tried), and not an input folder, nor the folder
    of an input file (a second run would overwrite or clear what the first read)."""
    out = Path(out)
    resolved = out.resolve()
    for given in inputs:
        if given and not addresses.is_url(given):
            source = Path(given).resolve()
            folder = source if source.is_dir() else source.parent
            if resolved == folder:
                refuse(out, f"is an input folder ({given}): write the results to a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        refuse(out, f"cannot write here ({e.strerror or e})")
    return out


def clear_stale(out, names):
    """Remove what an earlier run of the same script left in `out` under these names, before this run
    writes its own: nothing it leaves out this time stands stale beside its new results."""
    for name in names:
        path = Path(out) / name
        if path.is_file():
            path.unlink()


def cache_valid(npy_path, description_path, source):
    """A cache is valid when its description (JSON) names the same source and was written for this
    very array (its size and modification time, recorded when the description was written)."""
    try:
        description = json.loads(Path(description_path).read_text())
        stat = os.stat(npy_path)
    except (OSError, ValueError):
        return False
    return description.get("source") == source and description.get("array") == [stat.st_size, stat.st_mtime_ns]


def describe_cache(npy_path, description_path, **description):
    stat = os.stat(npy_path)
    data.write_json(description_path, dict(description, array=[stat.st_size, stat.st_mtime_ns]))
