"""Bad input, one case per kind of input (each read by one checked reader in inputs.py or its owner):
one line naming the file and the problem, never a traceback, never a run that goes on with a wrong or
stale result. Each named case failed before its fix. `pytest -k bad_input` runs them."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import curate
import data
import evaluate
import inputs
import model as mae
import probe
import synth

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset=vits16", "--channel_agnostic=True", "--img_size=32", "--patch_size=8", "--dim=64", "--depth=2", "--heads=4",
        "--mlp_dim=128", "--dec_dim=32", "--dec_depth=1", "--dec_heads=4", "--dec_mlp_dim=64"]


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """The tests screen prepared (488 crops of 32 px), a 3-step model (model.pt and its checkpoint
    folder), and hand-crafted well embeddings with their wells.csv."""
    root = tmp_path_factory.mktemp("bad_input")
    synth.synth(root / "screen", size="tests", seed=0)
    data.prepare(root / "screen" / "images", root / "screen" / "metadata.csv", root / "crops", crop_size=32, workers=1)
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"--data={root / 'crops'}", f"--out_dir={root / 'train'}",
                          "--max_steps=3", "--ckpt_interval=3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    dataset = data.CropDataset(root / "crops")
    features, wells = evaluate.embed_wells(lambda x: evaluate.handcrafted_features(x)[None], dataset, root / "embeddings.npy")
    data.write_csv(root / "wells.csv", list(wells[0]), [list(w.values()) for w in wells])
    return root


def one_line(call, pattern):
    """call() stops with SystemExit whose message is one line matching pattern."""
    with pytest.raises(SystemExit) as stop:
        call()
    message = str(stop.value)
    assert "\n" not in message and __import__("re").search(pattern, message), message
    return message


def evaluate_embeddings(screen, out, *extra):
    return evaluate.main(["--embeddings", str(screen / "embeddings.npy"), "--metadata", str(screen / "wells.csv"),
                          "--out", str(out), "--align", "centerscale", "--null_size", "200", *map(str, extra)])


# ---- tables ------------------------------------------------------------------------------------------

def test_bad_input_tables(screen, tmp_path):
    """A compound-activity CSV with other columns or a word for a number; a null-perturbation list that
    is missing or empty; a groups table in gene,group form, or naming nothing in the data."""
    (tmp_path / "activity.csv").write_text("a,b\nx,y\n")
    one_line(lambda: evaluate_embeddings(screen, tmp_path / "o", "--compound_activity", tmp_path / "activity.csv"),
             r"activity.csv: no column compound, gene, activity_um")
    (tmp_path / "activity.csv").write_text("compound,gene,activity_um\nC1,G1,high\n")
    one_line(lambda: inputs.compound_activity(tmp_path / "activity.csv"), r"line 2: activity_um 'high' is not a number")
    one_line(lambda: evaluate_embeddings(screen, tmp_path / "o", "--null_perturbations", tmp_path / "none.txt"),
             r"none.txt: no such null-perturbation list")
    (tmp_path / "empty.txt").write_text("\n\n")
    one_line(lambda: inputs.names(tmp_path / "empty.txt"), r"empty.txt: an empty perturbation list")
    (tmp_path / "groups.csv").write_text("gene,group\nSMARCC2,g1\n")
    for call in (lambda: evaluate_embeddings(screen, tmp_path / "o", "--groups", tmp_path / "groups.csv"),
                 lambda: probe.task_labels(data.read_csv(screen / "wells.csv"), "group", tmp_path / "groups.csv")):
        one_line(call, r"groups.csv: no column perturbation \(a groups table has perturbation, group; it has gene, group\)")
    (tmp_path / "groups.csv").write_text("perturbation,group\nNOT-IN-THIS-SCREEN,g1\n")
    for call in (lambda: evaluate_embeddings(screen, tmp_path / "o", "--groups", tmp_path / "groups.csv"),
                 lambda: probe.task_labels(data.read_csv(screen / "wells.csv"), "group", tmp_path / "groups.csv")):
        one_line(call, r"groups.csv: none of its perturbations is in the data \(e.g. 'NOT-IN-THIS-SCREEN'")


# ---- embeddings ---------------------------------------------------------------------------------------

def test_bad_input_embeddings(screen, tmp_path):
    """A text file named .npy, a cut .npy; a parquet profile table cut short, with no rows, or with a
    string among its features."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "text.npy").write_text("hello\n")
    one_line(lambda: evaluate.read_embeddings(tmp_path / "text.npy", screen / "wells.csv"), r"text.npy: not a .npy file")
    (tmp_path / "cut.npy").write_bytes((screen / "embeddings.npy").read_bytes()[:300])
    one_line(lambda: evaluate.read_embeddings(tmp_path / "cut.npy", screen / "wells.csv"), r"cut.npy: not a whole .npy array")
    table = pa.table({"Metadata_plate": ["P1", "P1"], "Metadata_well": ["A01", "A02"], "f0": [0.5, 1.5]})
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    one_line(lambda: evaluate.read_embeddings(tmp_path / "empty.parquet", None), r"empty.parquet: no rows")
    pq.write_table(table.append_column("f1", pa.array(["a", "b"])), tmp_path / "text.parquet")
    one_line(lambda: evaluate.read_embeddings(tmp_path / "text.parquet", None), r"text.parquet: feature column f1 holds string")
    pq.write_table(table, tmp_path / "whole.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "whole.parquet").read_bytes()[:-20])
    one_line(lambda: evaluate.read_embeddings(tmp_path / "cut.parquet", None), r"cut.parquet: not a whole parquet table")


# ---- datasets and preparing ----------------------------------------------------------------------------

def copy_dataset(screen, tmp_path, change_meta=None):
    shutil.copytree(screen / "crops", tmp_path / "crops")
    if change_meta:
        meta = json.loads((tmp_path / "crops" / "meta.json").read_text())
        change_meta(meta)
        (tmp_path / "crops" / "meta.json").write_text(json.dumps(meta))
    return tmp_path / "crops"


def test_bad_input_datasets(screen, tmp_path):
    """meta.json without channels, or with a channel named twice (trained one table row twice, never
    the other); prepare given a channel twice, a {channel} pattern that matches no file, an empty
    parquet table of images."""
    crops = copy_dataset(screen, tmp_path, lambda meta: meta.pop("channels"))
    one_line(lambda: data.CropDataset(crops), r"meta.json: not a prepared dataset's \(it needs channels")
    shutil.rmtree(crops)
    crops = copy_dataset(screen, tmp_path, lambda meta: meta.update(channels=["DNA", "ER", "DNA", "AGP", "Mito", "Golgi"]))
    one_line(lambda: data.CropDataset(crops), r"meta.json: a channel named twice")
    images, metadata = screen / "screen" / "images", screen / "screen" / "metadata.csv"
    one_line(lambda: data.prepare(images, metadata, tmp_path / "o1", crop_size=32, workers=1, channel_names=["a", "b", "a", "c", "d", "e"]),
             r"^--channel_names: a named twice")
    one_line(lambda: data.prepare(images, metadata, tmp_path / "o2", crop_size=32, workers=1, pattern="{plate}/{well}_s{site}_w{channel}.png"),
             r"no file matches the layout \{plate\}/\{well\}_s\{site\}_w\{channel\}.png")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"plate": pa.array([], pa.string()), "well": pa.array([], pa.string()), "site": pa.array([], pa.int64()),
                             "image": pa.array([], pa.binary())}), tmp_path / "empty.parquet")
    one_line(lambda: data.prepare(tmp_path / "empty.parquet", None, tmp_path / "o3", crop_size=32, workers=1), r"empty.parquet: no rows")


def test_bad_input_merge_of_a_part_deleted_or_cut(screen, tmp_path):
    """--merge with a part's CSV deleted, or cut mid-line (299 of 488 crops merged, silently): the
    part's CSV is checked against its json."""
    images, metadata = screen / "screen" / "images", screen / "screen" / "metadata.csv"
    for part in ((1, 2), (2, 2)):
        data.prepare(images, metadata, tmp_path / "parts", crop_size=32, shard_size=64, workers=1, part=part)
    text = (tmp_path / "parts" / "part_2_of_2.csv").read_text()
    (tmp_path / "parts" / "part_2_of_2.csv").write_text(text[:len(text) // 2])
    one_line(lambda: data.merge(tmp_path / "parts"), r"part_2_of_2.csv: \d+ crops where part_2_of_2.json says \d+")
    (tmp_path / "parts" / "part_2_of_2_skipped.csv").unlink()
    one_line(lambda: data.merge(tmp_path / "parts"), r"part_2_of_2.csv: unreadable or missing")
    assert not (tmp_path / "parts" / "index.csv").exists()


# ---- weights and checkpoints -------------------------------------------------------------------------

def test_bad_input_weights(screen, tmp_path):
    """The project's model.pt with an extra or a missing tensor, a config that disagrees with its
    tensors or has a field this version does not know; a checkpoint folder whose .distcp files are
    gone or whose train.json is cut."""
    saved = torch.load(screen / "train" / "model.pt", weights_only=True)
    cases = {"extra": dict(saved, model=dict(saved["model"], bogus=torch.zeros(3))),
             "missing": dict(saved, model={k: v for k, v in saved["model"].items() if k != "blocks.1.mlp_out.bias"}),
             "disagrees": dict(saved, config=dict(saved["config"], dim=128)),
             "unknown": dict(saved, config=dict(saved["config"], colour="blue"))}
    expected = {"extra": r"a tensor 'bogus' its config's model does not have",
                "missing": r"no tensor 'blocks.1.mlp_out.bias', which its config's model has",
                "disagrees": r"'cls_token' is \[1, 1, 64\] where its config makes \[1, 1, 128\]",
                "unknown": r"a config field this version does not know: colour"}
    for name, state in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        one_line(lambda: mae.from_pretrained(tmp_path / f"{name}.pt"), rf"{name}.pt: {expected[name]}")
    folder = tmp_path / "ckpt_0000003"
    shutil.copytree(screen / "train" / "ckpt_0000003", folder)
    for shard in folder.glob("*.distcp"):
        shard.unlink()
    one_line(lambda: mae.from_pretrained(folder), r"ckpt_0000003: not a complete checkpoint \(__0_0.distcp is missing\)")
    shutil.rmtree(folder)
    shutil.copytree(screen / "train" / "ckpt_0000003", folder)
    text = (folder / "train.json").read_text()
    (folder / "train.json").write_text(text[:len(text) // 2])
    one_line(lambda: mae.from_pretrained(folder), r"ckpt_0000003: not a complete checkpoint \(JSONDecodeError")


@pytest.mark.parametrize("weights", ["1", "1,-1", "0,0", "1,nan"])
def test_bad_input_data_weights(screen, weights):
    """--data_weights of the wrong length, negative, all zero or NaN: refused before anything is built."""
    data_arg = f"{screen / 'crops'},{screen / 'crops'}"
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"--data={data_arg}", f"--data_weights={weights}",
                          "--max_steps=1", f"--out_dir={screen / 'never'}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "data_weights must be 2 numbers, 0 or more, not all 0" in run.stderr.strip().splitlines()[-1]


# ---- output folders, and nothing stale ----------------------------------------------------------------

def test_bad_input_output_folders(screen, tmp_path):
    """An --out that cannot be a folder (a file is there), or that is the input folder (curate.py once
    overwrote the index it read: 488 -> 44 crops)."""
    (tmp_path / "file").write_text("")
    one_line(lambda: evaluate_embeddings(screen, tmp_path / "file" / "out"), r"out: cannot write here")
    one_line(lambda: probe.main(["--embeddings", str(screen / "embeddings.npy"), "--metadata", str(screen / "wells.csv"),
                                 "--out", str(tmp_path / "file" / "out")]), r"out: cannot write here")
    before = (screen / "crops" / "index.csv").read_bytes()
    one_line(lambda: curate.main(["--data", str(screen / "crops"), "--out", str(screen / "crops")]), r"crops: is an input folder")
    one_line(lambda: evaluate_embeddings(screen, screen), r"is an input folder")
    assert (screen / "crops" / "index.csv").read_bytes() == before


def test_bad_input_no_stale_result_beside_a_new_one(screen, tmp_path):
    """A second evaluate.py run in the same folder, without --h5ad and from embeddings: the first run's
    .h5ad and embeddings.npy are gone; probe.py without --trim leaves no earlier trimmed.pt."""
    pytest.importorskip("anndata")
    out = tmp_path / "eval"
    evaluate.main(["--features", "handcrafted", "--data", str(screen / "crops"), "--out", str(out), "--align", "centerscale",
                   "--null_size", "200", "--h5ad"])
    assert (out / "wells.h5ad").exists() and (out / "embeddings.npy").exists()
    evaluate_embeddings(screen, out)
    assert not (out / "wells.h5ad").exists() and not (out / "embeddings.npy").exists() and (out / "report.json").exists()
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "trimmed.pt").write_bytes(b"an earlier run's")
    probe.main(["--embeddings", str(screen / "embeddings.npy"), "--metadata", str(screen / "wells.csv"), "--split_col", "well",
                "--out", str(tmp_path / "probe")])
    assert not (tmp_path / "probe" / "trimmed.pt").exists() and (tmp_path / "probe" / "probe.json").exists()


def test_bad_input_a_cache_from_a_run_killed_between_its_two_files_is_not_served(screen, tmp_path):
    """probe.py's block features: a run killed after features.npy and before features.json left another
    run's description beside a new array; the description now names its array (size, mtime)."""
    out = tmp_path / "probe"
    first, _ = probe.block_features(screen / "train" / "model.pt", screen / "crops", out)
    first = np.array(first)
    np.save(out / "features.npy", np.zeros_like(first))  # what the killed run wrote, for another checkpoint
    again, _ = probe.block_features(screen / "train" / "model.pt", screen / "crops", out)
    np.testing.assert_array_equal(np.asarray(again), first)


# ---- curation -----------------------------------------------------------------------------------------

def test_bad_input_curation(screen, tmp_path):
    """An index without a perturbation column; all-NaN embeddings (NaN weights give them too: exit 0
    before); is_control decides which wells are controls, named as --control or not (unnamed controls
    were dropped as 'inconsistent')."""
    crops = copy_dataset(screen, tmp_path)
    rows = data.read_csv(crops / "index.csv")
    data.write_csv(crops / "index.csv", [c for c in rows[0] if c != "perturbation"],
                   [[v for c, v in r.items() if c != "perturbation"] for r in rows])
    one_line(lambda: curate.main(["--data", str(crops), "--out", str(tmp_path / "c1")]), r"index.csv: no column perturbation")
    wells = data.read_csv(screen / "wells.csv")
    np.save(tmp_path / "nan.npy", np.full((len(wells), 4), np.nan, np.float32))
    one_line(lambda: curate.main(["--data", str(screen / "crops"), "--out", str(tmp_path / "c2"), "--embeddings", str(tmp_path / "nan.npy"),
                                  "--min_experiments", "1", "--min_wells", "1"]), r"nan.npy: the wells' embeddings are not all finite")
    data.write_csv(crops / "index.csv", list(rows[0]),  # the controls renamed: is_control alone says what they are
                   [[("CTRL-" + r["well"]) if c == "perturbation" and r["is_control"] == "True" else v for c, v in r.items()]
                    for r in rows])
    report = curate.curate(crops, tmp_path / "c3", min_experiments=1, min_wells=1)
    renamed = {("CTRL-" + r["well"]) for r in rows if r["is_control"] == "True"}
    assert renamed and not renamed & set(report["consistency"]["dropped"]), report["consistency"]["dropped"]


# ---- images named by the file that is bad -------------------------------------------------------------

def test_bad_input_the_bad_channel_file_is_the_one_named(tmp_path):
    """A LoadData site whose third channel's file is damaged: the error names that file, not the site's
    first channel's."""
    load_data = synth.write_gallery_plate(tmp_path, wells=("A01",), sites=2, size=128)
    site = next(csv.DictReader(__import__("io").StringIO(__import__("gzip").decompress(load_data.read_bytes()).decode())))
    bad = tmp_path / site["PathName_OrigRNA"].removeprefix("s3://cellpainting-gallery/") / site["FileName_OrigRNA"]
    bad.write_bytes(b"not a tiff")
    one_line(lambda: data.prepare(None, None, tmp_path / "o", load_data=load_data, mirrors=[("s3://cellpainting-gallery", str(tmp_path))],
                                  crop_size=64, workers=1), rf"^{bad}: unreadable TIFF")
