"""curate.py, the paper's step 1: each rule finds exactly what the junk screen plants."""
import json

import numpy as np
import pytest
import torch

import curate
import data
import evaluate
import synth


@pytest.fixture(scope="module")
def junk_screen(tmp_path_factory):
    """The tests screen with 8 replicates per experiment and planted junk, prepared and curated."""
    root = tmp_path_factory.mktemp("junk")
    synth.synth(root / "synth", size="tests", seed=0, replicates=8, junk=True)
    data.prepare(root / "synth" / "images", root / "synth" / "metadata.csv", root / "crops", crop_size=32, workers=2)
    report = curate.curate(root / "crops", root / "curated", min_experiments=2, min_wells=4)
    return root, json.loads((root / "synth" / "truth.json").read_text()), report


def test_curation_quality_and_label_filters_drop_exactly_the_planted_junk(junk_screen):
    root, truth, report = junk_screen
    for kind in ("blurred", "empty", "saturated"):
        assert report["images"][kind] == sorted(truth["junk"][kind]), kind
    assert report["wells_unlabeled"] == sorted(f"{p}/{w}" for p, w in truth["junk"]["unlabeled"])
    kept = data.read_csv(root / "curated" / "index.csv")
    bad = {path for kind in ("blurred", "empty", "saturated") for path in truth["junk"][kind]}
    assert kept and not {r["source"] for r in kept} & bad
    assert all(r["perturbation"] for r in kept)


def without_phenotype(truth):
    """What the consistency rule must drop among the genes: the planted inconsistent ones and the
    no-effect ones (their replicates agree on nothing)."""
    return set(truth["junk"]["inconsistent"]) | {g for g, v in truth["genes"].items() if not v["complex"]}


def planted_embeddings(root, tmp_path):
    """Each well's planted phenotype (no image, no noise) as its embedding, in evaluate.well_table order."""
    planted, rows = np.load(root / "synth" / "planted.npy"), data.read_csv(root / "synth" / "planted.csv")
    row_of = {(r["plate"], r["well"]): i for i, r in enumerate(rows)}
    _, wells = evaluate.well_table(data.CropDataset(root / "crops"))
    np.save(tmp_path / "planted.npy", planted[[row_of[w["plate"], w["well"]] for w in wells]])
    return tmp_path / "planted.npy"


def test_curation_consistency_is_exact_on_the_planted_phenotypes(junk_screen, tmp_path):
    """The rule itself, given features without image noise (each well's planted phenotype, in
    evaluate.well_table order): it keeps every complex gene and drops exactly the genes without one."""
    root, truth, _ = junk_screen
    report = curate.curate(root / "crops", tmp_path / "curated", embeddings=planted_embeddings(root, tmp_path),
                           min_experiments=2, min_wells=4)
    dropped_genes = set(report["consistency"]["dropped"]) & set(truth["genes"])
    assert dropped_genes == without_phenotype(truth)


def test_curation_consistency_on_handcrafted_features(junk_screen):
    """The default features (hand-crafted, from the images): calibrated (nothing without a phenotype
    gets through) and powered (most complex genes kept; with 4 replicates instead of 8, 11 of 19)."""
    _, truth, report = junk_screen
    dropped = set(report["consistency"]["dropped"])
    assert without_phenotype(truth) <= dropped
    complex_genes = set(truth["genes"]) - without_phenotype(truth)
    assert len(complex_genes - dropped) >= 0.75 * len(complex_genes)


def test_cauchy_combination_closed_form():
    assert curate.cauchy_combination([0.3]) == pytest.approx(0.3, abs=1e-12)  # one p-value stays itself
    assert curate.cauchy_combination([0.02, 0.02, 0.02]) == pytest.approx(0.02, abs=1e-12)  # equal ones too
    p = [0.01, 0.2, 0.5, 0.9]
    t = np.mean(np.tan((0.5 - np.array(p)) * np.pi))
    assert curate.cauchy_combination(p) == pytest.approx(0.5 - np.arctan(t) / np.pi, abs=1e-15)
    assert curate.cauchy_combination([1e-10, 0.9]) < 1e-9  # one strong signal carries the combination


def test_curated_dataset_trains_like_any_other(junk_screen):
    root, _, report = junk_screen
    curated = data.CropDataset(root / "curated")
    assert len(curated) == report["crops_kept"] and curated.meta["crop_size"] == 32
    source = data.CropDataset(root / "crops")
    rows = data.read_csv(root / "curated" / "index.csv")
    first = int(rows[0]["shard"]), int(rows[0]["offset"])
    np.testing.assert_array_equal(curated.crops([0])[0], np.load(source.root / f"shard_{first[0]:05d}.npy")[first[1]])
    batch, _ = next(data.Loader([curated], batch_size=4, augment=False))
    assert batch.shape == (4, 6, 32, 32) and batch.dtype == torch.uint8
    controls = report["control_wells_negative"]
    assert controls["kept"] == pytest.approx(0.3 * controls["before"], abs=max(3, 0.15 * controls["before"]))


def test_wells_with_no_label_or_several_are_unlabeled():
    labels = np.array(["TP53", "", "TP53;MDM2", "TP53|MDM2", "TP53,MDM2", "CPD-001", "non-targeting"])
    assert curate.unlabeled(labels).tolist() == [False, True, True, True, True, False, False]


def test_too_rare_counts_experiments_and_wells_and_exempts_controls():
    label = np.array(["A", "A", "A", "B", "B", "B", "B", "ctrl"])
    experiment = np.array(["E1", "E2", "E3", "E1", "E1", "E2", "E2", "E1"])
    well = np.array(["w1", "w2", "w3", "w4", "w5", "w6", "w6", "w7"])  # B: 3 distinct wells in 2 experiments
    assert curate.too_rare(label, experiment, well, {"ctrl"}, min_experiments=3, min_wells=3) == ["B"]
    assert curate.too_rare(label, experiment, well, {"ctrl"}, min_experiments=2, min_wells=4) == ["A", "B"]
    assert curate.too_rare(label, experiment, well, {"ctrl"}, min_experiments=2, min_wells=3) == []


def test_rare_perturbations_go_and_positive_controls_are_undersampled(junk_screen, tmp_path):
    """With min_experiments above the screen's 2 experiments every perturbation is too rare but the
    controls: the negative ones, and three genes named positive controls, each undersampled to its
    fraction of wells."""
    root, truth, _ = junk_screen
    positive = sorted(g for g, v in truth["genes"].items() if v["complex"] and g not in truth["junk"]["inconsistent"])[:3]
    report = curate.curate(root / "crops", tmp_path / "curated", embeddings=planted_embeddings(root, tmp_path),
                           min_experiments=3, min_wells=4, positive_controls=positive, positive_fraction=0.25)
    labels = {r["perturbation"] for r in data.read_csv(root / "crops" / "index.csv")} - {""}
    assert set(report["perturbations_too_rare"]) == labels - {"non-targeting", *positive}
    kept = data.read_csv(tmp_path / "curated" / "index.csv")
    assert {r["perturbation"] for r in kept} == {"non-targeting", *positive}
    for kind, fraction in (("positive", 0.25), ("negative", 0.3)):
        wells = report[f"control_wells_{kind}"]
        spread = 3 * (wells["before"] * fraction * (1 - fraction)) ** 0.5  # 3 binomial standard deviations
        assert abs(wells["kept"] - fraction * wells["before"]) <= spread and 0 < wells["kept"] < wells["before"], (kind, wells)
