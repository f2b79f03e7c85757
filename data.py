"""
Microscopy images to training crops, and the loader that feeds them to training.

    python data.py prepare --images out/demo/synth/images --metadata out/demo/synth/metadata.csv --out out/demo/crops --crop_size 32
    python data.py bench --data out/demo/crops                           # loader crops/s

`prepare` cuts every image into crops and writes shards: `shard_00000.npy`, uint8 [n, C, H, W],
memory-mappable; `index.csv`, one row per crop (shard, offset, source, tile_y, tile_x and every
metadata column); `meta.json`, written last (channel names, crop size, counts, conversion rule).
`CropDataset` opens a prepared dataset; `Loader` streams uint8 batches from one or several of them.
"""

import argparse
import csv
import io
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from queue import Full, Queue

import numpy as np
import tifffile
import torch
from tqdm import tqdm

FORMAT_VERSION = 1


def write_atomic(path, write):
    """Call write(file) on a temporary name beside path, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
    except BaseException:  # a full disk, a kill: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_csv(path, header, rows):
    def write(f):
        text = open(f.fileno(), "w", newline="", closefd=False)
        writer = csv.writer(text)
        writer.writerow(header)
        writer.writerows(rows)
        text.flush()
    write_atomic(path, write)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))



class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: its docstring as written, and each option's default."""


# ---- prepare: images -> shards ------------------------------------------------------------------

class BadImage(Exception):
    """An input image that cannot become crops; the message names the file and the problem."""


# ---- the screen's files and rows ------------------------------------------------------------------

def read_metadata(path):
    """A metadata CSV as row dicts: UTF-8 with or without a byte-order mark (as spreadsheets save it),
    else Latin-1; a file with no row is an error."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such metadata file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows:
        raise SystemExit(f"{path}: no rows (empty, or a header alone)")
    return rows


def key_value(field, value):
    """A field's value as files and rows must agree on it: sites and plates by number when numeric
    ('01' and '1' are the same site), anything else as written."""
    value = value.strip()
    return str(int(value)) if field in ("site", "plate") and value.isdigit() else value


def pattern_regex(pattern):
    """'{plate}/{well}_s{site}_w{channel}.tif' -> a regex with one named group per field."""
    parts = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+?)" for i, p in enumerate(parts))
    return re.compile(regex + "$")


# File layouts recognized without --pattern, RxRx's and this project's; the first that every file fits.
LAYOUTS = ("{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png", "{plate}/{well}_s{site}_w{channel}.{ext}",
           "{plate}/{well}_s{site}.{ext}", "{plate}_{well}_s{site}_w{channel}.{ext}", "{plate}_{well}_s{site}.{ext}")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jp2", ".jpg", ".jpeg")


def image_files(images):
    files = [p.relative_to(images).as_posix() for p in sorted(Path(images).rglob("*"))
             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise SystemExit(f"{images}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def guess_pattern(files, columns):
    """The first of LAYOUTS that all files fit, with its fields among the metadata's columns; else
    one line naming a file and the --pattern it would need."""
    for layout in LAYOUTS:
        regex = pattern_regex(layout)
        fields = set(regex.groupindex) - {"channel", "ext"}
        if fields <= set(columns) and all(regex.match(f) for f in files):
            ext = regex.match(files[0]).groupdict().get("ext")
            return layout.replace("{ext}", ext) if ext else layout
    example = files[0]
    guess = re.sub(r"([_-](?:w|ch))\d+", r"\1{channel}", re.sub(r"([_-]s(?:ite)?)\d+", r"\1{site}", example))
    guess = re.sub(r"(^|/|[_-])[A-Pa-p]\d{1,2}(?=\D)", r"\1{well}", guess)
    guess = re.sub(r"^[^/]+/", "{plate}/", guess) if "/" in guess else guess
    raise SystemExit(f"{example}: not a layout this knows; pass --pattern with the metadata's columns as fields, "
                     f"e.g. --pattern '{guess}'")


def find_sites(images, files, rows, pattern, channels, on_error):
    """Match every image file (`files`, paths under `images`) to its metadata row, by the pattern's
    fields (every field but {channel} names a metadata column). Returns [(row, [file per channel])] in
    the metadata's order, and [(file, problem)] of the files no row names (an error unless on_error
    is 'skip')."""
    regex = pattern_regex(pattern)
    fields = [f for f in regex.groupindex if f != "channel"]
    named = lambda key: " ".join(f"{f} {v}" for f, v in zip(fields, key))  # "plate P1 well B02 site 1"
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise SystemExit(f"metadata: no column {', '.join(missing)}, which the pattern {pattern} names")
    per_channel = "channel" in regex.groupindex
    files_of = {}
    for n, row in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
        key = tuple(key_value(f, row[f]) for f in fields)
        if "" in key:
            raise SystemExit(f"metadata line {n}: empty {fields[key.index('')]}")
        if key in files_of:
            raise SystemExit(f"metadata line {n}: {named(key)} appears twice")
        files_of[key] = {}
    strays = []
    for name in files:
        m = regex.match(name)
        if not m:
            continue
        key = tuple(key_value(f, m[f]) for f in fields)
        if key not in files_of:
            strays.append((str(Path(images) / name), f"no metadata row for {named(key)}"))
            if on_error == "raise":
                raise SystemExit(f"{strays[0][0]}: {strays[0][1]}")
            continue
        files_of[key][m["channel"] if per_channel else None] = str(Path(images) / name)
    sites = []
    for row, (key, found) in zip(rows, files_of.items()):
        wanted = channels if per_channel else [None]
        absent = [c for c in wanted if c not in found]
        if absent:
            what = f"channel {', '.join(absent)}" if per_channel else "image"
            raise SystemExit(f"{images}: no {what} file for {named(key)} (pattern {pattern})")
        sites.append((row, [found[c] for c in wanted]))
    return sites, strays


def load_data_sites(load_data, rows, channels):
    """A CellProfiler LoadData CSV (JUMP-CP): one row per site with Metadata_Plate, Metadata_Well,
    Metadata_Site and, per channel NAME, FileName_OrigNAME and PathName_OrigNAME (absolute, or relative
    to the CSV). Returns [(metadata row, [file per channel])] and the channel names: `channels` (a
    subset, in order) or every Orig channel of the CSV. The metadata rows join on plate, well, site."""
    table = read_metadata(load_data)
    names = [c[len("FileName_Orig"):] for c in table[0] if c.startswith("FileName_Orig")]
    missing = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site") if c not in table[0]]
    if missing or not names:
        raise SystemExit(f"{load_data}: not a LoadData CSV (missing {', '.join(missing) or 'FileName_Orig<channel> columns'})")
    unknown = [c for c in channels or [] if c not in names]
    if unknown:
        raise SystemExit(f"{load_data}: no channel {', '.join(unknown)} (it has {', '.join(names)})")
    names = list(channels or names)
    label_of = {tuple(key_value(f, r[f]) for f in ("plate", "well", "site")): r for r in rows}
    sites = []
    for n, site in enumerate(table, start=2):
        key = tuple(key_value(f, site[f"Metadata_{f.capitalize()}"]) for f in ("plate", "well", "site"))
        if key not in label_of:
            raise SystemExit(f"{load_data} line {n}: no metadata row for plate {key[0]} well {key[1]} site {key[2]}")
        folder = lambda c: Path(load_data).parent / site[f"PathName_Orig{c}"]  # an absolute path stays itself
        sites.append((label_of[key], [str(folder(c) / site[f"FileName_Orig{c}"]) for c in names]))
    return sites, names


# ---- one site's pixels ------------------------------------------------------------------------------

def read_image(path):
    """One image file's pixels, by its suffix: TIFF with tifffile (compressed TIFF, PNG, JPEG 2000 and
    JPEG need imagecodecs, the codecs tifffile's author maintains)."""
    try:
        if Path(path).suffix.lower() in (".tif", ".tiff"):
            return tifffile.imread(path)
        import imagecodecs
        return imagecodecs.imread(path)
    except ImportError:
        raise SystemExit(f"{path}: reading {Path(path).suffix} files needs imagecodecs: pip install imagecodecs") from None
    except Exception as e:  # codecs raise many kinds for truncated or foreign files
        if "imagecodecs" in str(e):
            raise SystemExit(f"{path}: this TIFF's compression needs imagecodecs: pip install imagecodecs") from None
        kind = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".jp2": "JPEG 2000"}.get(Path(path).suffix.lower(), "JPEG")
        raise BadImage(f"unreadable {kind} ({type(e).__name__}: {e})") from None


def read_site(files, n_channels, channel_axis):
    """The site's image as [C, H, W] in its own dtype."""
    arrays = [read_image(f) for f in files]
    if len(files) > 1:  # one file per channel
        if any(a.ndim != 2 for a in arrays) or len({a.shape for a in arrays}) > 1:
            raise BadImage(f"per-channel files must be 2-D and equal in size, got {[a.shape for a in arrays]}")
        return np.stack(arrays)
    image = arrays[0]
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise BadImage(f"expected a 2-D or 3-D image, got shape {image.shape}")
    if channel_axis == "auto":  # without a known count, channels are the shorter end axis
        n = n_channels or min(image.shape[0], image.shape[-1])
        channel_axis = "first" if image.shape[0] == n else "last" if image.shape[-1] == n else None
    if channel_axis == "last":
        image = np.moveaxis(image, -1, 0)
    if n_channels and image.shape[0] != n_channels:
        raise BadImage(f"expected {n_channels} channels, got an image of shape {image.shape}")
    return image


def screen_shape(sites, n_channels, channel_axis, sample=64):
    """The screen's image shape [C, H, W]: the most common among up to `sample` sites spread over it
    (never whichever file came first, which may be the bad one)."""
    shapes, problems = Counter(), []
    for _, files in sites[::max(1, len(sites) // sample)]:
        try:
            shapes[read_site(files, n_channels, channel_axis).shape] += 1
        except BadImage as e:
            problems.append(f"{files[0]}: {e}")
    if not shapes:
        raise SystemExit(f"no image of the {len(problems)} sampled could be read; the first, {problems[0]}")
    return shapes.most_common(1)[0][0]


def to_uint8(image, rule, percentiles):
    """Convert [C, H, W] to uint8 by the documented rule:
    identity   - uint8 only, unchanged;
    shift      - uint16 >> 8 (uint8 unchanged): keeps relative intensities across images;
    percentile - per image, per channel: clip to [low, high] percentiles, scale linearly to 0..255;
    auto       - identity for uint8, percentile otherwise."""
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise BadImage("NaN or inf pixels")
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise BadImage(f"unsupported pixel type {image.dtype} (uint8, uint16 or float)")
    if rule == "auto":
        rule = "identity" if image.dtype == np.uint8 else "percentile"
    if rule == "identity":
        if image.dtype != np.uint8:
            raise BadImage(f"--convert identity needs uint8 pixels, got {image.dtype}")
        return image
    if rule == "shift":
        if image.dtype == np.uint8:
            return image
        if image.dtype != np.uint16:
            raise BadImage(f"--convert shift needs uint8 or uint16 pixels, got {image.dtype}")
        return (image >> 8).astype(np.uint8)
    flat = image.reshape(image.shape[0], -1).astype(np.float32)
    low, high = np.percentile(flat, percentiles, axis=1)[:, :, None, None]
    scaled = (image.astype(np.float32) - low) / np.maximum(high - low, 1e-12) * 255
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def tile(image, crop):
    """[C, H, W] -> [(H/crop)*(W/crop), C, crop, crop], row-major over tiles."""
    C, H, W = image.shape
    if H % crop or W % crop:
        raise BadImage(f"size {H}x{W} does not tile into {crop}x{crop} crops")
    return image.reshape(C, H // crop, crop, W // crop, crop).transpose(1, 3, 0, 2, 4).reshape(-1, C, crop, crop)


def prepare_shard(job):
    """Worker: convert and tile one shard's sites, write shard_XXXXX.npy, then its manifest (the mark
    that the shard is complete). Returns the shard's manifest."""
    out, shard, sites, opts, on_error = job
    crops, kept, skipped = [], [], []
    for site_id, files in sites:
        try:
            image = read_site(files, opts["n_channels"], opts["channel_axis"])
            tiles = tile(to_uint8(image, opts["convert"], opts["percentiles"]), opts["crop_size"])
            if image.shape[1:] != tuple(opts["image_shape"]):
                raise BadImage(f"size {image.shape[1]}x{image.shape[2]} differs from the screen's "
                               f"{opts['image_shape'][0]}x{opts['image_shape'][1]}")
        except BadImage as e:
            if on_error == "raise":
                raise BadImage(f"{files[0]}: {e}") from None
            skipped.append([files[0], str(e)])
            continue
        crops.append(tiles)
        kept.append(site_id)
    array = np.concatenate(crops) if crops else np.zeros((0, opts["n_channels"], opts["crop_size"], opts["crop_size"]), np.uint8)
    write_atomic(Path(out) / f"shard_{shard:05d}.npy", lambda f: np.save(f, array))
    manifest = dict(shard=shard, sites=kept, skipped=skipped, crops=len(array))
    write_json(Path(out) / f"shard_{shard:05d}.json", manifest)
    return manifest


def channel_values(files, pattern):
    """The {channel} values the files carry, in order (by number when they are numbers)."""
    regex = pattern_regex(pattern)
    values = {m["channel"] for m in map(regex.match, files) if m}
    return sorted(values, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))


def warn_about_labels(metadata, rows):
    """What the later steps will miss, said before any work: a warning, with counts."""
    if "perturbation" not in rows[0]:
        print(f"warning: {metadata}: no perturbation column: curate.py, probe.py and evaluate.py need one (the gene, "
              f"siRNA or compound of each site; controls by name, --control)", file=sys.stderr)
        return
    unlabeled = sum(not r["perturbation"].strip() for r in rows)
    if unlabeled:
        print(f"warning: {metadata}: {unlabeled} of {len(rows)} rows have no perturbation; "
              f"their wells are left out of the benchmarks", file=sys.stderr)


def prepare(images, metadata, out, pattern=None, channels=None, channel_names=None, load_data=None, channel_axis="auto",
            crop_size=256, shard_size=1024, convert="auto", percentiles=(0.1, 99.9), workers=None, on_error="raise"):
    """Images + metadata CSV -> shards, index.csv, meta.json. The images: a folder and a --pattern
    (or a layout recognized without one), or a LoadData CSV (load_data, in place of both). Resumable:
    run it again and it finishes the shards that are missing, and redoes those with skipped files (a
    file fixed since is taken); finished shards are kept. on_error may change between runs."""
    low, high = percentiles
    if not 0 <= low < high <= 100:
        raise SystemExit(f"--percentiles {low},{high}: need 0 <= low < high <= 100")
    if crop_size < 1 or shard_size < 1:
        raise SystemExit(f"--crop_size {crop_size}, --shard_size {shard_size}: each must be 1 or more")
    out = Path(out)
    rows = read_metadata(metadata)
    missing = {"plate", "well", "site"} - set(rows[0])
    if missing:
        raise SystemExit(f"{metadata}: missing column(s) {', '.join(sorted(missing))}")
    warn_about_labels(metadata, rows)
    if load_data:
        sites, names = load_data_sites(load_data, rows, channels)
        images, strays, layout, n_expected = Path(load_data).parent, [], f"LoadData {load_data}", len(names)
    else:
        images = Path(images)
        files = image_files(images)  # listed once: a screen may hold millions
        layout = pattern or guess_pattern(files, rows[0])
        if "{channel}" in layout and not channels:
            channels = channel_values(files, layout)
        sites, strays = find_sites(images, files, rows, layout, channels, on_error)
        names, n_expected = channels, len(channels) if channels else None
    if not sites:
        raise SystemExit(f"{images}: no file matches the layout {layout}")
    n_channels, *image_shape = screen_shape(sites, n_expected, channel_axis)
    if image_shape[0] % crop_size or image_shape[1] % crop_size:
        raise SystemExit(f"{images}: the screen's {image_shape[0]}x{image_shape[1]} images do not tile into {crop_size}x{crop_size} crops")
    names = list(channel_names or names or [f"ch{i + 1}" for i in range(n_channels)])
    if len(names) != n_channels:
        raise SystemExit(f"--channel_names: {len(names)} names for the screen's {n_channels} channels")
    tiles_per_site = (image_shape[0] // crop_size) * (image_shape[1] // crop_size)
    sites_per_shard = max(1, shard_size // tiles_per_site)  # shards hold whole images
    opts = dict(n_channels=n_channels, channel_axis=channel_axis, image_shape=image_shape,
                crop_size=crop_size, convert=convert, percentiles=list(percentiles))
    jobs = [(str(out), k, [(i, files) for i, (_, files) in enumerate(sites[s:s + sites_per_shard], start=s)], opts, on_error)
            for k, s in enumerate(range(0, len(sites), sites_per_shard))]
    plan = dict(version=FORMAT_VERSION, images=str(images), metadata=str(metadata), layout=layout, opts=opts,
                sites_per_shard=sites_per_shard, shards=[[files for _, files in job[2]] for job in jobs])
    try:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.glob("*.tmp"):  # what a killed or failed run was writing
            leftover.unlink()
        if (out / "plan.json").exists():
            if json.loads((out / "plan.json").read_text()) != plan:
                raise SystemExit(f"{out}: holds a prepare run with other inputs or settings; use a new --out")
        else:
            write_json(out / "plan.json", plan)
        manifests = {}
        for job in jobs:  # resume: a shard whose manifest exists is complete, unless it skipped a file
            path = out / f"shard_{job[1]:05d}.json"
            if path.exists() and (out / f"shard_{job[1]:05d}.npy").exists():
                manifest = json.loads(path.read_text())
                if not manifest["skipped"]:
                    manifests[job[1]] = manifest
        todo = [job for job in jobs if job[1] not in manifests]
        if len(todo) < len(jobs):
            print(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} shards already written")
        with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
            futures = [pool.submit(prepare_shard, job) for job in todo]
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc="prepare", unit="shard"):
                    manifest = future.result()
                    manifests[manifest["shard"]] = manifest
            except BadImage as e:
                pool.shutdown(cancel_futures=True)  # shards already being written finish, and are kept
                raise SystemExit(f"{e} (finished shards are kept: fix the file or pass --on-error skip, then rerun)")
        columns = list(rows[0])
        index = []
        source = lambda f: Path(f).relative_to(images).as_posix() if Path(f).is_relative_to(images) else str(f)
        for k in sorted(manifests):
            offset = 0
            for site_id in manifests[k]["sites"]:
                row, files = sites[site_id]
                for t in range(tiles_per_site):
                    ty, tx = divmod(t, image_shape[1] // crop_size)
                    index.append([k, offset, source(files[0]), ty, tx] + [row[c] for c in columns])
                    offset += 1
        skipped = [s for k in sorted(manifests) for s in manifests[k]["skipped"]] + [list(s) for s in strays]
        write_csv(out / "index.csv", ["shard", "offset", "source", "tile_y", "tile_x"] + columns, index)
        write_csv(out / "skipped.csv", ["file", "problem"], skipped)
        write_json(out / "meta.json", dict(
            version=FORMAT_VERSION, channels=names, crop_size=crop_size, crops=len(index), images=sum(len(m['sites']) for m in manifests.values()),
            skipped=len(skipped), shards=len(jobs), crops_per_shard=sites_per_shard * tiles_per_site,
            tiles_per_image=tiles_per_site, convert=convert, layout=layout,
            percentiles=list(percentiles) if convert in ("auto", "percentile") else None, source=str(images)))
    except OSError as e:  # a full disk, a read-only folder: nothing half-written is left (write_atomic)
        raise SystemExit(f"{out}: cannot write ({e.strerror or e}); nothing half-written was left, rerun to finish") from None
    print(f"{out}: {len(index)} crops of {n_channels}x{crop_size}x{crop_size} in {len(jobs)} shards"
          + (f"; skipped {len(skipped)} images, listed in {out / 'skipped.csv'}" if skipped else ""))
    return out


# ---- loading ------------------------------------------------------------------------------------

def read_index(path, columns):
    """Selected columns of an index CSV as numpy arrays (strings, or int64 for shard/offset/tiles)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        missing = [c for c in columns if c not in header]
        if missing:
            raise SystemExit(f"{path}: no column(s) {', '.join(missing)}")
        picks = [header.index(c) for c in columns]
        values = list(zip(*[[row[i] for i in picks] for row in reader])) or [()] * len(columns)
    integer = {"shard", "offset", "tile_y", "tile_x", "site"}
    return {c: np.array(v, dtype=np.int64 if c in integer else str) for c, v in zip(columns, values)}


class CropDataset:
    """A prepared dataset: crop i is row i of its index (the full index.csv, or a subset of it over the
    same shards: `index`, or a curated dataset whose meta.json names the source's folder as
    shard_root). Shards are memory-mapped on first use, so opening is cheap."""

    def __init__(self, root, index=None):
        self.root = Path(root)
        if not (self.root / "meta.json").exists():
            raise SystemExit(f"{self.root}: not a prepared dataset (no meta.json; run data.py prepare)")
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.shard_root = self.root / self.meta.get("shard_root", ".")  # a curated dataset points at its source
        self.index_path = Path(index) if index else self.root / "index.csv"
        located = read_index(self.index_path, ["shard", "offset"])
        self.shard, self.offset = located["shard"], located["offset"]
        for k, last in self.last_offsets().items():
            self.check_shard(k, last)
        self.shards = {}  # memory-mapped on first use

    def last_offsets(self):
        """{shard: the largest offset the index reads in it}."""
        shards, inverse = np.unique(self.shard, return_inverse=True)
        last = np.full(len(shards), -1)
        np.maximum.at(last, inverse, self.offset)
        return dict(zip(shards.tolist(), last.tolist()))

    def check_shard(self, k, last):
        """Shard k against the index, from its header and size alone, so that a missing, truncated or
        foreign shard is one line naming it at start-up, not a crash (or a hang) in the middle of a run."""
        path = self.shard_root / f"shard_{k:05d}.npy"
        c, s = self.channels, self.meta["crop_size"]
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                data_start = f.tell()
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
        if dtype != np.uint8 or tuple(shape[1:]) != (c, s, s) or shape[0] <= last:
            raise SystemExit(f"{path}: holds {dtype} {list(shape)}; {self.index_path} reads crop {last} of uint8 [n, {c}, {s}, {s}]")
        if path.stat().st_size < data_start + int(np.prod(shape)):
            raise SystemExit(f"{path}: truncated ({path.stat().st_size} bytes, its header promises {data_start + int(np.prod(shape))})")

    def __len__(self):
        return len(self.shard)

    @property
    def channels(self):
        return len(self.meta["channels"])

    def crops(self, ids):
        """uint8 [len(ids), C, H, W] for crop numbers ids."""
        c, s = self.channels, self.meta["crop_size"]
        out = np.empty((len(ids), c, s, s), np.uint8)
        for j, i in enumerate(ids):
            k = self.shard[i]
            path = self.shard_root / f"shard_{k:05d}.npy"
            try:
                if k not in self.shards:
                    self.shards[k] = np.load(path, mmap_mode="r")
                out[j] = self.shards[k][self.offset[i]]
            except (OSError, ValueError) as e:  # deleted or cut short since start-up, or the disk failed
                raise SystemExit(f"{path}: read failed ({type(e).__name__}: {e})") from None
        return out


def dihedral(x, k):
    """Apply element k[i] (0..7) of the square's symmetry group to crop i of x [B, C, H, W]: rotation by
    90 * (k % 4) degrees, then a transpose (a reflection) when k >= 4. One strided copy per crop: 2.4x
    faster on a CPU than gathering the crops of each of the 8 elements first."""
    out = torch.empty_like(x)
    for i, t in enumerate(k.tolist()):
        y = x[i].rot90(t % 4, dims=(-2, -1))
        out[i] = y.transpose(-2, -1) if t >= 4 else y
    return out


class Loader:
    """Micro-batches of uint8 crops [B, C, H, W], forever, from one or several prepared datasets.

    The order is a function of (seed, step) alone:
    - an optimizer step consumes one global batch of B x world_size x accum_steps crops; this rank's
      micro-batch m of it is slice m * world_size + rank (so 1 process accumulating 2 micro-batches
      sees what 2 processes with one each see);
    - each step draws one dataset by `weights` from one generator (so channel counts are uniform within
      a step), and reads that dataset in epochs: its j-th global batch is slice j mod (batches per epoch)
      of a (seed, dataset, epoch) permutation (the remainder of an epoch is dropped);
    - the crops' flips/rotations are drawn from (seed, step, slice).
    Invariant: before step k, the generator has made exactly k draws and steps_done[d] counts those that
    chose d. A loader started at `start_step` restores it by replaying the first start_step draws in one
    call (numpy draws the same uniforms for one call of n as for n calls of 1), so a resumed run
    continues the sample order of an uninterrupted one exactly. A background thread keeps `prefetch`
    micro-batches ready."""

    def __init__(self, datasets, batch_size, accum_steps=1, weights=None, rank=0, world_size=1, seed=0,
                 start_step=0, augment=True, device="cpu", prefetch=4):
        self.datasets, self.batch_size, self.accum_steps = datasets, batch_size, accum_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * world_size * accum_steps
        self.augment, self.device = augment, torch.device(device)
        for d in datasets:
            if len(d) < self.global_batch:
                raise SystemExit(f"{d.index_path}: {len(d)} crops cannot fill a global batch of {self.global_batch}")
        weights = np.array(weights or [len(d) for d in datasets], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.chooser = np.random.default_rng([seed, 1])
        self.steps_done = np.bincount(self.choose(start_step), minlength=len(datasets))  # the replay (see above)
        self.orders = {}
        self.queue, self.stopping = Queue(maxsize=prefetch), threading.Event()
        self.thread = threading.Thread(target=self.produce, args=(start_step,), daemon=True)
        self.thread.start()

    def choose(self, n):
        return self.chooser.choice(len(self.datasets), size=n, p=self.weights)

    def order(self, d, epoch):
        if (d, epoch) not in self.orders:
            self.orders = {k: v for k, v in self.orders.items() if k[0] != d}  # keep one epoch per dataset
            self.orders[d, epoch] = np.random.default_rng([self.seed, d, epoch]).permutation(len(self.datasets[d]))
        return self.orders[d, epoch]

    def step_batches(self, step):
        """This rank's accum_steps micro-batches of optimizer step `step`."""
        d = int(self.choose(1)[0])
        epoch, j = divmod(int(self.steps_done[d]), len(self.datasets[d]) // self.global_batch)
        self.steps_done[d] += 1
        global_batch = self.order(d, epoch)[j * self.global_batch:(j + 1) * self.global_batch]
        for m in range(self.accum_steps):
            part = m * self.world_size + self.rank
            ids = global_batch[part * self.batch_size:(part + 1) * self.batch_size]
            x = torch.from_numpy(self.datasets[d].crops(np.sort(ids)))  # sorted: sequential reads in a shard
            if self.augment:
                k = np.random.default_rng([self.seed, 2, step, part]).integers(0, 8, len(x))
                x = dihedral(x, torch.from_numpy(k))
            yield x.pin_memory() if self.device.type == "cuda" else x

    def produce(self, step):
        """The background thread: batches into the queue until close(); an error goes into the queue
        too, for __next__ to raise in the training loop (a thread that died silently would leave it
        waiting forever)."""
        try:
            while not self.stopping.is_set():
                for x in self.step_batches(step):
                    self.put(x)
                step += 1
        except BaseException as e:  # SystemExit included: a thread cannot exit the process
            self.put(e)

    def put(self, item):
        while not self.stopping.is_set():
            try:
                return self.queue.put(item, timeout=0.1)
            except Full:
                pass

    def close(self):
        """Stop the background thread and wait for it: a process that exits while it is inside torch
        can abort ('terminate called without an active exception')."""
        self.stopping.set()
        self.thread.join()

    def __iter__(self):
        return self

    def __next__(self):
        x = self.queue.get()
        if isinstance(x, BaseException):
            self.queue.put(x)  # every later call raises it again
            raise x
        return x.to(self.device, non_blocking=True)


def bench(data, batch_size=256, steps=50, augment=True):
    """Loader throughput alone: crops/s and MB/s, after one warm-up pass over the data."""
    dataset = CropDataset(data)
    for i in range(0, len(dataset), 4096):  # warm the page cache
        dataset.crops(range(i, min(i + 4096, len(dataset))))
    loader = Loader([dataset], batch_size, augment=augment)
    next(loader)
    start = time.perf_counter()
    for _ in range(steps):
        x = next(loader)
    seconds = time.perf_counter() - start
    mb = x[0].numel() * steps * batch_size / 1e6
    print(f"loader: {steps * batch_size / seconds:.0f} crops/s, {mb / seconds:.0f} MB/s | crops {list(x.shape[1:])} "
          f"uint8, batch {batch_size}, augment {augment}, {len(dataset)} crops in {dataset.meta['shards']} shards, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores")


def random_dataset(out, crops=2048, channels=6, size=256, seed=0):
    """A dataset of random crops written through `prepare` (for the loader benchmark)."""
    rng = np.random.default_rng(seed)
    images, rows = Path(out) / "images", []
    images.mkdir(parents=True, exist_ok=True)
    for i in range(crops // 4):
        pixels = rng.integers(0, 256, (channels, 2 * size, 2 * size), np.uint8)
        tifffile.imwrite(images / f"P1_W{i:05d}_s1.tif", pixels, photometric="minisblack")
        rows.append(["P1", f"W{i:05d}", 1])
    write_csv(Path(out) / "metadata.csv", ["plate", "well", "site"], rows)
    return prepare(images, Path(out) / "metadata.csv", Path(out) / "shards", pattern="{plate}_{well}_s{site}.tif",
                   crop_size=size, workers=2)


# ---- command line -------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="images + metadata CSV -> shards of uint8 crops", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", help="folder of the images (TIFF; PNG, JPEG 2000 and compressed TIFF with imagecodecs)")
    p.add_argument("--load_data", help="a CellProfiler LoadData CSV (JUMP-CP), in place of --images and --pattern")
    p.add_argument("--metadata", required=True, help="CSV with plate, well, site and any other columns (the labels)")
    p.add_argument("--out", required=True, help="folder of the prepared dataset")
    p.add_argument("--pattern", help="file path under --images, with {plate} {well} {site} (and any metadata column) and, "
                   "one file per channel, {channel}; None: recognize RxRx's and this project's layouts")
    p.add_argument("--channels", type=lambda s: s.split(","),
                   help="comma-separated: the {channel} values (or LoadData channels) to take, in order; for one file "
                   "per site, the channel names. None: every channel found")
    p.add_argument("--channel_names", type=lambda s: s.split(","), help="comma-separated names stored in meta.json, e.g. DNA,ER,RNA,AGP,Mito")
    p.add_argument("--channel_axis", choices=["auto", "first", "last"], default="auto", help="of a multi-channel TIFF")
    p.add_argument("--crop_size", type=int, default=256, help="crop side in pixels; images are tiled into crops")
    p.add_argument("--shard_size", type=int, default=1024, help="crops per shard (rounded down to whole images)")
    p.add_argument("--convert", choices=["auto", "identity", "shift", "percentile"], default="auto",
                   help="to uint8: see to_uint8() in data.py")
    p.add_argument("--percentiles", type=lambda s: tuple(map(float, s.split(","))), default=(0.1, 99.9),
                   help="low,high for --convert percentile")
    p.add_argument("--workers", type=int, default=None, help="processes; None: one per core")
    p.add_argument("--on-error", dest="on_error", choices=["raise", "skip"], default="raise",
                   help="a bad image stops the run, or is left out and listed in skipped.csv")
    p = commands.add_parser("bench", help="loader crops/s", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", help="a prepared dataset; None: 2,048 random 256x256x6 crops in a temporary folder")
    p.add_argument("--batch_size", type=int, default=256, help="crops per batch")
    p.add_argument("--steps", type=int, default=50, help="batches timed")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="without the 8 flips/rotations")
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "prepare":
        if not (args["images"] or args["load_data"]):
            parser.error("prepare needs --images (a folder) or --load_data (a LoadData CSV)")
        prepare(**args)
    elif args["data"]:
        bench(**args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bench(random_dataset(tmp), **{k: v for k, v in args.items() if k != "data"})


if __name__ == "__main__":
    main()
