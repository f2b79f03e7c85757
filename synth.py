"""
The built-in synthetic screen: a Cell-Painting-like CRISPR screen with planted biology, written as a
real screen is stored (TIFFs per site, a metadata CSV), so every step of the method runs on it.

    python synth.py --size demo --out out/demo/synth
    python synth.py --size demo --replicates 2 --junk --out data/junk   # with junk for curate.py to find

Genes come from real CORUM complexes (the annotation tables evaluate.py scores with); a complex shifts
a few phenotype axes of its members' cells together. Compounds mimic a target gene. Plates carry batch
effects. Writes images/{plate}/{well}_s{site}.tif (uint16 [6, S, S]), metadata.csv, truth.json, and the
inputs of the benchmarks: null_genes.txt, compound_activity.csv, gene_groups.csv, planted.npy/.csv.
With --channels 5 the same screen is written as a JUMP plate is: five stains (Golgi imaged with actin
and membrane in AGP), one TIFF per channel named as the Phenix imager names them, and a CellProfiler
LoadData CSV (load_data.csv) that data.py prepare --load_data reads.

    python synth.py --size demo --channels 5 --out out/jump
"""

import argparse
import gzip
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

import data
import evaluate

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



CHANNELS = ("DNA", "RNA", "ER", "AGP", "Golgi", "Mito")
# JUMP-CP's five stains in its LoadData order, each as a mix of the six rendered ones (rows: CHANNELS),
# and the imager's channel number in its file names (r01c01f01p01-ch1sk1fk1fl1.tiff)
JUMP_CHANNELS = {"DNA": (1, [1, 0, 0, 0, 0, 0]), "ER": (4, [0, 0, 1, 0, 0, 0]), "RNA": (3, [0, 1, 0, 0, 0, 0]),
                 "AGP": (2, [0, 0, 0, 1, 1, 0]), "Mito": (5, [0, 0, 0, 0, 0, 1])}
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
    complexes = evaluate.corum_complexes(annotations) if annotations else BUILTIN_COMPLEXES
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
    """What curation must find (curate.py): gene wells whose images are out of focus, empty (no
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


def write_jump_site(out, plate, well, site, pixels):
    """One site as a JUMP plate stores it: a uint16 TIFF per stain, named as the Phenix imager names it.
    Returns the LoadData CSV's row (paths relative to the CSV, which data.py resolves beside it)."""
    mix = np.array([weights for _, weights in JUMP_CHANNELS.values()], np.float64)
    stains = np.clip(np.tensordot(mix, pixels.astype(np.float64), 1), 0, 65535).astype(np.uint16)
    field = f"r{'ABCDEFGH'.index(well[0]) + 1:02d}c{int(well[1:]):02d}f{site:02d}p01"
    row = [plate, well, site]
    for (name, (number, _)), image in zip(JUMP_CHANNELS.items(), stains):
        path = out / "images" / plate / f"{field}-ch{number}sk1fk1fl1.tiff"
        data.write_atomic(path, lambda f: tifffile.imwrite(f, image, photometric="minisblack"))
        row += [path.name, f"images/{plate}"]
    return row


GALLERY = "s3://cellpainting-gallery/cpg0016-jump"
BRIGHTFIELD_PLANES = {"Brightfield": 6, "HighZBF": 7, "LowZBF": 8}


def write_gallery_plate(root, wells=("A01", "A02", "B01"), sites=2, size=540, seed=0, source="source_4",
                        batch="2021_04_26_Batch1", plate="BR00117035"):
    """A plate as the Cell Painting Gallery stores it, under root (a copy of s3://cellpainting-gallery/):
    cpg0016-jump/<source>/images/<batch>/images/<plate>/r01c01f01p01-ch1sk1fk1fl1.tiff (uint16, one per
    stain and brightfield plane), images/<batch>/illum/<plate>/<plate>_Illum<Channel>.npy (float, one per
    stain) and workspace/load_data_csv/<batch>/<plate>/load_data_with_illum.csv.gz, whose PathName
    columns are the s3:// folders. Fields of size x size px, random texture. Returns the LoadData's path."""
    rng = np.random.default_rng(seed)
    prefix = f"{source}/images/{batch}"
    planes = {name: number for name, (number, _) in JUMP_CHANNELS.items()} | BRIGHTFIELD_PLANES
    folder = Path(root) / "cpg0016-jump" / prefix
    for name in JUMP_CHANNELS:  # smooth, positive, around 1: a vignette, as CellProfiler's functions are
        y, x = np.mgrid[:size, :size] / size - 0.5
        function = (1.2 - (x ** 2 + y ** 2) * rng.uniform(0.5, 1.0)).astype(np.float32)
        path = folder / "illum" / plate / f"{plate}_Illum{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, function)
    header = ["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    header += [f"{kind}_Orig{name}" for name in planes for kind in ("FileName", "PathName")]
    header += [f"{kind}_Illum{name}" for name in JUMP_CHANNELS for kind in ("FileName", "PathName")]
    rows = []
    for well in wells:
        for site in range(1, sites + 1):
            field = f"r{'ABCDEFGH'.index(well[0]) + 1:02d}c{int(well[1:]):02d}f{site:02d}p01"
            row = [source, batch, plate, well, site]
            for name, number in planes.items():
                path = folder / "images" / plate / f"{field}-ch{number}sk1fk1fl1.tiff"
                path.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(path, rng.gamma(2.0, 3000, (size, size)).astype(np.uint16), photometric="minisblack")
                row += [path.name, f"{GALLERY}/{prefix}/images/{plate}/"]
            for name in JUMP_CHANNELS:
                row += [f"{plate}_Illum{name}.npy", f"{GALLERY}/{prefix}/illum/{plate}/"]
            rows.append(row)
    load_data = Path(root) / "cpg0016-jump" / source / "workspace" / "load_data_csv" / batch / plate / "load_data_with_illum.csv.gz"
    load_data.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(",".join(map(str, r)) for r in [header] + rows) + "\n"
    data.write_atomic(load_data, lambda f: f.write(gzip.compress(text.encode())))
    return load_data


def synth(out, size="demo", seed=0, annotations="auto", replicates=1, junk=False, channels=6):
    """Write a synthetic screen: images/{plate}/{well}_s{site}.tif (uint16 [6, S, S]), metadata.csv,
    truth.json (each gene's complex and planted phenotype, each compound's target, the planted junk),
    and the inputs evaluate.py and probe.py take: null_genes.txt (genes planted without effect, like
    unexpressed genes), compound_activity.csv (each compound's target and potency), gene_groups.csv (each
    complex gene's complex, for probe.py --task group), and planted.npy + planted.csv (each well's
    planted phenotype, before plate effects and rendering: the truth as a map). replicates: wells per gene
    per experiment; junk: plant bad images, unlabeled wells and inconsistent genes (plant_junk).
    channels=5: the same screen as a JUMP plate (write_jump_site, load_data.csv)."""
    if channels not in (5, 6):
        raise SystemExit(f"--channels {channels}: 6 (this project's stains) or 5 (JUMP-CP's)")
    out = Path(out)
    annotations = evaluate.annotation_tables() if annotations == "auto" else annotations
    if annotations is None:
        print("annotation tables unavailable: planting the built-in complexes instead")
    cfg, effects, groups, compounds, wells = plan_screen(size, seed, annotations, replicates)
    rng = np.random.default_rng(seed + 1)
    plates = {w["plate"]: plate_effects(rng, cfg["image_size"]) for w in wells}
    planted = plant_junk(np.random.default_rng([seed, 7]), wells, effects, groups) if junk else {}
    spoiled = {i: kind for kind in ("blurred", "empty", "saturated") for i in planted.get(kind, [])}
    rows, load_data, junk_images = [], [], {kind: [] for kind in ("blurred", "empty", "saturated")}
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
            if channels == 5:
                load_data.append(write_jump_site(out, w["plate"], w["well"], site, pixels))
            else:
                data.write_atomic(path, lambda f: tifffile.imwrite(f, pixels, photometric="minisblack"))
            rows.append([w["plate"], w["well"], site, label, w["perturbation_type"],
                         w["perturbation_type"] == "control", w["experiment"], "synthetic-U2OS",
                         w["concentration"]])
    data.write_csv(out / "metadata.csv", ["plate", "well", "site", "perturbation", "perturbation_type", "is_control",
                                     "experiment", "cell_type", "concentration"], rows)
    if channels == 5:
        data.write_csv(out / "load_data.csv", ["Metadata_Plate", "Metadata_Well", "Metadata_Site",
                                               *(f"{kind}_Orig{name}" for name in JUMP_CHANNELS for kind in ("FileName", "PathName"))],
                       load_data)
    data.write_json(out / "truth.json", dict(
        seed=seed, size=size, features=FEATURES, channels=CHANNELS if channels == 6 else list(JUMP_CHANNELS),
        annotations=str(annotations) if annotations else "builtin",
        genes={g: dict(complex=groups[g], effect=effects[g].round(4).tolist()) for g in sorted(effects)},
        compounds=compounds, replicates=replicates,
        junk=dict(junk_images, inconsistent=planted["inconsistent"],
                  unlabeled=[[wells[i]["plate"], wells[i]["well"]] for i in planted["unlabeled"]]) if junk else None))
    # The planted truth as a map of its own: the ceiling of what any embedding of these images can score
    data.write_csv(out / "planted.csv", ["plate", "well", "perturbation", "perturbation_type", "is_control", "experiment",
                                    "concentration"], truth_rows)
    data.write_atomic(out / "planted.npy", lambda f: np.save(f, np.array(truth_phenotypes, np.float32)))
    data.write_csv(out / "gene_groups.csv", ["perturbation", "group"], [[g, groups[g]] for g in sorted(effects) if groups[g]])
    data.write_atomic(out / "null_genes.txt", lambda f: f.write("".join(f"{g}\n" for g in sorted(effects) if not groups[g]).encode()))
    data.write_csv(out / "compound_activity.csv", ["compound", "gene", "activity_um"],
              [[c, v["target"], v["ic50_um"]] for c, v in compounds.items()])
    print(f"wrote {len(rows)} images of {len(effects)} genes, {len(compounds)} compounds, "
          f"{len(plates)} plates to {out}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the screen")
    parser.add_argument("--size", choices=sorted(SYNTH_SIZES), default="demo",
                        help="tests: 29 genes, 122 images of 64 px; demo: 129 genes, 676 of 128 px; large: 1,214 genes, 18,216 of 256 px")
    parser.add_argument("--seed", type=int, default=0, help="the screen is a function of it")
    parser.add_argument("--replicates", type=int, default=1, help="wells per gene per experiment")
    parser.add_argument("--junk", action="store_true", help="plant bad images, unlabeled wells, inconsistent genes")
    parser.add_argument("--channels", type=int, default=6, choices=[6, 5],
                        help="6: one TIFF per site (DNA, RNA, ER, AGP, Golgi, Mito); 5: JUMP-like, DNA, ER, RNA, AGP "
                             "(with Golgi), Mito, a TIFF per channel and load_data.csv")
    synth(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
