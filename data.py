"""
Microscopy images to training crops, and the loader that feeds them to training.

    python data.py prepare --images out/demo/synth/images --metadata out/demo/synth/metadata.csv --out out/demo/crops --crop_size 32
    python data.py prepare ... --part 2/8, then python data.py prepare --merge --out DIR  # many machines
    python data.py bench --data out/demo/crops                           # loader crops/s
    python data.py bench prepare                                         # prepare's images/s vs a plain copy

`prepare` cuts every image into crops and writes shards: `shard_00000.npy`, uint8 [n, C, H, W],
memory-mappable; `index.csv`, one row per crop (shard, offset, source, tile_y, tile_x and every
metadata column); `meta.json`, written last (channel names, crop size, counts, conversion rule).
`CropDataset` opens a prepared dataset; `Loader` streams uint8 batches from one or several of them.
"""

import argparse
import csv
import functools
import gzip
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from queue import Full, Queue

import numpy as np
import tifffile
import torch
from tqdm import tqdm

import addresses

FORMAT_VERSION = 1


def write_atomic(path, write):
    """Call write(file) on a temporary name beside path, then rename: readers never see half a file. The
    temporary name is unique (NAME.XXXX.tmp), so that processes writing the same file, the parts of one
    prepare on a shared filesystem, never write into each other's."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # not mkstemp: its files are private (0600)
    try:
        with open(tmp, "xb") as f:
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
    """An input image that cannot become crops: the problem, and the file when one of a site's files
    is the bad one (else the site's first file is named)."""
    def __init__(self, problem, file=None):
        super().__init__(problem)
        self.file = file


# ---- the screen's files and rows ------------------------------------------------------------------

def read_metadata(path):
    """A metadata table as row dicts of strings: a CSV (UTF-8 with or without a byte-order mark, as
    spreadsheets save it, else Latin-1), gzip-compressed (.csv.gz) or a parquet table, at a local path
    or a URL (as the Cell Painting Gallery ships its LoadData); a file with no row is an error."""
    if not addresses.is_url(path) and not Path(path).is_file():
        raise SystemExit(f"{path}: no such metadata file")
    try:
        raw = addresses.read_bytes(path)
    except addresses.MissingObject as e:
        raise SystemExit(str(e)) from None
    name = str(path).lower()
    try:
        if name.endswith(".parquet"):
            table = pyarrow_parquet(path).read_table(io.BytesIO(raw))
            rows = [{k: "" if v is None else str(v) for k, v in r.items()} for r in table.to_pylist()]
        else:
            raw = gzip.decompress(raw) if name.endswith(".gz") else raw
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except (OSError, EOFError, ValueError) as e:  # a cut gzip stream, a damaged parquet footer
        raise SystemExit(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
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
# The last three name images in tables: RxRx3-core's __key__, and the names made from plate, well, site,
# channel columns (see table_images); as they have no suffix, they come after the file layouts.
LAYOUTS = ("{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png", "{plate}/{well}_s{site}_w{channel}.{ext}",
           "{plate}/{well}_s{site}.{ext}", "{plate}_{well}_s{site}_w{channel}.{ext}", "{plate}_{well}_s{site}.{ext}",
           "{experiment}/Plate{plate}/{well}_s{site}_{channel}", "{plate}/{well}_s{site}_w{channel}", "{plate}/{well}_s{site}")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jp2", ".jpg", ".jpeg")


def image_files(images):
    """The image files under the folder `images`, as paths relative to it; or, where `images` is a
    parquet file or a folder of them, the images the tables hold (see table_images)."""
    images = Path(images)
    if images.suffix == ".parquet" and images.is_file():
        return table_images([images])
    if not images.is_dir():
        raise SystemExit(f"{images}: no such folder or parquet file")
    paths = [p for p in sorted(images.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES + (".parquet",) and p.is_file()]
    tables = [p for p in paths if p.suffix == ".parquet"]
    if tables:
        return table_images(tables)
    if not paths:
        raise SystemExit(f"{images}: no image files ({', '.join(IMAGE_SUFFIXES)}) or parquet tables")
    return [p.relative_to(images).as_posix() for p in paths], None, None


def pyarrow_parquet(path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise SystemExit(f"{path}: reading parquet tables needs pyarrow: pip install pyarrow") from None
    return pyarrow.parquet


def image_column(path, schema):
    """The column of encoded images: binary, or a hub's image struct {bytes, path}; exactly one."""
    import pyarrow as pa
    found = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
             or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)]
    if len(found) != 1:
        raise SystemExit(f"{path}: {'no' if not found else 'more than one'} column of encoded images "
                         f"(binary, or a struct with bytes) among {', '.join(schema.names)}")
    return found[0]


def table_images(tables):
    """Images stored one per row in parquet tables, as image datasets on public hubs store them
    (RxRx3-core): an encoded image column (PNG, JPEG 2000, TIFF; binary or a struct {bytes, path}) and
    either a `__key__` naming the image like a file path ('gene-001/Plate1/AC44_s1_1') or plate, well,
    site (and channel) columns, named then 'PLATE/WELL_sSITE[_wCHANNEL]'. Returns the names, {name:
    'TABLE#ROW'} where the pixels are, and {name: the row's other columns} (labels, when the table holds
    them). Only the small columns are read here; the images are read by the workers, a row group at a
    time."""
    pq = pyarrow_parquet(tables[0])
    where, labels = {}, {}
    for table in tables:
        try:
            schema = pq.read_schema(table)
            pixels = image_column(table, schema)
            rows = pq.read_table(table, columns=[n for n in schema.names if n != pixels]).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            raise SystemExit(f"{table}: unreadable parquet ({type(e).__name__}: {e})") from None
        if not rows:
            raise SystemExit(f"{table}: no rows (a schema alone): no image to prepare")
        for i, row in enumerate(rows):
            if "__key__" in row:
                name = str(row.pop("__key__"))
            elif {"plate", "well", "site"} <= set(row):
                name = f"{row['plate']}/{row['well']}_s{row['site']}" + (f"_w{row['channel']}" if "channel" in row else "")
            else:
                raise SystemExit(f"{table}: no __key__ column, and no plate, well, site columns, to name its images by")
            if name in where:
                raise SystemExit(f"{table} row {i}: image {name} appears twice")
            where[name] = f"{table}#{i}"
            labels[name] = {k: "" if v is None else str(v) for k, v in row.items() if k != "channel"}
    return list(where), where, labels


def table_metadata(tables, labels):
    """Metadata rows from the tables' own columns, one per site (the first image of each), in order."""
    rows = {}
    for row in labels.values():
        if not {"plate", "well", "site"} <= set(row):
            raise SystemExit(f"{tables}: the table has no plate, well, site columns: pass --metadata")
        rows.setdefault((row["plate"], row["well"], row["site"]), row)
    return list(rows.values())


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


def find_sites(images, files, rows, pattern, channels, on_error, where=None):
    """Match every image file (`files`, paths under `images`, or names in tables, found at where[name])
    to its metadata row, by the pattern's fields (every field but {channel} names a metadata column).
    Returns [(row, [file per channel])] in the metadata's order, and [(file, problem)] of the files no
    row names (an error unless on_error is 'skip')."""
    locate = where.__getitem__ if where else lambda name: str(Path(images) / name)
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
            strays.append((locate(name), f"no metadata row for {named(key)}"))
            if on_error == "raise":
                raise SystemExit(f"{strays[0][0]}: {strays[0][1]}")
            continue
        files_of[key][m["channel"] if per_channel else None] = locate(name)
    sites = []
    for row, (key, found) in zip(rows, files_of.items()):
        wanted = channels if per_channel else [None]
        absent = [c for c in wanted if c not in found]
        if absent:
            what = f"channel {', '.join(absent)}" if per_channel else "image"
            raise SystemExit(f"{images}: no {what} file for {named(key)} (pattern {pattern})")
        sites.append((row, [found[c] for c in wanted]))
    return sites, strays


BRIGHTFIELD = ("Brightfield", "HighZBF", "LowZBF")  # JUMP's three brightfield planes beside its five stains


def load_data_sites(load_data, rows, channels, illum=False, mirrors=()):
    """A CellProfiler LoadData table (JUMP-CP; .csv, .csv.gz or .parquet, local or a URL): one row per
    site with Metadata_Plate, Metadata_Well, Metadata_Site and, per channel NAME, FileName_OrigNAME and
    PathName_OrigNAME (a folder: absolute, relative to the table, or a URL), or URL_OrigNAME (the JUMP
    index's whole address). Returns [(metadata row, [file per channel] + [illumination function per
    channel with illum])] and the channel names: `channels` (a subset, in order) or every Orig channel
    but the brightfield planes. rows: the labels, joined on plate, well, site; None: the table's own
    Metadata_ columns (plate, well, site, and the others as named). Metadata_Source and Metadata_Batch
    are carried into each row.
    mirrors: [(prefix, local folder)] read in place of the addresses they cover."""
    renamed = {f"Metadata_{k.capitalize()}": k for k in ("plate", "well", "site")}
    table = read_metadata(load_data)
    forms = [f for f in ("URL_Orig", "FileName_Orig") if any(c.startswith(f) for c in table[0])]
    names = [c[len(forms[0]):] for c in table[0] if forms and c.startswith(forms[0])]
    missing = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site") if c not in table[0]]
    if missing or not names:
        raise SystemExit(f"{load_data}: not a LoadData table (missing {', '.join(missing) or 'FileName_Orig<channel> columns'})")
    unknown = [c for c in channels or [] if c not in names]
    if unknown:
        raise SystemExit(f"{load_data}: no channel {', '.join(unknown)} (it has {', '.join(names)})")
    names = list(channels or [n for n in names if n not in BRIGHTFIELD])
    columns = [f"{kind}_Orig{c}" for c in names for kind in (("URL",) if forms[0] == "URL_Orig" else ("FileName", "PathName"))]
    columns += [f"{kind}_Illum{c}" for c in names for kind in ("FileName", "PathName")] if illum else []
    absent = [c for c in columns if c not in table[0]]
    if absent:
        raise SystemExit(f"{load_data}: no column {', '.join(absent)}" + (" (--illum needs load_data_with_illum)" if illum else ""))
    if rows is None:  # the table's own metadata: Metadata_Plate -> plate, ...
        rows = [{renamed.get(k, k): v for k, v in site.items() if k.startswith("Metadata_")} for site in table]
    label_of = {tuple(key_value(f, r[f]) for f in ("plate", "well", "site")): r for r in rows}

    def address(folder, name):  # a folder: a URL, absolute, or relative to the table (itself local or a URL)
        if not (addresses.is_url(folder) or Path(folder).is_absolute()):
            folder = (addresses.join(str(load_data).rsplit("/", 1)[0], folder) if addresses.is_url(load_data)
                      else Path(load_data).parent / folder)
        return addresses.with_mirrors(addresses.join(folder, name), mirrors)

    sites, seen = [], set()
    for n, site in enumerate(table, start=2):
        key = tuple(key_value(f, site[f"Metadata_{f.capitalize()}"]) for f in ("plate", "well", "site"))
        if key not in label_of:
            raise SystemExit(f"{load_data} line {n}: no metadata row for plate {key[0]} well {key[1]} site {key[2]}")
        if key in seen:
            raise SystemExit(f"{load_data} line {n}: plate {key[0]} well {key[1]} site {key[2]} a second time")
        seen.add(key)
        row = {**{k: site[k] for k in ("Metadata_Source", "Metadata_Batch") if k in site}, **label_of[key]}
        if forms[0] == "URL_Orig":
            files = [addresses.with_mirrors(site[f"URL_Orig{c}"], mirrors) for c in names]
        else:
            files = [address(site[f"PathName_Orig{c}"], site[f"FileName_Orig{c}"]) for c in names]
        files += [address(site[f"PathName_Illum{c}"], site[f"FileName_Illum{c}"]) for c in names] if illum else []
        sites.append((row, files))
    return sites, names


# ---- one site's pixels ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)  # a site's channels are usually neighbours in a row group
def table_row_group(table, k):
    """Row group k of a table's image column."""
    file = pyarrow_parquet(table).ParquetFile(table)
    column = file.read_row_group(k, columns=[image_column(table, file.schema_arrow)]).column(0).combine_chunks()
    return column.field("bytes") if hasattr(column, "field") else column  # a hub's image struct {bytes, path}


@functools.lru_cache(maxsize=64)
def row_group_starts(table):
    metadata = pyarrow_parquet(table).ParquetFile(table).metadata
    return np.cumsum([0] + [metadata.row_group(j).num_rows for j in range(metadata.num_row_groups)])


def table_image_bytes(location):
    """The encoded image at 'TABLE#ROW'."""
    table, row = location.rsplit("#", 1)
    starts = row_group_starts(table)
    k = int(np.searchsorted(starts, int(row), side="right")) - 1
    return table_row_group(table, k)[int(row) - int(starts[k])].as_py()


def read_image(path):
    """One image's pixels: a file (local, or at a URL) by its suffix, TIFF with tifffile (compressed
    TIFF, PNG, JPEG 2000 and JPEG need imagecodecs, the codecs tifffile's author maintains), or a
    table's row ('TABLE#ROW')."""
    try:
        if ".parquet#" in path:
            import imagecodecs
            return imagecodecs.imread(table_image_bytes(path))
        source = io.BytesIO(addresses.read_bytes(path)) if addresses.is_url(path) else path
        if Path(path).suffix.lower() in (".tif", ".tiff"):
            return tifffile.imread(source)
        import imagecodecs
        return imagecodecs.imread(source.getvalue() if addresses.is_url(path) else path)
    except addresses.MissingObject as e:
        raise BadImage(str(e).removeprefix(f"{path}: ")) from None
    except ImportError:
        raise SystemExit(f"{path}: reading {Path(path).suffix} files needs imagecodecs: pip install imagecodecs") from None
    except Exception as e:  # codecs raise many kinds for truncated or foreign files
        if "imagecodecs" in str(e):
            raise SystemExit(f"{path}: this TIFF's compression needs imagecodecs: pip install imagecodecs") from None
        kind = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".jp2": "JPEG 2000", ".jpg": "JPEG",
                ".jpeg": "JPEG"}.get(Path(path).suffix.lower(), "image")
        # imagecodecs guessing a format lists every codec it tried, a line each: the first line says it
        raise BadImage(f"unreadable {kind} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def tiff_header(path):
    """A TIFF's shape and pixel type alone, as an array that takes no memory: for screen_shape, which
    would otherwise read up to 64 whole images before any work starts. Other formats are decoded."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return read_image(path)
    try:
        with addresses.open_binary(path) as f, tifffile.TiffFile(f) as tiff:  # at a URL, ranged reads
            return np.broadcast_to(np.zeros((), tiff.series[0].dtype), tiff.series[0].shape)
    except addresses.MissingObject as e:
        raise BadImage(str(e).removeprefix(f"{path}: ")) from None
    except Exception as e:
        raise BadImage(f"unreadable TIFF ({type(e).__name__}: {e})") from None


def read_site(files, n_channels, channel_axis, read=read_image):
    """The site's image as [C, H, W] in its own dtype."""
    arrays = []
    for f in files:
        try:
            arrays.append(read(f))
        except BadImage as e:
            raise BadImage(str(e), f) from None
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
            shapes[read_site(files, n_channels, channel_axis, read=tiff_header).shape] += 1
        except BadImage as e:
            problems.append(f"{e.file or files[0]}: {e}")
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
    stretch = lambda v, low, high: np.clip(np.rint((v - low) / max(high - low, 1e-12) * 255), 0, 255).astype(np.uint8)
    if image.dtype.kind == "f":
        return np.stack([stretch(c.astype(np.float64), *np.percentile(c, percentiles)) for c in image])
    # Integer pixels: the percentiles from a histogram and the stretch as a table of every value, O(pixels)
    # instead of a sort and float arithmetic per pixel; the same numbers (tests/test_data.py checks).
    out = np.empty(image.shape, np.uint8)
    for c, channel in enumerate(image):
        # torch's bincount: 2.5x numpy's, which first copies the pixels to int64
        counts = torch.bincount(torch.from_numpy(channel.astype(np.int32).ravel()), minlength=np.iinfo(image.dtype).max + 1).numpy()
        low, high = histogram_percentiles(np.cumsum(counts), percentiles)
        np.take(stretch(np.arange(len(counts), dtype=np.float64), low, high), channel, out=out[c])
    return out


def histogram_percentiles(cumulative, percentiles):
    """np.percentile(x, percentiles) (its default, linear method), from x's cumulative histogram: the
    order statistics at floor and ceil of (n - 1) q / 100, interpolated as numpy does (from the upper
    one when the fraction is >= 0.5), so that the results are the same floats."""
    n = int(cumulative[-1])
    position = np.true_divide(percentiles, 100) * (n - 1)
    below = np.floor(position)
    fraction = position - below
    value_at = lambda rank: np.searchsorted(cumulative, rank, side="right").astype(np.float64)
    a, b = value_at(below), value_at(below + 1)  # b past the end only where fraction is 0
    return np.where(fraction >= 0.5, b - (b - a) * (1 - fraction), a + (b - a) * fraction)


def border(size, crop):
    """Pixels left out before and after the largest centred run of whole crops along one side."""
    left_over = size % crop
    return left_over // 2, left_over - left_over // 2


def tile(image, crop):
    """[C, H, W] -> [(H//crop)*(W//crop), C, crop, crop], row-major over tiles: the largest centred grid
    of whole crops (an imager's 1080 px field at crop 256: 4 x 4 crops, 28 px left out on each side)."""
    C, H, W = image.shape
    (top, _), (left, _) = border(H, crop), border(W, crop)
    ny, nx = H // crop, W // crop
    image = image[:, top:top + ny * crop, left:left + nx * crop]
    return image.reshape(C, ny, crop, nx, crop).transpose(1, 3, 0, 2, 4).reshape(-1, C, crop, crop)


@functools.lru_cache(maxsize=64)  # one function per plate and channel, shared by all of the plate's sites
def illumination(address):
    """A CellProfiler illumination function (the gallery's <plate>_Illum<Channel>.npy): float [H, W]."""
    try:
        function = np.load(io.BytesIO(addresses.read_bytes(address)), allow_pickle=False)
    except (addresses.MissingObject, OSError, ValueError) as e:
        raise BadImage(f"illumination function {address}: {e}") from None
    if function.ndim != 2 or not np.isfinite(function).all() or (function <= 0).any():
        raise BadImage(f"illumination function {address}: expected positive finite [H, W], got {function.dtype} {function.shape}")
    return function


def correct_illumination(image, functions):
    """CellProfiler's CorrectIlluminationApply, Divide: each channel over its illumination function."""
    corrected = image.astype(np.float64)
    for c, address in enumerate(functions):
        function = illumination(address)
        if function.shape != image.shape[1:]:
            raise BadImage(f"illumination function {address} is {function.shape}, the image {image.shape[1:]}")
        corrected[c] /= function
    return corrected


def prepare_shard(job):
    """Worker: convert and tile one shard's sites, write shard_XXXXX.npy, then its manifest (the mark
    that the shard is complete). Returns the shard's manifest."""
    out, shard, sites, opts, on_error = job
    crops, kept, skipped = [], [], []
    for site_id, files in sites:
        files, functions = (files[:opts["n_channels"]], files[opts["n_channels"]:]) if opts["illum"] else (files, [])
        try:
            image = read_site(files, opts["n_channels"], opts["channel_axis"])
            if functions:
                image = correct_illumination(image, functions)
            tiles = tile(to_uint8(image, opts["convert"], opts["percentiles"]), opts["crop_size"])
            if image.shape[1:] != tuple(opts["image_shape"]):
                raise BadImage(f"size {image.shape[1]}x{image.shape[2]} differs from the screen's "
                               f"{opts['image_shape'][0]}x{opts['image_shape'][1]}")
        except BadImage as e:
            if on_error == "raise":
                raise BadImage(f"{e.file or files[0]}: {e}") from None
            skipped.append([e.file or files[0], str(e)])
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


def labelled(metadata, rows):
    """The metadata rows, once checked: plate, well, site are required; what the later steps will miss
    is said before any work, as a warning with counts."""
    missing = {"plate", "well", "site"} - set(rows[0])
    if missing:
        raise SystemExit(f"{metadata}: missing column(s) {', '.join(sorted(missing))}")
    warn_about_labels(metadata, rows)
    return rows


def warn_about_labels(metadata, rows):
    if "perturbation" not in rows[0]:
        print(f"warning: {metadata}: no perturbation column: curate.py, probe.py and evaluate.py need one (the gene, "
              f"siRNA or compound of each site; controls by name, --control)", file=sys.stderr)
        return
    unlabeled = sum(not r["perturbation"].strip() for r in rows)
    if unlabeled:
        print(f"warning: {metadata}: {unlabeled} of {len(rows)} rows have no perturbation; "
              f"their wells are left out of the benchmarks", file=sys.stderr)


def prepare(images, metadata, out, pattern=None, channels=None, channel_names=None, load_data=None, channel_axis="auto",
            crop_size=256, shard_size=1024, convert="auto", percentiles=(0.1, 99.9), workers=None, on_error="raise",
            part=(1, 1), illum=False, mirrors=(), exact_tiling=False):
    """Images + metadata CSV -> shards, index.csv, meta.json. The images: a folder and a --pattern
    (or a layout recognized without one), parquet tables of encoded images, or a LoadData CSV
    (load_data, in place of both). Resumable: run it again and it finishes the shards that are
    missing, and redoes those with skipped files (a file fixed since is taken); finished shards are
    kept. on_error may change between runs.
    part=(i, n): write only the i-th of n slices of the shards, and that part's index
    (part_I_of_N.csv); `merge` joins the parts when all n are written. The parts may run at once,
    on many machines, into the same `out`.
    Images whose sides are not multiples of crop_size give the largest centred grid of whole crops
    (the border left out is said once and kept in meta.json); exact_tiling refuses them instead.
    LoadData only: illum divides each channel by its illumination function (the table's Illum
    columns) before the uint8 conversion; mirrors [(prefix, folder)] read addresses from a local copy;
    metadata None takes the labels from the table's own Metadata_ columns."""
    low, high = percentiles
    if not 0 <= low < high <= 100:
        raise SystemExit(f"--percentiles {low},{high}: need 0 <= low < high <= 100")
    if crop_size < 1 or shard_size < 1:
        raise SystemExit(f"--crop_size {crop_size}, --shard_size {shard_size}: each must be 1 or more")
    i_part, n_parts = part
    if not 1 <= i_part <= n_parts:
        raise SystemExit(f"--part {i_part}/{n_parts}: need 1 <= I <= N")
    out = Path(out)
    if load_data:
        rows = labelled(metadata, read_metadata(metadata)) if metadata else None
        sites, names = load_data_sites(load_data, rows, channels, illum, [tuple(m) for m in mirrors])
        rows = rows or labelled(load_data, [row for row, _ in sites])
        images = str(load_data).rsplit("/", 1)[0] if addresses.is_url(load_data) else Path(load_data).parent
        strays, layout, n_expected = [], f"LoadData {load_data}", len(names)
    else:
        images = Path(images)
        files, where, labels = image_files(images)  # listed once: a screen may hold millions
        if metadata is None and labels is None:
            raise SystemExit(f"{images}: image files carry no labels: pass --metadata")
        rows = labelled(metadata or images, read_metadata(metadata) if metadata else table_metadata(images, labels))
        layout = pattern or guess_pattern(files, rows[0])
        if "{channel}" in layout and not channels:
            channels = channel_values(files, layout)
            if not channels:
                raise SystemExit(f"{images}: no file matches the layout {layout}")
        sites, strays = find_sites(images, files, rows, layout, channels, on_error, where)
        names, n_expected = channels, len(channels) if channels else None
    if not sites:
        raise SystemExit(f"{images}: no file matches the layout {layout}")
    channel_files = len(names) if load_data and illum else None  # the illumination functions follow
    n_channels, *image_shape = screen_shape([(row, files[:channel_files]) for row, files in sites], n_expected, channel_axis)
    left_out = [border(image_shape[0], crop_size), border(image_shape[1], crop_size)]  # [[top, bottom], [left, right]]
    if min(image_shape) < crop_size or (exact_tiling and any(map(any, left_out))):
        raise SystemExit(f"{images}: the screen's {image_shape[0]}x{image_shape[1]} images do not tile into {crop_size}x{crop_size} crops")
    if any(map(any, left_out)):
        print(f"{images}: {image_shape[0]}x{image_shape[1]} images: the centred {image_shape[0] // crop_size}x"
              f"{image_shape[1] // crop_size} crops of {crop_size} px, leaving out {left_out[0][0]}/{left_out[0][1]} px "
              f"at the top/bottom and {left_out[1][0]}/{left_out[1][1]} at the left/right (--exact_tiling refuses such images)")
    names = list(channel_names or names or [f"ch{i + 1}" for i in range(n_channels)])
    for given, what in ((channels, "--channels"), (names, "--channel_names" if channel_names else "the channel names")):
        twice = sorted({n for n in given or [] if list(given).count(n) > 1})
        if twice:
            raise SystemExit(f"{what}: {', '.join(twice)} named twice (each channel once: a CA-MAE has one table row a name)")
    if len(names) != n_channels:
        raise SystemExit(f"--channel_names: {len(names)} names for the screen's {n_channels} channels")
    tiles_per_site = (image_shape[0] // crop_size) * (image_shape[1] // crop_size)
    sites_per_shard = max(1, shard_size // tiles_per_site)  # shards hold whole images
    opts = dict(n_channels=n_channels, channel_axis=channel_axis, image_shape=image_shape,
                crop_size=crop_size, convert=convert, percentiles=list(percentiles), illum=bool(load_data and illum))
    jobs = [(str(out), k, [(i, files) for i, (_, files) in enumerate(sites[s:s + sites_per_shard], start=s)], opts, on_error)
            for k, s in enumerate(range(0, len(sites), sites_per_shard))]
    plan = dict(version=FORMAT_VERSION, images=str(images), metadata=str(metadata), layout=layout, opts=opts,
                sites_per_shard=sites_per_shard, shards=[[files for _, files in job[2]] for job in jobs])
    mine = jobs[(i_part - 1) * len(jobs) // n_parts:i_part * len(jobs) // n_parts]  # contiguous, by number
    name = "index" if n_parts == 1 else f"part_{i_part}_of_{n_parts}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        # What a killed or failed run of this part was writing (other parts may be writing theirs now).
        for k in [job[1] for job in mine]:
            for leftover in out.glob(f"shard_{k:05d}.*.tmp"):
                leftover.unlink()
        if (out / "plan.json").exists():
            if json.loads((out / "plan.json").read_text()) != plan:
                raise SystemExit(f"{out}: holds a prepare run with other inputs or settings; use a new --out")
        else:
            write_json(out / "plan.json", plan)
        manifests = {}
        for job in mine:  # resume: a shard whose manifest exists is complete, unless it skipped a file
            path = out / f"shard_{job[1]:05d}.json"
            if path.exists() and (out / f"shard_{job[1]:05d}.npy").exists():
                manifest = json.loads(path.read_text())
                if not manifest["skipped"]:
                    manifests[job[1]] = manifest
        todo = [job for job in mine if job[1] not in manifests]
        if len(todo) < len(mine):
            print(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already written")
        # One thread per worker process: each is one core's work, and a forked child that enters torch's
        # OpenMP pool (to_uint8's bincount) after the parent used it hangs forever (GNU OpenMP is not fork-safe).
        with ProcessPoolExecutor(workers or os.cpu_count(), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = [pool.submit(prepare_shard, job) for job in todo]
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc="prepare", unit="shard"):
                    manifest = future.result()
                    manifests[manifest["shard"]] = manifest
            except BadImage as e:
                pool.shutdown(cancel_futures=True)  # shards already being written finish, and are kept
                raise SystemExit(f"{e} (finished shards are kept: fix the file or pass --on-error skip, then rerun)")
        columns = list(sites[0][0]) if load_data else list(rows[0])  # LoadData's source and batch included
        index = []
        source = lambda f: str(f) if addresses.is_url(f) or not Path(f).is_relative_to(images) else Path(f).relative_to(images).as_posix()
        for k in sorted(manifests):
            offset = 0
            for site_id in manifests[k]["sites"]:
                row, files = sites[site_id]
                for t in range(tiles_per_site):
                    ty, tx = divmod(t, image_shape[1] // crop_size)
                    index.append([k, offset, source(files[0]), ty, tx] + [row.get(c, "") for c in columns])
                    offset += 1
        skipped = [s for k in sorted(manifests) for s in manifests[k]["skipped"]] + ([list(s) for s in strays] if i_part == 1 else [])
        meta = dict(version=FORMAT_VERSION, channels=names, crop_size=crop_size, crops=len(index),
                    images=sum(len(m["sites"]) for m in manifests.values()), skipped=len(skipped), shards=len(jobs),
                    crops_per_shard=sites_per_shard * tiles_per_site, tiles_per_image=tiles_per_site, convert=convert,
                    layout=layout, percentiles=list(percentiles) if convert in ("auto", "percentile") else None,
                    source=str(images), image_size=image_shape, border_px=left_out, illumination_corrected=opts["illum"])
        write_csv(out / f"{name}.csv", ["shard", "offset", "source", "tile_y", "tile_x"] + columns, index)
        write_csv(out / ("skipped.csv" if n_parts == 1 else f"{name}_skipped.csv"), ["file", "problem"], skipped)
        if n_parts > 1:  # the mark that this part is complete: merge reads it
            write_json(out / f"{name}.json", meta)
            print(f"{out}: part {i_part} of {n_parts}: {len(index)} crops in {len(mine)} shards; "
                  f"when every part is written: python data.py prepare --merge --out {out}")
            return out
        write_json(out / "meta.json", meta)
    except OSError as e:  # a full disk, a read-only folder: nothing half-written is left (write_atomic)
        raise SystemExit(f"{out}: cannot write ({e.strerror or e}); nothing half-written was left, rerun to finish") from None
    print(f"{out}: {len(index)} crops of {n_channels}x{crop_size}x{crop_size} in {len(jobs)} shards"
          + (f"; skipped {len(skipped)} images, listed in {out / 'skipped.csv'}" if skipped else ""))
    return out


def merge(out):
    """Join the parts of a prepare run (part_I_of_N.csv, .json) into index.csv, skipped.csv and
    meta.json, the dataset the single run would have written, crop for crop: the parts' shards are
    numbered in one sequence, so no pixel is copied. Refused, naming them, while parts are missing."""
    out = Path(out)
    done = {tuple(map(int, m.groups())): p for p in out.glob("part_*_of_*.json")
            if (m := re.fullmatch(r"part_(\d+)_of_(\d+)\.json", p.name))}
    counts = {n for _, n in done}
    if len(counts) != 1:
        raise SystemExit(f"{out}: {'no finished part' if not counts else 'parts of different --part N: ' + ', '.join(map(str, sorted(counts)))}"
                         " (run data.py prepare --part I/N for each I, then --merge)")
    n = counts.pop()
    missing = [i for i in range(1, n + 1) if (i, n) not in done]
    if missing:
        raise SystemExit(f"{out}: part(s) {', '.join(map(str, missing))} of {n} not finished: run data.py prepare "
                         f"with --part {missing[0]}/{n} (the same command as the others), then --merge")
    metas = [json.loads(done[i, n].read_text()) for i in range(1, n + 1)]
    index, skipped = [], []
    for i, part in enumerate(metas, start=1):  # each part's tables against its json, the mark that it finished
        name = f"part_{i}_of_{n}"
        try:
            with open(out / f"{name}.csv", newline="") as f:
                reader = csv.reader(f)
                header = next(reader)
                rows = list(reader)
            part_skipped = [list(r.values()) for r in read_csv(out / f"{name}_skipped.csv")]
        except (OSError, StopIteration, csv.Error) as e:
            raise SystemExit(f"{out / name}.csv: unreadable or missing ({type(e).__name__}): rerun data.py prepare "
                             f"--part {i}/{n}, then --merge") from None
        if len(rows) != part["crops"] or any(len(r) != len(header) for r in rows) or len(part_skipped) != part["skipped"]:
            raise SystemExit(f"{out / name}.csv: {len(rows)} crops where {name}.json says {part['crops']} (cut or "
                             f"changed since): rerun data.py prepare --part {i}/{n}, then --merge")
        index += rows
        skipped += part_skipped
    meta = dict(metas[0], crops=len(index), images=sum(m["images"] for m in metas), skipped=len(skipped))
    try:
        write_csv(out / "index.csv", header, index)
        write_csv(out / "skipped.csv", ["file", "problem"], skipped)
        write_json(out / "meta.json", meta)
    except OSError as e:
        raise SystemExit(f"{out}: cannot write ({e.strerror or e}); nothing half-written was left, rerun --merge") from None
    print(f"{out}: merged {n} parts: {len(index)} crops in {meta['shards']} shards"
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
        try:
            self.meta = json.loads((self.root / "meta.json").read_text())
        except ValueError as e:
            raise SystemExit(f"{self.root / 'meta.json'}: unreadable ({e})") from None
        names = self.meta.get("channels") if isinstance(self.meta, dict) else None
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)) \
                or not isinstance(self.meta.get("crop_size"), int):
            raise SystemExit(f"{self.root / 'meta.json'}: not a prepared dataset's (it needs channels, a list of names, "
                             "and crop_size; run data.py prepare)")
        if len(set(names)) != len(names):
            raise SystemExit(f"{self.root / 'meta.json'}: a channel named twice ({', '.join(names)}): each name is one "
                             "row of a CA-MAE's channel tables")
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
    """Micro-batches of uint8 crops [B, C, H, W], each with the index of the dataset it came from
    (its channels' names are in that dataset's meta), forever, from one or several prepared datasets.

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
            yield (x.pin_memory() if self.device.type == "cuda" else x), d

    def produce(self, step):
        """The background thread: batches into the queue until close(); an error goes into the queue
        too, for __next__ to raise in the training loop (a thread that died silently would leave it
        waiting forever)."""
        try:
            while not self.stopping.is_set():
                for batch in self.step_batches(step):
                    self.put(batch)
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
        batch = self.queue.get()
        if isinstance(batch, BaseException):
            self.queue.put(batch)  # every later call raises it again
            raise batch
        x, d = batch
        return x.to(self.device, non_blocking=True), d


def bench(data, batch_size=256, steps=50, augment=True):
    """Loader throughput alone: crops/s and MB/s, after one warm-up pass over the data."""
    dataset = CropDataset(data)
    for i in range(0, len(dataset), 4096):  # warm the page cache
        dataset.crops(range(i, min(i + 4096, len(dataset))))
    loader = Loader([dataset], batch_size, augment=augment)
    next(loader)
    start = time.perf_counter()
    for _ in range(steps):
        x, _ = next(loader)
    seconds = time.perf_counter() - start
    mb = x[0].numel() * steps * batch_size / 1e6
    print(f"loader: {steps * batch_size / seconds:.0f} crops/s, {mb / seconds:.0f} MB/s | crops {list(x.shape[1:])} "
          f"uint8, batch {batch_size}, augment {augment}, {len(dataset)} crops in {dataset.meta['shards']} shards, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores")


def copy_file(paths):
    source, target = paths
    Path(target).parent.mkdir(exist_ok=True)
    Path(target).write_bytes(Path(source).read_bytes())


def bench_prepare(n_images=32, workers=2, size=2048, channels=6):
    """prepare's images/s and MB/s (of input) on 16-bit TIFFs, against the limit of this machine's
    disk and memory: reading the same files and writing them whole, by as many processes. Both run
    three times, alternating, from a warm page cache, each until its writes are on disk (sync); the
    best of each is printed."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        for i in range(n_images):
            blobs = rng.normal(2000, 300, (channels, size // 8, size // 8)).clip(0, 65535).astype(np.uint16)
            pixels = blobs.repeat(8, 1).repeat(8, 2) + rng.integers(0, 256, (channels, size, size), dtype=np.uint16)
            tifffile.imwrite(tmp / "images" / f"P1_W{i:03d}_s1.tif", pixels, photometric="minisblack")
        write_csv(tmp / "metadata.csv", ["plate", "well", "site"], [["P1", f"W{i:03d}", 1] for i in range(n_images)])
        files = sorted((tmp / "images").iterdir())
        mb = sum(f.stat().st_size for f in files) / 1e6
        times = {"copy": [], "prepare": []}
        for attempt in range(3):
            os.sync()  # the previous run's writes are not this one's to flush
            start = time.perf_counter()
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(copy_file, [(f, tmp / "copy" / f.name) for f in files]))
            os.sync()
            times["copy"].append(time.perf_counter() - start)
            shutil.rmtree(tmp / "copy")
            os.sync()
            start = time.perf_counter()
            prepare(tmp / "images", tmp / "metadata.csv", tmp / "crops", pattern="{plate}_{well}_s{site}.tif",
                    workers=workers, shard_size=64)
            os.sync()
            times["prepare"].append(time.perf_counter() - start)
            shutil.rmtree(tmp / "crops")
    copy, prep = min(times["copy"]), min(times["prepare"])
    print(f"prepare: {n_images / prep:.2f} images/s, {mb / prep:.0f} MB/s | plain read and write of the same files: "
          f"{n_images / copy:.2f} images/s, {mb / copy:.0f} MB/s | prepare at {copy / prep:.2f}x of that limit "
          f"({n_images} images of {channels}x{size}x{size} uint16, {mb:.0f} MB, crops 256, convert auto (percentile), "
          f"{workers} processes, {os.cpu_count()} cores)")


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

def part_of(text):
    """--part: 'I/N', or 'torchrun' for each process of `torchrun --nproc_per_node=N data.py prepare ...`."""
    if text == "torchrun":
        return int(os.environ.get("RANK", 0)) + 1, int(os.environ.get("WORLD_SIZE", 1))
    i, n = map(int, text.split("/"))
    return i, n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="images + metadata CSV -> shards of uint8 crops", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", help="folder of the images (TIFF; PNG, JPEG 2000 and compressed TIFF with imagecodecs), "
                   "or a parquet table of encoded images (or a folder of them; with pyarrow)")
    p.add_argument("--load_data", help="a CellProfiler LoadData table (JUMP-CP; .csv, .csv.gz, .parquet; a path or a URL "
                   "such as s3://cellpainting-gallery/...), in place of --images and --pattern")
    p.add_argument("--metadata", help="CSV with plate, well, site and any other columns (the labels); None: "
                   "the parquet table's own columns, or the LoadData's Metadata_ columns")
    p.add_argument("--illum", action="store_true", help="LoadData: divide each channel by its illumination function "
                   "(FileName_Illum<channel>, as load_data_with_illum names them) before the uint8 conversion")
    p.add_argument("--mirror", dest="mirrors", action="append", default=[], type=lambda s: s.split("=", 1),
                   metavar="PREFIX=DIR", help="read addresses starting with PREFIX from the local folder DIR, e.g. "
                   "s3://cellpainting-gallery=/data/cpg (repeatable)")
    p.add_argument("--exact_tiling", action="store_true", help="refuse images whose sides are not multiples of "
                   "--crop_size, instead of taking their largest centred grid of crops")
    p.add_argument("--out", required=True, help="folder of the prepared dataset")
    p.add_argument("--pattern", help="file path under --images, with {plate} {well} {site} (and any metadata column) and, "
                   "one file per channel, {channel}; None: recognize RxRx's and this project's layouts")
    p.add_argument("--channels", type=lambda s: s.split(","),
                   help="comma-separated: the {channel} values (or LoadData channels) to take, in order; for one file "
                   "per site, the channel names. None: every channel found (LoadData: but the brightfield planes)")
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
    p.add_argument("--part", type=part_of, default=(1, 1),
                   help="I/N: only the I-th of N slices of the shards (an array job's task; the same command "
                   "otherwise), or 'torchrun': RANK+1 of WORLD_SIZE; then --merge")
    p.add_argument("--merge", action="store_true", help="join the finished parts in --out into the dataset (alone with --out)")
    p = commands.add_parser("bench", help="loader crops/s, or prepare's images/s", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("what", nargs="?", choices=["loader", "prepare"], default="loader",
                   help="loader: crops/s of the training loader; prepare: images/s and MB/s of prepare on "
                   "2048x2048x6 16-bit TIFFs against reading and writing the same files plainly")
    p.add_argument("--images", type=int, default=32, help="prepare: 2048x2048x6 images written for the benchmark")
    p.add_argument("--workers", type=int, default=2, help="prepare: processes, for both prepare and the plain copy")
    p.add_argument("--data", help="a prepared dataset; None: 2,048 random 256x256x6 crops in a temporary folder")
    p.add_argument("--batch_size", type=int, default=256, help="crops per batch")
    p.add_argument("--steps", type=int, default=50, help="batches timed")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="without the 8 flips/rotations")
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "prepare" and args.pop("merge"):
        merge(args["out"])
    elif command == "prepare":
        if not (args["images"] or args["load_data"]):
            parser.error("prepare needs --images (a folder or parquet) or --load_data (a LoadData CSV)")
        if any(len(m) != 2 for m in args["mirrors"]):
            parser.error("--mirror takes PREFIX=DIR")
        prepare(**args)
    elif args.pop("what") == "prepare":
        bench_prepare(args["images"], args["workers"])
    else:
        loader_args = {k: args[k] for k in ("batch_size", "steps", "augment")}
        if args["data"]:
            bench(args["data"], **loader_args)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                bench(random_dataset(tmp), **loader_args)


if __name__ == "__main__":
    main()
