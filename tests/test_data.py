import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import data
import evaluate
from data import CropDataset, Loader, dihedral, prepare

ROOT = Path(__file__).resolve().parent.parent


def write_screen(root, layout, dtype, n_sites=6, size=64, channels=3, seed=0):
    """A small screen on disk in one of the real layouts; returns (images, metadata, {site: [C, H, W]})."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    pixels, rows = {}, []
    for i in range(n_sites):
        plate, well, site = f"P{i % 2 + 1}", f"B{i:02d}", i % 3 + 1
        high = 256 if dtype == np.uint8 else 65536
        image = rng.integers(0, high, (channels, size, size)).astype(dtype)
        pixels[plate, well, site] = image
        rows.append([plate, well, site, f"GENE{i}", "gene", "False", "E1"])
        if layout == "per-channel":  # RxRx / JUMP style: one file per channel
            for c in range(channels):
                path = images / plate / f"{well}_s{site}_w{c + 1}.tif"
                path.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(path, image[c])
        else:
            path = images / plate / f"{well}_s{site}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            stored = image if layout == "channels-first" else np.moveaxis(image, 0, -1)
            tifffile.imwrite(path, stored, photometric="minisblack")
    metadata = root / "metadata.csv"
    data.write_csv(metadata, ["plate", "well", "site", "perturbation", "perturbation_type", "is_control",
                              "experiment"], rows)
    return images, metadata, pixels


def read_back(out):
    """Every crop of a prepared dataset, with its index row."""
    dataset = CropDataset(out)
    with open(out / "index.csv") as f:
        rows = list(csv.DictReader(f))
    return dataset.crops(range(len(dataset))), rows


@pytest.mark.parametrize("layout", ["channels-first", "channels-last", "per-channel"])
@pytest.mark.parametrize("dtype,convert", [(np.uint8, "identity"), (np.uint16, "shift")])
def test_prepare_round_trips_pixels_exactly(tmp_path, layout, dtype, convert):
    images, metadata, pixels = write_screen(tmp_path, layout, dtype)
    pattern = "{plate}/{well}_s{site}_w{channel}.tif" if layout == "per-channel" else "{plate}/{well}_s{site}.tif"
    out = prepare(images, metadata, tmp_path / "out", pattern=pattern, crop_size=32, shard_size=8,
                  convert=convert, workers=2, channels=["1", "2", "3"] if layout == "per-channel" else None)
    crops, rows = read_back(out)
    meta = json.loads((out / "meta.json").read_text())
    assert crops.shape == (6 * 4, 3, 32, 32) and meta["crops"] == 24 and meta["shards"] == 3
    for crop, row in zip(crops, rows):
        image = pixels[row["plate"], row["well"], int(row["site"])]
        expected = image if dtype == np.uint8 else (image >> 8).astype(np.uint8)
        y, x = int(row["tile_y"]) * 32, int(row["tile_x"]) * 32
        np.testing.assert_array_equal(crop, expected[:, y:y + 32, x:x + 32])
        assert row["perturbation"] == f"GENE{int(row['well'][1:])}"
    assert len({(r["shard"], r["offset"]) for r in rows}) == 24
    assert not list(out.glob("*.tmp"))


def test_percentile_conversion_is_per_image_per_channel(tmp_path):
    image = np.zeros((2, 64, 64), np.uint16)
    image[0] = np.arange(64 * 64).reshape(64, 64)        # a ramp: clipped at the percentiles
    image[1] = 1000                                       # a constant channel
    converted = data.to_uint8(image, "percentile", (1, 99))
    low, high = np.percentile(image[0], [1, 99])
    expected = np.clip(np.rint((image[0] - low) / (high - low) * 255), 0, 255)
    np.testing.assert_array_equal(converted[0], expected)
    assert converted[0].min() == 0 and converted[0].max() == 255 and (converted[1] == 0).all()


def bad_inputs(images):
    """Each bad input, made by breaking one file of a good screen: (file, how to break it, the error)."""
    victim = images / "P2" / "B01_s2.tif"  # not the first image, which sets the screen's shape
    replace = lambda array: lambda: tifffile.imwrite(victim, array, photometric="minisblack")
    return {
        "truncated": (victim, lambda: victim.write_bytes(victim.read_bytes()[:300]), "unreadable TIFF"),
        "channels": (victim, replace(np.zeros((4, 64, 64), np.uint8)), "expected 3 channels"),
        "tiling": (victim, replace(np.zeros((3, 60, 60), np.uint8)), "does not tile"),
        "size": (victim, replace(np.zeros((3, 96, 96), np.uint8)), "differs from the screen's 64x64"),
        "nan": (victim, replace(np.full((3, 64, 64), np.nan, np.float32)), "NaN or inf"),
    }


@pytest.mark.parametrize("problem", ["truncated", "channels", "tiling", "size", "nan"])
def test_bad_image_is_a_one_line_error_naming_the_file_or_a_counted_skip(tmp_path, problem):
    images, metadata, _ = write_screen(tmp_path, "channels-first", np.uint8)
    victim, damage, message = bad_inputs(images)[problem]
    damage()
    with pytest.raises(SystemExit) as error:
        prepare(images, metadata, tmp_path / "out", crop_size=32, shard_size=4, workers=1, convert="auto")
    assert str(error.value).startswith(f"{victim}: ") and message in str(error.value)
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert not (tmp_path / "out" / "meta.json").exists()  # nothing there reads as a finished dataset
    out = prepare(images, metadata, tmp_path / "skip", crop_size=32, shard_size=4, workers=1, on_error="skip")
    crops, rows = read_back(out)
    assert json.loads((out / "meta.json").read_text())["skipped"] == 1 and len(crops) == 5 * 4
    skipped = list(csv.DictReader(open(out / "skipped.csv")))
    assert skipped[0]["file"] == str(victim) and message in skipped[0]["problem"]
    assert "B01" not in {r["well"] for r in rows}


def test_image_without_metadata_row_is_an_error(tmp_path):
    images, metadata, pixels = write_screen(tmp_path, "channels-first", np.uint8)
    stray = images / "P1" / "Z99_s1.tif"
    tifffile.imwrite(stray, pixels["P1", "B00", 1], photometric="minisblack")
    with pytest.raises(SystemExit, match=f"{stray}: no metadata row for plate P1 well Z99 site 1"):
        prepare(images, metadata, tmp_path / "out", crop_size=32)


def test_resume_after_a_kill_finishes_without_duplicates_or_gaps(tmp_path):
    images, metadata, pixels = write_screen(tmp_path, "channels-first", np.uint16, n_sites=60, size=128)
    args = ["--images", str(images), "--metadata", str(metadata), "--crop_size", "32", "--shard_size", "16",
            "--workers", "1"]
    command = [sys.executable, str(ROOT / "data.py"), "prepare"] + args
    out = tmp_path / "killed"
    run = subprocess.Popen(command + ["--out", str(out)], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(out.glob("shard_*.json"))) < 5 and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)  # the whole pool, mid-run
    run.wait()
    finished = len(list(out.glob("shard_*.json")))
    assert 5 <= finished < 60 and not (out / "meta.json").exists()
    subprocess.run(command + ["--out", str(out)], check=True, capture_output=True)
    subprocess.run(command + ["--out", str(tmp_path / "whole")], check=True, capture_output=True)
    resumed, resumed_rows = read_back(out)
    whole, whole_rows = read_back(tmp_path / "whole")
    assert len(resumed) == 60 * 16
    np.testing.assert_array_equal(resumed, whole)
    assert resumed_rows == whole_rows


def test_a_different_prepare_into_the_same_folder_is_refused(tmp_path):
    images, metadata, _ = write_screen(tmp_path, "channels-first", np.uint8)
    prepare(images, metadata, tmp_path / "out", crop_size=32)
    with pytest.raises(SystemExit, match="holds a prepare run with other inputs or settings"):
        prepare(images, metadata, tmp_path / "out", crop_size=16)


# ---- loader -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    images, metadata, _ = write_screen(root, "channels-first", np.uint8, n_sites=25, size=32)
    six = root / "six"
    images6, metadata6, _ = write_screen(six, "channels-first", np.uint8, n_sites=10, size=32, channels=6)
    return (prepare(images, metadata, root / "three", crop_size=16, shard_size=12, workers=1),
            prepare(images6, metadata6, six / "out", crop_size=16, workers=1))


def crop_ids(dataset, batch):
    """Which crops of the dataset a batch holds (crops are random, so each is unique)."""
    every = torch.from_numpy(dataset.crops(range(len(dataset)))).flatten(1)
    return [int((every == crop.flatten()).all(1).nonzero()) for crop in batch]


def test_two_ranks_read_disjoint_slices_that_cover_the_epoch(prepared):
    dataset = CropDataset(prepared[0])  # 100 crops: 2 ranks x 5 batches x 10
    seen = []
    for rank in (0, 1):
        loader = Loader([dataset], batch_size=10, rank=rank, world_size=2, seed=3, augment=False)
        seen.append([i for _ in range(5) for i in crop_ids(dataset, next(loader))])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(100))
    next_epoch = Loader([dataset], batch_size=10, rank=0, world_size=2, seed=3, augment=False, start_step=5)
    assert sorted(crop_ids(dataset, next(next_epoch))) != sorted(seen[0][:10])  # a new permutation


def test_loader_resumes_the_same_sample_order(prepared):
    datasets = [CropDataset(prepared[0]), CropDataset(prepared[1])]
    whole = Loader(datasets, batch_size=4, weights=[1, 1], seed=7)
    batches = [next(whole) for _ in range(12)]
    resumed = Loader(datasets, batch_size=4, weights=[1, 1], seed=7, start_step=8)
    for expected in batches[8:]:
        assert torch.equal(next(resumed), expected)


def test_one_process_accumulating_sees_what_two_processes_see(prepared):
    datasets = [CropDataset(prepared[0]), CropDataset(prepared[1])]
    one = Loader(datasets, batch_size=4, accum_steps=2, seed=5)
    ranks = [Loader(datasets, batch_size=4, world_size=2, rank=r, seed=5) for r in (0, 1)]
    for _ in range(6):  # 6 optimizer steps, augmentation included
        assert torch.equal(next(one), next(ranks[0]))
        assert torch.equal(next(one), next(ranks[1]))


def test_mixed_channel_counts_give_homogeneous_batches_by_weight(prepared):
    datasets = [CropDataset(prepared[0]), CropDataset(prepared[1])]
    loader = Loader(datasets, batch_size=4, weights=[3, 1], seed=0)
    channels = [next(loader).shape[1] for _ in range(400)]
    assert set(channels) == {3, 6}
    assert 0.68 < channels.count(3) / 400 < 0.82  # weight 3:1 -> 75%


def test_augmentation_is_a_symmetry_of_the_square():
    crop = torch.arange(2 * 5 * 5, dtype=torch.uint8).reshape(1, 2, 5, 5)  # no symmetry of its own
    reference = [np.rot90(crop[0].numpy(), r, axes=(1, 2)) for r in range(4)]
    reference += [np.flip(m, axis=2) for m in reference]  # the 4 reflections
    outputs = [dihedral(crop, torch.tensor([k]))[0].numpy() for k in range(8)]
    for out in outputs:
        assert sum(np.array_equal(out, ref) for ref in reference) == 1
    assert len({out.tobytes() for out in outputs}) == 8  # all 8 elements, each once


# ---- the synthetic screen -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    return data.synth(tmp_path_factory.mktemp("synth") / "screen", size="tests", seed=0)


def test_synth_is_deterministic(screen, tmp_path):
    again = data.synth(tmp_path / "again", size="tests", seed=0)
    assert (again / "metadata.csv").read_bytes() == (screen / "metadata.csv").read_bytes()
    assert (again / "truth.json").read_bytes() == (screen / "truth.json").read_bytes()
    for path in sorted((screen / "images").rglob("*.tif"))[:10]:
        assert (again / path.relative_to(screen)).read_bytes() == path.read_bytes()


def test_synth_plants_real_complexes_with_real_symbols(screen):
    truth = json.loads((screen / "truth.json").read_text())
    corum = data.corum_complexes(data.annotations_dir())
    complexes = {g["complex"] for g in truth["genes"].values() if g["complex"]}
    assert len(complexes) == data.SYNTH_SIZES["tests"]["complexes"]
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


# ---- curation -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def junk_screen(tmp_path_factory):
    """The tests screen with 8 replicates per experiment and planted junk, prepared and curated."""
    root = tmp_path_factory.mktemp("junk")
    data.synth(root / "synth", size="tests", seed=0, replicates=8, junk=True)
    data.prepare(root / "synth" / "images", root / "synth" / "metadata.csv", root / "crops", crop_size=32, workers=2)
    report = data.curate(root / "crops", root / "curated", min_experiments=2, min_wells=4)
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
    report = data.curate(root / "crops", tmp_path / "curated", embeddings=tmp_path / "planted.npy",
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
    assert data.cauchy_combination([0.3]) == pytest.approx(0.3, abs=1e-12)  # one p-value stays itself
    assert data.cauchy_combination([0.02, 0.02, 0.02]) == pytest.approx(0.02, abs=1e-12)  # equal ones too
    p = [0.01, 0.2, 0.5, 0.9]
    t = np.mean(np.tan((0.5 - np.array(p)) * np.pi))
    assert data.cauchy_combination(p) == pytest.approx(0.5 - np.arctan(t) / np.pi, abs=1e-15)
    assert data.cauchy_combination([1e-10, 0.9]) < 1e-9  # one strong signal carries the combination


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
