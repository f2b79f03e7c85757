"""probe.py: the logistic regression against scikit-learn, the split, and the block search on the
synthetic screen with a really trained model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import synth
import model as mae
import evaluate
import probe

sklearn_linear = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is a test-only dependency")


def gaussian_classes(rng, n, d=20, k=5, spread=1.0):
    centers = rng.normal(0, spread, (k, d))
    y = rng.integers(0, k, n)
    return centers[y] + rng.normal(size=(n, d)), y


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_logistic_regression_matches_scikit_learn(l2):
    """Same objective (scikit-learn's C = 1 / (l2 n)), so the same solution: probabilities agree and so
    does the validation accuracy. Three problems fitted as one stack (classes apart, pure noise, classes
    overlapping: unlike conditioning) each land where scikit-learn puts them, and exactly where each
    lands fitted alone. (At 1e-5, which float32 gradients reach; scikit-learn's default 1e-4 leaves the
    weights within 1e-4 / l2 of the optimum.)"""
    rng = np.random.default_rng(0)
    x, y = gaussian_classes(rng, 600)
    overlapping = np.random.default_rng(1).normal(0, 0.3, (5, x.shape[1]))[y] + rng.normal(size=x.shape)
    stack = np.stack([x, rng.normal(size=x.shape), overlapping])
    w, b = probe.fit_logistic(torch.tensor(stack[:, :400], dtype=torch.float32), torch.tensor(y[:400]), 5, l2,
                              max_iter=500, tolerance=1e-5)
    for k in range(3):
        alone = probe.fit_logistic(torch.tensor(stack[k:k + 1, :400], dtype=torch.float32), torch.tensor(y[:400]), 5, l2,
                                   max_iter=500, tolerance=1e-5)
        assert torch.equal(alone[0][0], w[k]) and torch.equal(alone[1][0], b[k])  # the stack changes no block's fit
        ours = torch.softmax(torch.tensor(stack[k, 400:], dtype=torch.float32) @ w[k] + b[k], 1).numpy()
        theirs = sklearn_linear.LogisticRegression(C=1 / (l2 * 400), max_iter=10_000, tol=1e-10).fit(stack[k, :400], y[:400])
        np.testing.assert_allclose(ours, theirs.predict_proba(stack[k, 400:]), atol=2e-3, err_msg=f"problem {k}")
        assert abs((ours.argmax(1) == y[400:]).mean() - theirs.score(stack[k, 400:], y[400:])) <= 0.01


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # on purpose
def test_balanced_accuracy_matches_scikit_learn():
    """Per row of predictions, over the classes present in the truth (a predicted class absent from the
    truth counts as wrong, not as a class)."""
    from sklearn.metrics import balanced_accuracy_score
    rng = np.random.default_rng(2)
    truth = rng.choice([0, 2, 3, 7], size=300, p=[0.6, 0.2, 0.15, 0.05])
    predicted = np.where(rng.random((4, 300)) < 0.5, truth, rng.integers(0, 9, (4, 300)))
    ours = probe.balanced_accuracy(torch.tensor(truth), torch.tensor(predicted)).numpy()
    np.testing.assert_allclose(ours, [balanced_accuracy_score(truth, p) for p in predicted], rtol=1e-6)


def test_probe_of_a_stack_chooses_each_blocks_penalty_as_a_loop_would():
    """probe() fits every block of a stack at once and keeps, per block, the first penalty of the grid
    (the strongest) with the best validation balanced accuracy, and that fit's test figures: as a loop over
    blocks and penalties picks them from the same fits. Blocks: signal in 10 of 60 dims at three
    strengths, and pure noise; block 2 ties two penalties."""
    rng = np.random.default_rng(4)
    n, grid = 600, (1e-1, 1e-2, 1e-3, 1e-4)
    base = rng.normal(size=(n, 60))
    y = (base[:, :10] @ rng.normal(size=(10, 4))).argmax(1)
    labels = np.array([f"c{v}" for v in y])
    blocks = np.stack([base + rng.normal(0, s, base.shape) for s in (0.5, 2.0, 4.0)] + [rng.normal(size=base.shape)])
    train, validation, test = np.arange(n) < 300, (np.arange(n) >= 300) & (np.arange(n) < 450), np.arange(n) >= 450
    results = probe.probe(blocks, labels, train, validation, test, grid)
    x = torch.tensor(blocks, dtype=torch.float32)
    x = (x - x[:, train].mean(1, keepdim=True)) / (x[:, train].std(1, keepdim=True) + 1e-6)
    fits, params = [], None
    for l2 in grid:
        params = probe.fit_logistic(x[:, train].contiguous(), torch.tensor(y[train]), 4, l2, params)
        fits.append((l2, params))
    score = lambda k, params, split: (x[k, split] @ params[0][k] + params[1][k]).argmax(1)
    ties = 0
    for k, result in enumerate(results):
        scores = [float(probe.balanced_accuracy(torch.tensor(y[validation]), score(k, p, validation)[None])) for _, p in fits]
        best = scores.index(max(scores))  # the first of equals: the strongest penalty
        ties += scores.count(max(scores)) > 1
        predicted = score(k, fits[best][1], test)
        assert result["l2"] == grid[best] and result["validation_balanced_accuracy"] == scores[best], (k, scores)
        assert result["accuracy"] == float((predicted == torch.tensor(y[test])).float().mean()), k
        assert result["balanced_accuracy"] == float(probe.balanced_accuracy(torch.tensor(y[test]), predicted[None])), k
    assert ties and len({r["l2"] for r in results}) > 1  # blocks chose apart: a stack sharing one choice fails


def test_probe_recovers_a_planted_linear_signal():
    """Labels that are a linear function of 10 of 200 noisy features: the probe finds them (the
    Bayes accuracy is 1; 1,500 training wells in 200 dimensions reach ~0.85), and on pure noise it
    stays at chance."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 200))
    y = (x[:, :10] @ rng.normal(size=(10, 4))).argmax(1)
    labels = np.array([f"class{v}" for v in y])
    train, validation = np.arange(2000) < 1500, (np.arange(2000) >= 1500) & (np.arange(2000) < 1750)
    result, noise = probe.probe(np.stack([x, rng.normal(size=(2000, 200))]), labels, train, validation, np.arange(2000) >= 1750)
    assert result["accuracy"] > 0.8 and result["classes"] == 4  # chance 0.25
    assert abs(noise["balanced_accuracy"] - noise["chance_balanced"]) < 0.06


def test_split_holds_out_whole_experiments_within_each_cell_type():
    """RxRx1's 51 experiments by sorted name held out the last quarter: RPE-04..11 and every U2OS one, so
    U2OS was never trained on. Within each cell type, the last quarter tests and the quarter before it
    validates (where the penalty and block are chosen): every cell type is on all three sides."""
    counts = dict(HEPG2=11, HUVEC=24, RPE=11, U2OS=5)
    wells = [dict(experiment=f"{c}-{e:02d}", cell_type=c) for c, n in counts.items() for e in range(1, n + 1) for _ in range(2)]
    train, validation, test, held = probe.split_wells(wells, "experiment", "cell_type")
    assert held["test"][-2:] == ["U2OS-04", "U2OS-05"] and held["validation"][-2:] == ["U2OS-02", "U2OS-03"]
    cell = np.array([w["cell_type"] for w in wells])
    for c in counts:
        assert train[cell == c].any() and validation[cell == c].any() and test[cell == c].any(), c
    experiments = np.array([w["experiment"] for w in wells])
    assert not (train & validation).any() and not (train & test).any() and not (validation & test).any()
    assert (train | validation | test).all() and not set(experiments[train]) & set(experiments[test])
    _, _, _, unstratified = probe.split_wells(wells, "experiment")
    assert all(e.startswith(("RPE", "U2OS")) for e in unstratified["test"])  # what the old split did
    with pytest.raises(SystemExit, match=r"experiment: 2 value\(s\) \(E1, E2\); a train/validation/test split needs 3 or more"):
        probe.split_wells([dict(experiment=e) for e in ("E1", "E2")], "experiment")


def test_the_block_is_chosen_on_validation_and_scored_on_test(tmp_path):
    """Block 1 carries the genes' signal everywhere but in the validation experiments; block 2, a weaker
    one everywhere. Chosen on validation, block 2 wins, and its test accuracy is reported, though block 1
    scores higher on test: picking by the reported split (as before) would have chosen block 1."""
    rng = np.random.default_rng(3)
    features, wells = plated_blocks(rng, experiments=4)
    held = probe.split_wells(wells, "experiment")[3]
    in_validation = np.array([w["experiment"] in held["validation"] for w in wells])
    genes = np.array([w["perturbation"] for w in wells])
    signal = {g: rng.normal(size=features.shape[2]) for g in set(genes)}
    strong = np.array([3.0 * signal[g] for g in genes])
    features[0] = rng.normal(size=features[0].shape) + np.where(in_validation[:, None], 0, strong)
    features[1] = rng.normal(size=features[1].shape) + 0.2 * strong
    np.save(tmp_path / "blocks.npy", features[:2].astype(np.float32))
    data.write_csv(tmp_path / "wells.csv", list(wells[0]), [list(w.values()) for w in wells])
    report = probe.main(["--embeddings", str(tmp_path / "blocks.npy"), "--metadata", str(tmp_path / "wells.csv"),
                         "--out", str(tmp_path / "out"), "--align", "none"])
    curve = report["curves"]["perturbation"]
    assert report["best_block"]["perturbation"] == 2
    assert curve["1"]["balanced_accuracy"] > curve["2"]["balanced_accuracy"]  # test would have picked block 1
    assert curve["2"]["validation_balanced_accuracy"] > curve["1"]["validation_balanced_accuracy"]
    assert report["held_out"]["test"] and not set(report["held_out"]["test"]) & set(report["held_out"]["validation"])
    # probe.png: this run's curve, another run's (--baseline) dashed beside it
    pytest.importorskip("matplotlib", reason="the pictures (tests/requirements.txt)")
    probe.main(["--embeddings", str(tmp_path / "blocks.npy"), "--metadata", str(tmp_path / "wells.csv"),
                "--out", str(tmp_path / "again"), "--baseline", str(tmp_path / "out")])
    assert (tmp_path / "again" / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_task_reads_groups_and_drops_controls(tmp_path):
    data.write_csv(tmp_path / "groups.csv", ["perturbation", "group"], [["A", "g1"], ["B", "g2"]])
    wells = [dict(perturbation=p) for p in ("A", "B", "C", "non-targeting")]
    assert probe.task_labels(wells, "group", tmp_path / "groups.csv").tolist() == ["g1", "g2", "", ""]
    assert probe.task_labels(wells, "perturbation").tolist() == ["A", "B", "C", ""]
    assert probe.task_labels(wells, "perturbation", keep_controls=True)[3] == "non-targeting"


def plated_blocks(rng, experiments=4, plates=2, genes=12, d=16):
    """Well embeddings of 3 'blocks' of a screen: block 2 carries each gene's signal, blocks 1 and 3 are
    noise; every plate adds a large offset of its own (the leftover batch effect of raw embeddings)."""
    signal = rng.normal(size=(genes, d))
    wells, blocks = [], []
    for e in range(experiments):
        for p in range(plates):
            offset = rng.normal(0, 8, d)
            for g in list(range(genes)) + ["control"] * 6:
                wells.append(dict(experiment=f"E{e}", plate=f"E{e}P{p}", well=f"W{len(wells)}",
                                  perturbation="non-targeting" if g == "control" else f"G{g}"))
                own = 0 if g == "control" else signal[g]
                blocks.append([rng.normal(size=d) + offset, 1.5 * own + rng.normal(size=d) + offset, rng.normal(size=d) + offset])
    return np.array(blocks).transpose(1, 0, 2), wells


def test_probe_picks_the_block_that_carries_the_signal_and_centres_plates(tmp_path, monkeypatch):
    """The block a probe must pick is known here (block 2); and only with each plate centred and scaled
    on its controls (the default) does the probe see the genes past the plates' offsets."""
    features, wells = plated_blocks(np.random.default_rng(5))
    np.save(tmp_path / "blocks.npy", features.astype(np.float32))
    data.write_csv(tmp_path / "wells.csv", list(wells[0]), [list(w.values()) for w in wells])
    common = ["--embeddings", str(tmp_path / "blocks.npy"), "--metadata", str(tmp_path / "wells.csv")]
    aligned = probe.main(common + ["--out", str(tmp_path / "aligned"), "--blocks", "3,1,2"])  # stacked, out of order
    raw = probe.main(common + ["--out", str(tmp_path / "raw"), "--align", "none"])
    assert aligned["best_block"]["perturbation"] == 2
    accuracy = lambda report, block: report["curves"]["perturbation"][str(block)]["balanced_accuracy"]
    assert accuracy(aligned, 2) > 0.8 and max(accuracy(aligned, 1), accuracy(aligned, 3)) < 0.3   # chance 1/12
    assert accuracy(raw, 2) < accuracy(aligned, 2) - 0.3
    # blocks too big to stack are fitted one at a time: the same curve, number for number
    monkeypatch.setattr(probe, "PROBE_MEMORY", 1)
    alone = probe.main(common + ["--out", str(tmp_path / "alone")])
    assert alone["curves"] == aligned["curves"]


def test_a_block_with_nan_features_is_one_line_not_a_chance_score(tmp_path):
    """A NaN in one well of the block that carries the signal made that block score chance and another
    block win, exit 0: now one line naming the block and the row."""
    features, wells = plated_blocks(np.random.default_rng(5))
    features[1, 5, 3] = np.nan
    np.save(tmp_path / "blocks.npy", features.astype(np.float32))
    data.write_csv(tmp_path / "wells.csv", list(wells[0]), [list(w.values()) for w in wells])
    with pytest.raises(SystemExit, match=r"^block 2: 1 well\(s\) with NaN or inf features, the first row 5 of the wells$"):
        probe.main(["--embeddings", str(tmp_path / "blocks.npy"), "--metadata", str(tmp_path / "wells.csv"),
                    "--out", str(tmp_path / "out")])


# ---- the block search on the synthetic screen, with a really trained model -----------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tests screen cut into 32x32 crops, a small MAE trained on it by train.py (~1 minute), the
    same architecture untrained, and the planted complexes as a perturbation,group table."""
    import subprocess
    import sys
    root = tmp_path_factory.mktemp("probe")
    synth.synth(root / "synth", size="tests", seed=0)
    crops = data.prepare(root / "synth" / "images", root / "synth" / "metadata.csv", root / "crops", crop_size=32, workers=2)
    run = subprocess.run([sys.executable, "train.py", "config/demo.py", f"--data={crops}", f"--out_dir={root / 'run'}",
                          "--img_size=32", "--patch_size=4", "--channel_agnostic=False", "--layerscale_init=0.1",
                          "--max_steps=400", "--log_interval=100"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    untrained = mae.from_pretrained(root / "run" / "model.pt")
    untrained.init_weights(seed=1)
    mae.save_consolidated(root / "untrained.pt", untrained.config, untrained.state_dict())
    truth = json.loads((root / "synth" / "truth.json").read_text())
    data.write_csv(root / "groups.csv", ["perturbation", "group"], [[g, v["complex"] or "none"] for g, v in truth["genes"].items()])
    return root


def test_block_search_trained_beats_untrained_and_trims(trained, capsys):
    # the tests screen has 2 experiments: the train/validation/test split goes by well (random positions per plate)
    common = ["--data", str(trained / "crops"), "--task", "group", "--groups", str(trained / "groups.csv"), "--split_col", "well"]
    ours = probe.main(["--ckpt", str(trained / "run" / "model.pt"), "--out", str(trained / "p1"), "--trim"] + common)
    untrained = probe.main(["--ckpt", str(trained / "untrained.pt"), "--out", str(trained / "p2")] + common)
    curve = {int(b): r["balanced_accuracy"] for b, r in ours["curves"]["group"].items()}
    best = ours["best_block"]["group"]
    assert curve[best] == max(curve.values())  # the chosen block is the argmax of the reported curve
    assert curve[best] > max(r["balanced_accuracy"] for r in untrained["curves"]["group"].values())
    rows = data.read_csv(trained / "p1" / "probe.csv")
    assert [int(r["block"]) for r in rows] == sorted(curve) and float(rows[best - 1]["balanced_accuracy"]) == pytest.approx(curve[best], abs=1e-4)
    # the trimmed encoder embeds exactly as the full model at the best block
    trimmed = mae.from_pretrained(trained / "p1" / "trimmed.pt").eval()
    full = mae.from_pretrained(trained / "run" / "model.pt").eval()
    x = torch.from_numpy(data.CropDataset(trained / "crops").crops(range(8)))
    assert len(trimmed.blocks) == best and trimmed.config.dec_depth == 0
    torch.testing.assert_close(trimmed.embed(x), full.embed(x, [best]))
    # a rerun reads the cached block features instead of running the model again
    before = (trained / "p1" / "features.npy").stat().st_mtime_ns
    capsys.readouterr()
    again = probe.main(["--ckpt", str(trained / "run" / "model.pt"), "--out", str(trained / "p1")] + common)
    assert "from the cache" in capsys.readouterr().out
    assert (trained / "p1" / "features.npy").stat().st_mtime_ns == before and again["best_block"] == ours["best_block"]


# ---- embedding under torchrun ----------------------------------------------------------------------------

def torchrun(nproc, *args):
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
                         capture_output=True, text=True, timeout=600, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_ranks_share_the_embedding_and_their_wells_equal_one_process(trained, tmp_path):
    """2 and 3 gloo processes each embed a run of whole wells into one file: the float32 well means equal
    one process's to 1e-6 (the ranks' batches differ, so only the rounding may); each rank encodes
    only its share of the crops (counted); probe.py runs unchanged under torchrun and finds what one
    process finds."""
    script = tmp_path / "embed.py"
    script.write_text("\n".join([
        "import sys, numpy as np, data, evaluate, model as mae",
        "m = mae.from_pretrained(sys.argv[1]).eval()",
        "blocks, seen = list(range(1, len(m.blocks) + 1)), []",
        "encode = lambda x: seen.append(len(x)) or m.embed(x, blocks)",
        "evaluate.embed_wells(encode, data.CropDataset(sys.argv[2]), sys.argv[3], 50, store_dtype=np.float32)",
        "open(f'{sys.argv[3]}.rank{evaluate.torchrun_rank()[0]}', 'w').write(str(sum(seen) - 1))",  # less the shape probe
    ]))
    model, crops = str(trained / "run" / "model.pt"), str(trained / "crops")
    total = len(data.CropDataset(crops))
    m = mae.from_pretrained(model).eval()  # the one-process reference, in this process
    one = evaluate.embed_wells(lambda x: m.embed(x, list(range(1, len(m.blocks) + 1))), data.CropDataset(crops),
                               tmp_path / "one.npy", 50, store_dtype=np.float32)[0]
    for nproc in (2, 3):
        torchrun(nproc, str(script), model, crops, str(tmp_path / f"{nproc}.npy"))
        np.testing.assert_allclose(np.load(tmp_path / f"{nproc}.npy"), one, rtol=0, atol=1e-6)
        shares = [int((tmp_path / f"{nproc}.npy.rank{r}").read_text()) for r in range(nproc)]
        assert sum(shares) == total and max(shares) <= total / nproc + 20, shares  # whole wells of 4 crops
    assert not list(tmp_path.glob("*.part*")), "the ranks' files are removed once joined"
    # probe.py itself, under torchrun: the same cache and the same curve as one process
    common = ["--ckpt", model, "--data", crops, "--task", "group", "--groups", str(trained / "groups.csv"), "--split_col", "well"]
    torchrun(2, "probe.py", *common, "--out", str(tmp_path / "p2"))
    single = probe.main(common + ["--out", str(tmp_path / "p1")])
    np.testing.assert_allclose(np.load(tmp_path / "p2" / "features.npy").astype(np.float32),
                               np.load(tmp_path / "p1" / "features.npy").astype(np.float32), rtol=2e-3, atol=2e-3)
    assert (tmp_path / "p2" / "probe.csv").read_text().splitlines()[0] == (tmp_path / "p1" / "probe.csv").read_text().splitlines()[0]
    assert json.loads((tmp_path / "p2" / "probe.json").read_text())["best_block"] == single["best_block"]


def test_each_rank_writes_a_file_of_its_own_and_waits_for_the_slowest_without_a_timeout(trained, tmp_path):
    """Ranks on several nodes writing neighbouring wells of one shared file overwrite each other's
    boundary pages (a network filesystem writes back whole pages): every file a rank opens for writing
    is its own (rank 0 alone writes the joined file, after the barrier); and the process group waits 24
    hours, not torch's default 10 minutes, for a rank that finishes late."""
    script = tmp_path / "writes.py"
    script.write_text("\n".join([
        "import sys, numpy as np, torch.distributed as dist, data, evaluate, model as mae",
        "from torch.distributed.distributed_c10d import _get_default_group",
        "opened, open_memmap = [], np.lib.format.open_memmap",
        "np.lib.format.open_memmap = lambda path, mode='r+', *a, **k: opened.append((str(path), mode)) or open_memmap(path, mode, *a, **k)",
        "m = mae.from_pretrained(sys.argv[1]).eval()",
        "rank = evaluate.torchrun_rank()[0]",
        "timeout = _get_default_group()._get_backend(__import__('torch').device('cpu')).options._timeout",
        "evaluate.embed_wells(lambda x: m.embed(x), data.CropDataset(sys.argv[2]), sys.argv[3], 50)",
        "written = [path for path, mode in opened if mode != 'r']",
        "open(f'{sys.argv[3]}.writes{rank}', 'w').write(repr((written, timeout.total_seconds())))",
    ]))
    out = tmp_path / "e.npy"
    torchrun(3, str(script), str(trained / "run" / "model.pt"), str(trained / "crops"), str(out))
    for rank in range(3):
        written, timeout = eval((tmp_path / f"e.npy.writes{rank}").read_text())
        assert timeout == 24 * 3600
        own = {f"{out}.part{rank}.tmp.npy"} | ({f"{out}.tmp.npy"} if rank == 0 else set())
        assert set(written) == own, (rank, written)
