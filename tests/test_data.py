import csv
import json
import os
import re
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


def test_percentiles_from_a_histogram_are_numpys_to_the_last_bit():
    """The integer path reads percentiles off a histogram (9x faster than a sort): the same floats as
    np.percentile for any size, spread and percentile, and a conversion equal to the per-pixel float
    formula."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        dtype = rng.choice([np.uint8, np.uint16])
        x = rng.integers(0, rng.choice([2, 7, 256, np.iinfo(dtype).max + 1]), int(rng.integers(1, 400))).astype(dtype)
        q = [float(rng.choice([0, 0.1, 1, 50, 99.9, 100])), float(rng.uniform(0, 100))]
        cumulative = np.cumsum(np.bincount(x, minlength=np.iinfo(dtype).max + 1))
        np.testing.assert_array_equal(data.histogram_percentiles(cumulative, q), np.percentile(x, q))
    image = rng.normal(3000, 800, (3, 64, 64)).clip(0, 65535).astype(np.uint16)
    low, high = np.percentile(image.reshape(3, -1), [0.1, 99.9], axis=1)[:, :, None, None]
    expected = np.clip(np.rint((image - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(data.to_uint8(image, "percentile", (0.1, 99.9)), expected)


def test_float_images_are_converted_by_percentile(tmp_path):
    """Float pixels (a screen exported as float32 TIFFs): --convert auto stretches each channel between
    its percentiles, as for 16-bit images."""
    images, metadata, pixels = write_screen(tmp_path, "channels-first", np.uint16)
    for path in images.rglob("*.tif"):
        tifffile.imwrite(path, tifffile.imread(path).astype(np.float32) / 65535, photometric="minisblack")
    crops, rows = read_back(prepare(images, metadata, tmp_path / "out", crop_size=32, workers=1))
    for crop, row in zip(crops, rows):
        image = pixels[row["plate"], row["well"], int(row["site"])].astype(np.float32) / 65535
        expected = data.to_uint8(image, "percentile", (0.1, 99.9))
        y, x = int(row["tile_y"]) * 32, int(row["tile_x"]) * 32
        np.testing.assert_array_equal(crop, expected[:, y:y + 32, x:x + 32])
    assert crops.max() == 255 and crops.min() == 0


def bad_inputs(images):
    """Each bad input, made by breaking one file of a good screen: (file, how to break it, the error)."""
    victim = images / "P2" / "B01_s2.tif"  # not the first image, which sets the screen's shape
    replace = lambda array: lambda: tifffile.imwrite(victim, array, photometric="minisblack")
    return {
        "truncated": (victim, lambda: victim.write_bytes(victim.read_bytes()[:300]), "unreadable TIFF"),
        "channels": (victim, replace(np.zeros((4, 64, 64), np.uint8)), "expected 3 channels"),
        "tiling": (victim, replace(np.zeros((3, 60, 60), np.uint8)), "size 60x60 differs from the screen's 64x64"),
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


def test_prepare_after_torch_used_its_threads_does_not_hang(tmp_path):
    """A process that ran a multi-threaded torch op (any test before, bench.py, a notebook) and then
    prepares: its forked workers entered torch's OpenMP pool in to_uint8 and hung forever (seen: the
    suite stopped in CI-like runs without OMP_NUM_THREADS). Now each worker runs one thread."""
    images, metadata, _ = write_screen(tmp_path, "channels-first", np.uint16)
    code = ("import sys, torch, data; torch.set_num_threads(2); x = torch.randn(1500, 1500); (x @ x).sum(); "
            "torch.bincount(torch.randint(0, 9, (5_000_000,))); "
            "data.prepare(sys.argv[1], sys.argv[2], sys.argv[3], crop_size=32, workers=2)")
    run = subprocess.run([sys.executable, "-c", code, str(images), str(metadata), str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and (tmp_path / "out" / "meta.json").exists(), run.stderr[-2000:]


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
        seen.append([i for _ in range(5) for i in crop_ids(dataset, next(loader)[0])])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(100))
    next_epoch = Loader([dataset], batch_size=10, rank=0, world_size=2, seed=3, augment=False, start_step=5)
    assert sorted(crop_ids(dataset, next(next_epoch)[0])) != sorted(seen[0][:10])  # a new permutation


def test_loader_resumes_the_same_sample_order(prepared):
    datasets = [CropDataset(prepared[0]), CropDataset(prepared[1])]
    whole = Loader(datasets, batch_size=4, weights=[1, 1], seed=7)
    batches = [next(whole) for _ in range(12)]
    resumed = Loader(datasets, batch_size=4, weights=[1, 1], seed=7, start_step=8)
    for expected, d in batches[8:]:
        x, same_d = next(resumed)
        assert torch.equal(x, expected) and same_d == d


def test_one_process_accumulating_sees_what_two_processes_see(prepared):
    datasets = [CropDataset(prepared[0]), CropDataset(prepared[1])]
    one = Loader(datasets, batch_size=4, accum_steps=2, seed=5)
    ranks = [Loader(datasets, batch_size=4, world_size=2, rank=r, seed=5) for r in (0, 1)]
    for _ in range(6):  # 6 optimizer steps, augmentation included
        assert torch.equal(next(one)[0], next(ranks[0])[0])
        assert torch.equal(next(one)[0], next(ranks[1])[0])


def test_mixed_channel_counts_give_homogeneous_batches_by_weight(prepared):
    datasets = [CropDataset(prepared[0]), CropDataset(prepared[1])]
    loader = Loader(datasets, batch_size=4, weights=[3, 1], seed=0)
    batches = [next(loader) for _ in range(400)]
    channels = [x.shape[1] for x, _ in batches]
    assert set(channels) == {3, 6}
    assert all(x.shape[1] == datasets[d].channels for x, d in batches)  # each batch names its dataset
    assert 0.68 < channels.count(3) / 400 < 0.82  # weight 3:1 -> 75%


def test_a_dataset_must_fill_one_global_batch_exactly_or_more(prepared):
    dataset = CropDataset(prepared[0])  # 100 crops
    assert next(Loader([dataset], batch_size=50, world_size=2, augment=False))[0].shape[0] == 50
    with pytest.raises(SystemExit, match="100 crops cannot fill a global batch of 102"):
        Loader([dataset], batch_size=51, world_size=2)


def test_the_loader_augments_each_crop_by_its_own_symmetry(prepared):
    """With augment on (train.py's default), each crop comes out as one of the 8 symmetries of the crop
    that the same loader without augmentation gives, drawn per crop: not all the identity."""
    dataset = CropDataset(prepared[0])
    augmented = Loader([dataset], batch_size=10, seed=3, augment=True)
    plain = Loader([dataset], batch_size=10, seed=3, augment=False)
    elements = []
    for _ in range(3):
        a, p = next(augmented)[0], next(plain)[0]
        for crop, source in zip(a, p):
            matches = [k for k in range(8) if torch.equal(crop, dihedral(source[None], torch.tensor([k]))[0])]
            assert matches, "an augmented crop that is no symmetry of its source"
            elements.append(matches[0])
    assert len(set(elements)) >= 5  # 30 crops, 8 elements drawn uniformly


def test_augmentation_is_a_symmetry_of_the_square():
    crop = torch.arange(2 * 5 * 5, dtype=torch.uint8).reshape(1, 2, 5, 5)  # no symmetry of its own
    reference = [np.rot90(crop[0].numpy(), r, axes=(1, 2)) for r in range(4)]
    reference += [np.flip(m, axis=2) for m in reference]  # the 4 reflections
    outputs = [dihedral(crop, torch.tensor([k]))[0].numpy() for k in range(8)]
    for out in outputs:
        assert sum(np.array_equal(out, ref) for ref in reference) == 1
    assert len({out.tobytes() for out in outputs}) == 8  # all 8 elements, each once


# ---- the formats screens ship in (fixtures written by imagecodecs and tifffile from the synthetic screen) ----

imagecodecs = pytest.importorskip("imagecodecs", reason="imagecodecs reads PNG, JPEG 2000 and compressed TIFF (tests/requirements.txt)")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The tests screen (uint16, 6 channels, 64 px, a TIFF per site) and its crops prepared from those TIFFs."""
    import synth
    root = tmp_path_factory.mktemp("formats")
    screen = synth.synth(root / "screen", size="tests", seed=0)
    reference = {convert: read_back(prepare(screen / "images", screen / "metadata.csv", root / f"tiff_{convert}",
                                            crop_size=32, convert=convert, workers=2)) for convert in ("auto", "shift")}
    return screen, data.read_csv(screen / "metadata.csv"), reference


def site_pixels(screen, row):
    return tifffile.imread(screen / "images" / row["plate"] / f"{row['well']}_s{row['site']}.tif")


def assert_same_crops(out, reference):
    crops, rows = read_back(out)
    np.testing.assert_array_equal(crops, reference[0])
    assert [(r["plate"], r["well"], r["tile_y"], r["tile_x"]) for r in rows] == \
           [(r["plate"], r["well"], r["tile_y"], r["tile_x"]) for r in reference[1]]


@pytest.mark.parametrize("bits", [16, 8])
def test_rxrx1_pngs_one_per_channel_prepare_like_the_tiffs(synthetic, tmp_path, bits):
    """RxRx1's layout, {experiment}/Plate{plate}/{well}_s{site}_w{channel}.png with plates numbered per
    experiment, recognized without --pattern; 16-bit PNGs give the TIFFs' crops, 8-bit ones the crops
    of the TIFFs shifted to 8 bits."""
    screen, rows, reference = synthetic
    rxrx = []
    for row in rows:
        plate = row["plate"].split("P")[1]  # E1P2 -> experiment E1, plate 2
        pixels = site_pixels(screen, row)
        for c in range(6):
            path = tmp_path / "images" / row["experiment"] / f"Plate{plate}" / f"{row['well']}_s{row['site']}_w{c + 1}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(imagecodecs.png_encode(pixels[c] if bits == 16 else (pixels[c] >> 8).astype(np.uint8)))
        rxrx.append(dict(row, plate=plate))
    data.write_csv(tmp_path / "metadata.csv", list(rxrx[0]), [list(r.values()) for r in rxrx])
    out = prepare(tmp_path / "images", tmp_path / "metadata.csv", tmp_path / "out", crop_size=32, workers=2,
                  channel_names=["DNA", "RNA", "ER", "AGP", "Golgi", "Mito"])
    crops, _ = read_back(out)
    np.testing.assert_array_equal(crops, reference["auto" if bits == 16 else "shift"][0])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["layout"] == "{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png"
    assert meta["channels"] == ["DNA", "RNA", "ER", "AGP", "Golgi", "Mito"]


def test_a_jump_loaddata_csv_with_compressed_tiffs_prepares_like_the_tiffs(synthetic, tmp_path):
    """JUMP-CP's LoadData CSV: a row per site, FileName_Orig<NAME> / PathName_Orig<NAME> per channel
    (paths absolute or relative to the CSV), 16-bit TIFFs compressed with deflate, LZW or zstd; the
    channel names and their order come from the CSV; the labels join from --metadata."""
    screen, rows, reference = synthetic
    names = ["DNA", "RNA", "ER", "AGP", "Golgi", "Mito"]
    compressions = ["deflate", "lzw", "zstd"]
    table = []
    for i, row in enumerate(rows):
        folder = tmp_path / "jump" / "images" / row["plate"]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = site_pixels(screen, row)
        record = dict(Metadata_Plate=row["plate"], Metadata_Well=row["well"], Metadata_Site=row["site"])
        for c, name in enumerate(names):
            file = f"r{row['well']}f{int(row['site']):02d}-ch{c + 1}.tiff"
            tifffile.imwrite(folder / file, pixels[c], compression=compressions[(i + c) % 3])
            record[f"FileName_Orig{name}"] = file
            record[f"PathName_Orig{name}"] = str(folder) if i % 2 else f"images/{row['plate']}"
        table.append(record)
    data.write_csv(tmp_path / "jump" / "load_data.csv", list(table[0]), [list(r.values()) for r in table])
    out = prepare(None, screen / "metadata.csv", tmp_path / "out", load_data=tmp_path / "jump" / "load_data.csv",
                  crop_size=32, workers=2)
    assert_same_crops(out, reference["auto"])
    assert json.loads((out / "meta.json").read_text())["channels"] == names
    three = prepare(None, screen / "metadata.csv", tmp_path / "three", load_data=tmp_path / "jump" / "load_data.csv",
                    channels=["Mito", "DNA", "ER"], crop_size=32, workers=2)
    np.testing.assert_array_equal(read_back(three)[0], reference["auto"][0][:, [5, 0, 2]])


def test_an_rxrx3_core_parquet_of_jpeg2000_prepares_like_the_tiffs(synthetic, tmp_path):
    """RxRx3-core as its hub stores it: parquet tables written by the `datasets` library, one row per
    channel image, a `__key__` like 'gene-001/Plate1/AC44_s1_1' and an image struct {bytes, path}
    holding lossless 16-bit JPEG 2000; rows shuffled over two tables and small row groups (so sites are
    read from scattered groups). The crops equal the TIFFs'."""
    datasets = pytest.importorskip("datasets", reason="the hub's own parquet writer (tests/requirements.txt)")
    screen, rows, reference = synthetic
    records, labels = [], []
    for row in rows:
        plate = row["plate"].split("P")[1]
        pixels = site_pixels(screen, row)
        for c in range(6):
            records.append({"__key__": f"{row['experiment']}/Plate{plate}/{row['well']}_s{row['site']}_{c + 1}",
                            "jp2": {"bytes": imagecodecs.jpeg2k_encode(pixels[c], level=0), "path": None}})
        labels.append(dict(row, plate=plate))
    order = np.random.default_rng(0).permutation(len(records))
    features = datasets.Features({"__key__": datasets.Value("string"), "jp2": datasets.Image()})
    (tmp_path / "data").mkdir()
    for k, half in enumerate(np.array_split(order, 2)):
        table = datasets.Dataset.from_list([records[i] for i in half], features=features)
        table.to_parquet(tmp_path / "data" / f"train-{k:05d}-of-00002.parquet", batch_size=50)
    data.write_csv(tmp_path / "metadata.csv", list(labels[0]), [list(r.values()) for r in labels])
    out = prepare(tmp_path / "data", tmp_path / "metadata.csv", tmp_path / "out", crop_size=32, workers=2)
    crops, index = read_back(out)
    np.testing.assert_array_equal(crops, reference["auto"][0])
    assert json.loads((out / "meta.json").read_text())["layout"] == "{experiment}/Plate{plate}/{well}_s{site}_{channel}"
    assert index[0]["source"].startswith("train-0000") and ".parquet#" in index[0]["source"]


def test_a_parquet_with_label_columns_and_png_bytes_needs_no_metadata_csv(synthetic, tmp_path):
    """A table written by pandas: plate, well, site, channel, the labels, and PNG bytes in a plain binary
    column; without --metadata the table's own columns are the labels."""
    pd = pytest.importorskip("pandas")
    screen, rows, reference = synthetic
    records = [dict(row, channel=c + 1, image=imagecodecs.png_encode(site_pixels(screen, row)[c]))
               for row in rows for c in range(6)]
    pd.DataFrame(records).to_parquet(tmp_path / "screen.parquet")
    out = prepare(tmp_path / "screen.parquet", None, tmp_path / "out", crop_size=32, workers=2)
    assert_same_crops(out, reference["auto"])
    index = read_back(out)[1]
    by_site = {(r["plate"], r["well"], r["site"]): r for r in rows}
    assert all(r["perturbation"] == by_site[r["plate"], r["well"], r["site"]]["perturbation"] for r in index)
    pd.DataFrame([dict(r, image=b"not an image") if i == 7 else r for i, r in enumerate(records)]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(SystemExit, match=r"bad.parquet#\d+: unreadable image") as error:
        prepare(tmp_path / "bad.parquet", None, tmp_path / "bad", crop_size=32, workers=1)
    assert "\n" not in str(error.value)  # imagecodecs' guess lists every codec it tried, a line each


@pytest.mark.parametrize("missing,images,message", [
    ("pyarrow", "screen.parquet", "reading parquet tables needs pyarrow: pip install pyarrow"),
    ("imagecodecs", "images", "reading .png files needs imagecodecs: pip install imagecodecs"),
])
def test_a_missing_optional_reader_is_one_line_saying_what_to_install(tmp_path, missing, images, message):
    """Run as the user would, with the package made unimportable (sys.modules[name] = None)."""
    pd = pytest.importorskip("pandas")
    image = imagecodecs.png_encode(np.zeros((64, 64), np.uint8))
    pd.DataFrame([dict(plate="P1", well="B01", site=1, image=image)]).to_parquet(tmp_path / "screen.parquet")
    (tmp_path / "images" / "P1").mkdir(parents=True)
    (tmp_path / "images" / "P1" / "B01_s1_w1.png").write_bytes(image)
    data.write_csv(tmp_path / "metadata.csv", ["plate", "well", "site"], [["P1", "B01", 1]])
    run = subprocess.run([sys.executable, "-c", f"import sys; sys.modules[{missing!r}] = None; import data; data.main()",
                          "prepare", "--images", str(tmp_path / images), "--metadata", str(tmp_path / "metadata.csv"),
                          "--out", str(tmp_path / "out"), "--crop_size", "32"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr and run.stderr.strip().splitlines()[-1].endswith(message), run.stderr


def test_three_parts_run_at_once_then_merged_equal_one_run_and_a_killed_part_reruns_alone(synthetic, tmp_path):
    """`--part I/3` as three processes at once into one folder (an array job on a shared filesystem),
    part 2 killed mid-run: merge names it; rerun alone, the merge equals the single run crop for crop,
    index and meta alike, and no pixel was copied (the parts' shards are the dataset's)."""
    screen = synthetic[0]
    command = [sys.executable, str(ROOT / "data.py"), "prepare", "--images", str(screen / "images"), "--metadata",
               str(screen / "metadata.csv"), "--crop_size", "32", "--shard_size", "8", "--workers", "1"]
    single = prepare(screen / "images", screen / "metadata.csv", tmp_path / "single", crop_size=32, shard_size=8, workers=2)
    out = tmp_path / "parts"
    parts = [subprocess.Popen(command + ["--out", str(out), "--part", f"{i}/3"], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in (1, 2, 3)]
    deadline = time.time() + 60  # part 2 writes shards 20..40 of 61
    while not list(out.glob("shard_0002[5-9].json")) and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(parts[1].pid, signal.SIGKILL)
    assert [p.wait() for p in parts] == [0, -signal.SIGKILL, 0], [p.stderr.read() for p in parts]
    merge = subprocess.run(command[:3] + ["--merge", "--out", str(out)], capture_output=True, text=True)
    assert merge.returncode == 1 and "part(s) 2 of 3 not finished: run data.py prepare with --part 2/3" in merge.stderr
    assert not (out / "meta.json").exists()
    subprocess.run(command + ["--out", str(out), "--part", "2/3"], check=True, capture_output=True)
    subprocess.run(command[:3] + ["--merge", "--out", str(out)], check=True, capture_output=True)
    for name in ("index.csv", "meta.json", "skipped.csv"):
        assert (out / name).read_text() == (single / name).read_text().replace(str(tmp_path / "single"), str(out)), name
    for shard in single.glob("shard_*.npy"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert not list(out.glob("*.tmp"))
    # one part per process of a torchrun job
    ranks = tmp_path / "ranks"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", *command[1:], "--out", str(ranks),
                    "--part", "torchrun"], check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    subprocess.run(command[:3] + ["--merge", "--out", str(ranks)], check=True, capture_output=True)
    np.testing.assert_array_equal(read_back(ranks)[0], read_back(single)[0])


def test_per_channel_tiffs_are_recognized_without_a_pattern(synthetic, tmp_path):
    """B02_s1_w1.tif files in plate folders (once a ValueError): the layout is found, channels in order."""
    screen, rows, reference = synthetic
    for row in rows:
        pixels = site_pixels(screen, row)
        for c in range(6):
            path = tmp_path / "images" / row["plate"] / f"{row['well']}_s{row['site']}_w{c + 1}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, pixels[c])
    assert_same_crops(prepare(tmp_path / "images", screen / "metadata.csv", tmp_path / "out", crop_size=32, workers=2),
                      reference["auto"])


def test_an_unknown_layout_says_which_pattern_to_pass(tmp_path):
    images, metadata, _ = write_screen(tmp_path, "channels-first", np.uint8)
    for path in list(images.rglob("*.tif")):
        path.rename(path.with_name(path.name.replace("_s", "-site")))
    with pytest.raises(SystemExit, match=r"not a layout this knows; pass --pattern .*e\.g\. --pattern '\{plate\}/\{well\}-site"):
        prepare(images, metadata, tmp_path / "out", crop_size=32)


def test_sites_that_are_not_numbers_are_fine(tmp_path):
    images, metadata, _ = write_screen(tmp_path, "channels-first", np.uint8, n_sites=3)
    rows = data.read_csv(metadata)
    for row in rows:
        old = images / row["plate"] / f"{row['well']}_s{row['site']}.tif"
        row["site"] = f"x{row['site']}"
        old.rename(old.with_name(f"{row['well']}_s{row['site']}.tif"))
    data.write_csv(metadata, list(rows[0]), [list(r.values()) for r in rows])
    assert json.loads((prepare(images, metadata, tmp_path / "out", crop_size=32) / "meta.json").read_text())["crops"] == 12


# ---- faults that once lost a screen with exit code 0 ----------------------------------------------

def test_a_bad_first_image_does_not_become_the_screens_shape(tmp_path):
    """With --on-error skip, a 5-channel first image used to set the screen's shape, and the other
    images were all skipped. The shape is the majority's: only the bad one is skipped."""
    images, metadata, _ = write_screen(tmp_path, "channels-first", np.uint8)
    first = sorted(images.rglob("*.tif"))[0]
    tifffile.imwrite(first, np.zeros((5, 64, 64), np.uint8), photometric="minisblack")
    out = prepare(images, metadata, tmp_path / "out", crop_size=32, on_error="skip")
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["skipped"], meta["images"], meta["crops"]) == (1, 5, 20)


@pytest.mark.parametrize("settings,message", [
    (dict(percentiles=(99.9, 0.1)), "--percentiles 99.9,0.1: need 0 <= low < high <= 100"),
    (dict(percentiles=(0, 200)), "--percentiles 0,200: need 0 <= low < high <= 100"),
    (dict(crop_size=0), "--crop_size 0, --shard_size 1024: each must be 1 or more"),
])
def test_settings_that_would_ruin_every_crop_are_refused(tmp_path, settings, message):
    images, metadata, _ = write_screen(tmp_path, "channels-first", np.uint16)
    with pytest.raises(SystemExit, match=re.escape(message)):
        prepare(images, metadata, tmp_path / "out", **{"crop_size": 32, **settings})


def test_metadata_csvs_as_spreadsheets_save_them(tmp_path):
    """A byte-order mark and Latin-1 read as they should; empty, header-only, a missing file and an
    empty site are one line each."""
    images, metadata, _ = write_screen(tmp_path, "channels-first", np.uint8)
    text = metadata.read_text()
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("GENE1", "GÈNE1").encode())
    (tmp_path / "latin1.csv").write_bytes(text.replace("GENE1", "GÈNE1").encode("latin-1"))
    for name in ("bom", "latin1"):
        rows = data.read_csv(prepare(images, tmp_path / f"{name}.csv", tmp_path / f"out_{name}", crop_size=32) / "index.csv")
        assert "GÈNE1" in {r["perturbation"] for r in rows}
    (tmp_path / "header.csv").write_text(text.splitlines()[0] + "\n")
    (tmp_path / "empty.csv").write_text("")
    for name in ("header", "empty"):
        with pytest.raises(SystemExit, match=f"{name}.csv: no rows"):
            prepare(images, tmp_path / f"{name}.csv", tmp_path / "x", crop_size=32)
    with pytest.raises(SystemExit, match="nothing.csv: no such metadata file"):
        prepare(images, tmp_path / "nothing.csv", tmp_path / "x", crop_size=32)
    lines = text.splitlines()
    lines[3] = ",".join(v if i != 2 else "" for i, v in enumerate(lines[3].split(",")))
    (tmp_path / "no_site.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match="metadata line 4: empty site"):
        prepare(images, tmp_path / "no_site.csv", tmp_path / "x", crop_size=32)


def test_rows_without_labels_are_warned_about_with_counts(tmp_path, capsys):
    images, metadata, _ = write_screen(tmp_path, "channels-first", np.uint8)
    rows = data.read_csv(metadata)
    data.write_csv(tmp_path / "bare.csv", ["plate", "well", "site"], [[r["plate"], r["well"], r["site"]] for r in rows])
    prepare(images, tmp_path / "bare.csv", tmp_path / "bare", crop_size=32)
    assert "bare.csv: no perturbation column" in capsys.readouterr().err
    rows[0]["perturbation"] = rows[1]["perturbation"] = ""
    data.write_csv(tmp_path / "some.csv", list(rows[0]), [list(r.values()) for r in rows])
    prepare(images, tmp_path / "some.csv", tmp_path / "some", crop_size=32)
    assert "some.csv: 2 of 6 rows have no perturbation" in capsys.readouterr().err


def test_a_file_without_a_row_is_skipped_and_the_error_policy_may_change_between_runs(tmp_path):
    images, metadata, pixels = write_screen(tmp_path, "channels-first", np.uint8)
    stray = images / "P1" / "Z99_s1.tif"
    tifffile.imwrite(stray, pixels["P1", "B00", 1], photometric="minisblack")
    with pytest.raises(SystemExit, match="no metadata row"):
        prepare(images, metadata, tmp_path / "out", crop_size=32)
    out = prepare(images, metadata, tmp_path / "out", crop_size=32, on_error="skip")  # same --out: allowed
    skipped = data.read_csv(out / "skipped.csv")
    assert [s["file"] for s in skipped] == [str(stray)] and json.loads((out / "meta.json").read_text())["crops"] == 24


def test_a_file_fixed_after_a_skip_is_taken_by_the_rerun(tmp_path):
    images, metadata, pixels = write_screen(tmp_path, "channels-first", np.uint8)
    victim = images / "P2" / "B01_s2.tif"
    victim.write_bytes(victim.read_bytes()[:300])
    out = prepare(images, metadata, tmp_path / "out", crop_size=32, shard_size=8, on_error="skip")
    assert json.loads((out / "meta.json").read_text())["skipped"] == 1
    tifffile.imwrite(victim, pixels["P2", "B01", 2], photometric="minisblack")  # fixed
    prepare(images, metadata, out, crop_size=32, shard_size=8, on_error="skip")
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["skipped"], meta["crops"]) == (0, 24) and data.read_csv(out / "skipped.csv") == []


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    """The process may write files of 20 kB at most (RLIMIT_FSIZE, as a full disk would refuse more):
    one line, exit 1, no *.tmp left; the same command with room finishes the dataset."""
    images, metadata, _ = write_screen(tmp_path, "channels-first", np.uint8, n_sites=6)
    command = [sys.executable, str(ROOT / "data.py"), "prepare", "--images", str(images), "--metadata", str(metadata),
               "--out", str(tmp_path / "out"), "--crop_size", "32", "--shard_size", "8", "--workers", "1"]
    limit = "import resource, signal, sys, runpy; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    full = subprocess.run([sys.executable, "-c", limit] + command[1:], capture_output=True, text=True)
    last = full.stderr.strip().splitlines()[-1]
    assert full.returncode == 1 and last.startswith(f"{tmp_path / 'out'}: cannot write (") and last.endswith("rerun to finish")
    assert not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / "meta.json").exists()
    subprocess.run(command, check=True, capture_output=True)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["crops"] == 24


def test_a_loaddata_csv_naming_files_that_are_not_there_says_which(tmp_path):
    """Not in the issue's list: a LoadData CSV whose files are missing (a path mistyped, a plate not
    yet downloaded) is one line naming the first file and why."""
    data.write_csv(tmp_path / "load_data.csv", ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "FileName_OrigDNA", "PathName_OrigDNA"],
                   [["P1", "A01", "1", "nope.tiff", "images"]])
    data.write_csv(tmp_path / "metadata.csv", ["plate", "well", "site", "perturbation"], [["P1", "A01", "1", "G1"]])
    with pytest.raises(SystemExit, match=r"no image of the 1 sampled could be read; the first, .*nope\.tiff: unreadable TIFF \(FileNotFoundError"):
        prepare(None, tmp_path / "metadata.csv", tmp_path / "out", load_data=tmp_path / "load_data.csv", crop_size=32)
