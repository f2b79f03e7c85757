"""A JUMP plate as the Cell Painting Gallery stores it (synth.write_gallery_plate: Phenix file names,
540 px fields that do not tile at 256, illumination functions, a gzip LoadData naming s3:// folders),
served by a real S3-compatible server on localhost (moto's, as s3fs tests itself), prepared straight
from it by `python data.py prepare` and from a local mirror."""
import csv
import gzip
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import data
import synth

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "cellpainting-gallery"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """The plate on disk (the mirror) and the same files in the bucket, public as the gallery is; one
    object more, private (a request without credentials is refused)."""
    import boto3
    from moto.server import ThreadedMotoServer
    root = tmp_path_factory.mktemp("gallery")
    load_data = synth.write_gallery_plate(root)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="owner", aws_secret_access_key="owner",
                      region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}))
    for path in root.rglob("*"):
        if path.is_file():
            s3.put_object(Bucket=BUCKET, Key=path.relative_to(root).as_posix(), Body=path.read_bytes(), ACL="public-read")
    url = f"s3://{BUCKET}/{load_data.relative_to(root).as_posix()}"
    yield dict(root=root, load_data=load_data, url=url, endpoint=endpoint, s3=s3)
    server.stop()


def prepare(gallery, *args, credentials=False):
    """python data.py prepare, as a user runs it: the endpoint from AWS_ENDPOINT_URL_S3, anonymous."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_ENDPOINT_URL_S3"] = gallery["endpoint"]
    if credentials:
        env.update(AWS_ACCESS_KEY_ID="owner", AWS_SECRET_ACCESS_KEY="owner", AWS_DEFAULT_REGION="us-east-1")
    return subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", "--workers=2", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def shards(out):
    return [np.load(p) for p in sorted(Path(out).glob("shard_*.npy"))]


def test_a_gallery_plate_prepares_from_s3_as_from_a_local_mirror(gallery, tmp_path):
    """Straight from the bucket and from the mirror (--mirror s3://cellpainting-gallery=DIR, the same
    gzip LoadData): the same crops byte for byte; 540 px fields give the centred 2 x 2 crops of 256 px
    (14 px left out on each side, said once and kept in meta.json); the five stains, not the three
    brightfield planes; Metadata_Source and Metadata_Batch in the index."""
    remote = prepare(gallery, "--load_data", gallery["url"], "--illum", "--out", tmp_path / "remote")
    assert remote.returncode == 0, remote.stderr[-2000:]
    local = prepare(gallery, "--load_data", gallery["load_data"], "--illum", "--mirror", f"s3://{BUCKET}={gallery['root']}",
                    "--out", tmp_path / "local")
    assert local.returncode == 0, local.stderr[-2000:]
    assert remote.stdout.count("leaving out 14/14 px at the top/bottom and 14/14 at the left/right") == 1
    meta = json.loads((tmp_path / "remote" / "meta.json").read_text())
    assert meta["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"] and meta["crops"] == 6 * 4
    assert meta["border_px"] == [[14, 14], [14, 14]] and meta["illumination_corrected"]
    a, b = shards(tmp_path / "remote"), shards(tmp_path / "local")
    assert len(a) == len(b) == 1 and a[0].shape == (24, 5, 256, 256) and a[0].tobytes() == b[0].tobytes()
    index = data.read_csv(tmp_path / "remote" / "index.csv")
    assert {(r["Metadata_Source"], r["Metadata_Batch"]) for r in index} == {("source_4", "2021_04_26_Batch1")}
    assert index[0]["source"].startswith(f"s3://{BUCKET}/cpg0016-jump/source_4/images/")


def test_illumination_correction_is_the_division_done_by_hand(gallery, tmp_path):
    """--illum: each stain divided by its <plate>_Illum<Channel>.npy before the uint8 conversion (the
    percentile stretch of float pixels), then the centred crops: one site recomputed with numpy."""
    run = prepare(gallery, "--load_data", gallery["url"], "--illum", "--channels", "DNA,Mito", "--out", tmp_path / "out")
    assert run.returncode == 0, run.stderr[-2000:]
    table = list(csv.DictReader(io.StringIO(gzip.decompress(gallery["load_data"].read_bytes()).decode())))
    local = lambda folder, name: gallery["root"] / folder.removeprefix(f"s3://{BUCKET}/") / name
    site = table[0]
    image = np.stack([tifffile.imread(local(site[f"PathName_Orig{c}"], site[f"FileName_Orig{c}"])) for c in ("DNA", "Mito")])
    functions = np.stack([np.load(local(site[f"PathName_Illum{c}"], site[f"FileName_Illum{c}"])) for c in ("DNA", "Mito")])
    corrected = image.astype(np.float64) / functions
    expected = []
    for channel in corrected:
        low, high = np.percentile(channel, [0.1, 99.9])
        expected.append(np.clip(np.rint((channel - low) / (high - low) * 255), 0, 255).astype(np.uint8))
    expected = np.stack(expected)[:, 14:526, 14:526].reshape(2, 2, 256, 2, 256).transpose(1, 3, 0, 2, 4).reshape(4, 2, 256, 256)
    np.testing.assert_array_equal(shards(tmp_path / "out")[0][:4], expected)
    uncorrected = prepare(gallery, "--load_data", gallery["url"], "--channels", "DNA,Mito", "--out", tmp_path / "plain")
    assert uncorrected.returncode == 0 and not np.array_equal(shards(tmp_path / "plain")[0][:4], expected)


def test_parts_and_resume_from_s3_give_the_whole_run(gallery, tmp_path):
    """--part 1/2 and 2/2 from the bucket, merged: the one-run crops; a rerun resumes (nothing redone)."""
    whole = prepare(gallery, "--load_data", gallery["url"], "--shard_size", "8", "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    for part in ("1/2", "2/2"):
        run = prepare(gallery, "--load_data", gallery["url"], "--shard_size", "8", "--part", part, "--out", tmp_path / "parts")
        assert run.returncode == 0, run.stderr[-2000:]
    merged = subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", "--merge", "--out", str(tmp_path / "parts")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert [s.tobytes() for s in shards(tmp_path / "whole")] == [s.tobytes() for s in shards(tmp_path / "parts")]
    again = prepare(gallery, "--load_data", gallery["url"], "--shard_size", "8", "--out", tmp_path / "whole")
    assert again.returncode == 0 and "resuming: 3 of 3 shards already written" in again.stdout


def test_the_parquet_twin_and_the_jump_index_url_form_read_alike(gallery, tmp_path):
    """The gallery's LoadData as parquet, and as the JUMP index's URL_Orig<channel> columns (whole
    addresses): the crops of the gzip CSV."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = list(csv.DictReader(io.StringIO(gzip.decompress(gallery["load_data"].read_bytes()).decode())))
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "load_data.parquet")
    stains = ("DNA", "ER", "RNA", "AGP", "Mito")
    index = [{**{k: v for k, v in r.items() if k.startswith("Metadata_")},
              **{f"URL_Orig{c}": r[f"PathName_Orig{c}"] + r[f"FileName_Orig{c}"] for c in stains}} for r in table]
    pq.write_table(pa.Table.from_pylist(index), tmp_path / "index.parquet")
    runs = {}
    for name in ("load_data.parquet", "index.parquet"):
        run = prepare(gallery, "--load_data", tmp_path / name, "--out", tmp_path / name.replace(".", "_"))
        assert run.returncode == 0, run.stderr[-2000:]
        runs[name] = shards(tmp_path / name.replace(".", "_"))[0]
    csv_run = prepare(gallery, "--load_data", gallery["url"], "--out", tmp_path / "csv")
    assert csv_run.returncode == 0
    assert runs["load_data.parquet"].tobytes() == runs["index.parquet"].tobytes() == shards(tmp_path / "csv")[0].tobytes()


@pytest.mark.parametrize("case,message", [
    ("missing image", r"no such object"),
    ("refused image", r"the server refused the request"),
    ("missing LoadData", r"^s3://cellpainting-gallery/nowhere/load_data\.csv\.gz: no such object$"),
    ("no bucket", r"^s3://no-such-bucket/load_data\.csv\.gz: no such object$"),
    ("exact tiling", r"540x540 images do not tile into 256x256 crops$"),
])
def test_bad_addresses_and_missing_objects_are_one_line(gallery, tmp_path, case, message):
    """Each is one line naming the object (no traceback); an image the server does not have, or refuses,
    names that image's address."""
    url = gallery["url"]
    if case in ("missing image", "refused image"):
        table = gzip.decompress(gallery["load_data"].read_bytes()).decode()
        first = table.splitlines()[1].split(",")
        name, folder = first[5], first[6]  # the first site's DNA image
        if case == "refused image":  # a bucket without the public policy: an anonymous request is refused
            gallery["s3"].create_bucket(Bucket=f"{BUCKET}-private")
            gallery["s3"].put_object(Bucket=f"{BUCKET}-private", Key=name, Body=b"private", ACL="private")
            table = table.replace(f"{name},{folder}", f"{name},s3://{BUCKET}-private/", 1)
        else:
            table = table.replace(f"{name},{folder}", f"{name},s3://{BUCKET}/gone/", 1)
        url = tmp_path / "load_data.csv.gz"
        url.write_bytes(gzip.compress(table.encode()))
    elif case == "missing LoadData":
        url = f"s3://{BUCKET}/nowhere/load_data.csv.gz"
    elif case == "no bucket":
        url = "s3://no-such-bucket/load_data.csv.gz"
    extra = ["--exact_tiling"] if case == "exact tiling" else []
    run = prepare(gallery, "--load_data", url, "--out", tmp_path / "out", *extra)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert re.search(message, last), last
    if case in ("missing image", "refused image"):
        assert name in last


def test_a_field_that_does_not_tile_gives_its_centred_grid():
    """An Opera Phenix field of 1080 x 1080 at crop 256: 16 crops, 28 px left out on each side."""
    field = np.arange(1080 * 1080, dtype=np.uint32).reshape(1, 1080, 1080)
    crops = data.tile(field, 256)
    assert crops.shape == (16, 1, 256, 256) and data.border(1080, 256) == (28, 28)
    np.testing.assert_array_equal(crops[0, 0], field[0, 28:284, 28:284])
    np.testing.assert_array_equal(crops[15, 0], field[0, 796:1052, 796:1052])
    assert data.border(1081, 256) == (28, 29)


@pytest.mark.parametrize("missing,message", [("fsspec", "reading s3:// addresses needs fsspec: pip install fsspec s3fs"),
                                             ("s3fs", "reading s3:// addresses needs s3fs: pip install s3fs")])
def test_without_fsspec_or_s3fs_an_address_is_one_line_saying_what_to_install(gallery, tmp_path, missing, message):
    """Run as the user would, with the package made unimportable (sys.modules[name] = None)."""
    run = subprocess.run([sys.executable, "-c", f"import sys; sys.modules[{missing!r}] = None; import data; data.main()",
                          "prepare", "--load_data", gallery["url"], "--out", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].endswith(message), run.stderr
