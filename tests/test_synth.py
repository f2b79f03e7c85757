"""The built-in synthetic screen: deterministic, real complexes, planted biology visible in the images."""
import csv
import json

import numpy as np
import pytest
import tifffile

import data
import evaluate
import synth


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    return synth.synth(tmp_path_factory.mktemp("synth") / "screen", size="tests", seed=0)


def test_synth_is_deterministic(screen, tmp_path):
    again = synth.synth(tmp_path / "again", size="tests", seed=0)
    assert (again / "metadata.csv").read_bytes() == (screen / "metadata.csv").read_bytes()
    assert (again / "truth.json").read_bytes() == (screen / "truth.json").read_bytes()
    for path in sorted((screen / "images").rglob("*.tif"))[:10]:
        assert (again / path.relative_to(screen)).read_bytes() == path.read_bytes()


def test_synth_plants_real_complexes_with_real_symbols(screen):
    truth = json.loads((screen / "truth.json").read_text())
    corum = evaluate.corum_complexes(evaluate.annotation_tables())
    complexes = {g["complex"] for g in truth["genes"].values() if g["complex"]}
    assert len(complexes) == synth.SYNTH_SIZES["tests"]["complexes"]
    for name in complexes:
        members = [g for g, t in truth["genes"].items() if t["complex"] == name]
        assert set(members) == set(corum[name])
    rows = list(csv.DictReader(open(screen / "metadata.csv")))
    controls = [r for r in rows if r["perturbation_type"] == "control"]
    assert controls and all(r["is_control"] == "True" for r in controls)
    assert {r["experiment"] for r in rows} == {"E1", "E2"}


def well_statistics(image):
    """Simple per-channel statistics of one raw image: mean, spread, and edge strength, each
    relative to the channel's mean so a plate's gain cancels."""
    x = image.astype(np.float64)
    mean = x.mean(axis=(1, 2))
    edges = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))
    return np.concatenate([x.std(axis=(1, 2)) / mean, edges / mean, np.log(mean)])


def test_planted_complexes_are_visible_in_simple_well_statistics(screen):
    truth = json.loads((screen / "truth.json").read_text())
    rows = list(csv.DictReader(open(screen / "metadata.csv")))
    stats = {}
    for r in rows:
        image = tifffile.imread(screen / "images" / r["plate"] / f"{r['well']}_s{r['site']}.tif")
        stats.setdefault(r["plate"], []).append((r["perturbation"], well_statistics(image)))
    profiles = {}
    for plate, wells in stats.items():  # center-scale each plate on its controls
        controls = np.array([s for p, s in wells if p == "non-targeting"])
        for p, s in wells:
            if p in truth["genes"]:
                profiles.setdefault(p, []).append((s - controls.mean(0)) / controls.std(0))
    genes = sorted(g for g in profiles if truth["genes"][g]["complex"])
    x = np.array([np.mean(profiles[g], axis=0) for g in genes])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cosine = x @ x.T
    same = np.array([[truth["genes"][a]["complex"] == truth["genes"][b]["complex"] for b in genes] for a in genes])
    off_diagonal = ~np.eye(len(genes), dtype=bool)
    within, between = cosine[same & off_diagonal].mean(), cosine[~same].mean()
    print(f"cosine of gene profiles: within complexes {within:.2f}, between {between:.2f}")
    assert within > between + 0.3




def test_planted_map_is_the_rendered_phenotype(tmp_path):
    """planted.npy holds, per well, the phenotype synth rendered: the planted effect (a gene's; a
    compound's target's on its Hill curve; zero for controls and null genes) plus that well's own
    variation, N(0, 0.15) per axis."""
    synth.synth(tmp_path, size="tests", seed=3)
    planted, wells = np.load(tmp_path / "planted.npy"), data.read_csv(tmp_path / "planted.csv")
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert planted.shape == (len(wells), len(synth.FEATURES))
    effect = lambda gene: np.array(truth["genes"][gene]["effect"])
    expected = []
    for well in wells:
        p, kind = well["perturbation"], well["perturbation_type"]
        if kind == "compound":
            c, conc = truth["compounds"][p], float(well["concentration"])
            expected.append(effect(c["target"]) * conc / (conc + c["ic50_um"]))
        else:
            expected.append(effect(p) if kind == "gene" else np.zeros(len(synth.FEATURES)))
    variation = planted - np.array(expected)
    assert abs(variation.mean()) < 0.02 and 0.13 < variation.std() < 0.17
    groups = data.read_csv(tmp_path / "gene_groups.csv")
    assert groups and all(truth["genes"][r["perturbation"]]["complex"] == r["group"] for r in groups)


def test_the_jump_like_screen_is_the_same_screen_in_five_stains_that_loaddata_reads(screen, tmp_path):
    """--channels 5: the same wells and pixels, Golgi added into AGP, a TIFF per stain under the imager's
    names, and a LoadData CSV that data.py's JUMP reader prepares into crops named DNA, ER, RNA, AGP, Mito."""
    jump = synth.synth(tmp_path / "jump", size="tests", seed=0, channels=5)
    assert (jump / "metadata.csv").read_bytes() == (screen / "metadata.csv").read_bytes()
    sites = list(csv.DictReader(open(jump / "load_data.csv")))
    assert len(sites) == len(list((screen / "images").rglob("*.tif")))
    for site in sites[:5]:
        six = tifffile.imread(screen / "images" / site["Metadata_Plate"] / f"{site['Metadata_Well']}_s{site['Metadata_Site']}.tif")
        stain = lambda name: tifffile.imread(jump / site[f"PathName_Orig{name}"] / site[f"FileName_Orig{name}"])
        for name, row in (("DNA", 0), ("RNA", 1), ("ER", 2), ("Mito", 5)):
            np.testing.assert_array_equal(stain(name), six[row])
        np.testing.assert_array_equal(stain("AGP"), np.clip(six[3].astype(int) + six[4], 0, 65535))
        assert site["FileName_OrigDNA"].startswith("r") and site["FileName_OrigDNA"].endswith("-ch1sk1fk1fl1.tiff")
    crops = data.CropDataset(data.prepare(None, jump / "metadata.csv", tmp_path / "crops", crop_size=32,
                                          load_data=jump / "load_data.csv", workers=1))
    assert crops.meta["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"] and crops.channels == 5
    assert len(crops) == 4 * len(sites)
