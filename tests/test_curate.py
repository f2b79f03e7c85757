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


def test_curation_consistency_is_exact_on_the_planted_phenotypes(junk_screen, tmp_path):
    """The rule itself, given features without image noise (each well's planted phenotype, in
    evaluate.well_table order): it keeps every complex gene and drops exactly the genes without one."""
    root, truth, _ = junk_screen
    planted, rows = np.load(root / "synth" / "planted.npy"), data.read_csv(root / "synth" / "planted.csv")
    row_of = {(r["plate"], r["well"]): i for i, r in enumerate(rows)}
    _, wells = evaluate.well_table(data.CropDataset(root / "crops"))
    np.save(tmp_path / "planted.npy", planted[[row_of[w["plate"], w["well"]] for w in wells]])
    report = curate.curate(root / "crops", tmp_path / "curated", embeddings=tmp_path / "planted.npy",
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
    batch = next(data.Loader([curated], batch_size=4, augment=False))
    assert batch.shape == (4, 6, 32, 32) and batch.dtype == torch.uint8
    controls = report["control_wells_negative"]
    assert controls["kept"] == pytest.approx(0.3 * controls["before"], abs=max(3, 0.15 * controls["before"]))
