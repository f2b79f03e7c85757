"""
The main job end to end on the built-in synthetic screen, one command:

    python demo.py                                           # the demo screen, 7-9 minutes on a 2-core CPU
    python demo.py --max_steps=600 --snapshot_interval=300   # what tests/test_demo.py runs (~4 minutes)
    python demo.py --size tests --max_steps=300              # the small screen: the path only (~2 minutes)
    python demo.py --screen_seed=1 --seed=7                  # another screen, another training seed

Every step is a command of this project, printed before it runs, so any one of them can be re-run or
changed by hand; a step whose output is already there is skipped (delete OUT to start over):
  1. synth.py           a Cell-Painting-like CRISPR screen with planted biology (real CORUM complexes)
  2. data.py prepare    TIFFs -> shards of 32x32 crops (config/demo.py's img_size)
  3. train.py           pretrain the demo channel-agnostic MAE (config/demo.py), with reconstruction grids;
                        and the same network untrained (train.py --max_steps=0: its initialization, same seed)
  4. probe.py --trim    the block search, on the trained network and on the untrained one
  5. evaluate.py        the benchmarks of five maps of the same screen: the trained MAE at its best and at
                        its last block, the untrained network at its best block (these three from probe.py's
                        cache of every block), hand-crafted features, and the planted phenotypes themselves
                        (the ceiling: no image, no noise)
  6. one table side by side -> OUT/table.md, table.json; pictures: OUT/train/recon_*.png, OUT/train/loss.png,
                        and with matplotlib OUT/probe/probe.png (trained vs untrained per block) and
                        OUT/eval_trained_best/map.png (the gene map in 2-D, coloured by complex)
Extra --key=value arguments go to train.py (e.g. --max_steps=500, --seed=7); --screen_seed is the screen's.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import data
import synth
from evaluate import SOURCES


def run(*args):
    """Run one project command as a user would, echoing it; a failed step stops the demo."""
    command = [sys.executable, *map(str, args)]
    print(f"\n$ python {' '.join(map(str, args))}", flush=True)
    if subprocess.run(command).returncode:
        raise SystemExit(f"demo: step failed: python {' '.join(map(str, args))}")


def row(name, block, report_dir, probe_result):
    """One line of the table from evaluate.py's report.json and a probe.py result for the same map."""
    report = json.loads((Path(report_dir) / "report.json").read_text())
    consistency, compounds = report["consistency"], report.get("compound_gene", {})
    return dict(map=name, block=block,
                **{s: report["recall"].get(s, {}).get("recall_0.05_0.95") for s in SOURCES},
                consistent=consistency["fraction_p_below"], ks=consistency["ks"],
                probe=probe_result["balanced_accuracy"], compound_ap=compounds.get("ap"),
                chance=dict(probe=probe_result["chance_balanced"], compound_ap=compounds.get("random_ap")))


def table_markdown(rows):
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    header = ["map", "block", *(f"{s} 5/95" for s in SOURCES), "consistent p<0.05", "KS", "probe bal.acc", "compound AP"]
    keys = ["map", "block", *SOURCES, "consistent", "ks", "probe", "compound_ap"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    chance = rows[0]["chance"]
    lines.append(f"\nchance: recall 0.100 (a random pair is in the top 5% or bottom 5% one time in ten), "
                 f"probe {chance['probe']:.3f}, compound AP {fmt(chance['compound_ap'])}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    parser.add_argument("--size", default="demo", choices=sorted(synth.SYNTH_SIZES), help="of the synthetic screen")
    parser.add_argument("--out", help="folder of every step's output; None: out/demo (out/demo_tests for --size tests)")
    parser.add_argument("--screen_seed", type=int, default=0, help="of the synthetic screen (--seed=N goes to train.py)")
    parser.add_argument("--replicates", type=int, default=1, help="wells per gene per experiment in the screen")
    args, train_overrides = parser.parse_known_args()
    out = Path(args.out or ("out/demo" if args.size == "demo" else f"out/demo_{args.size}"))
    screen, crops, train_dir, untrained_dir = out / "synth", out / "crops", out / "train", out / "untrained"
    started = time.perf_counter()

    if not (screen / "metadata.csv").exists():
        run("synth.py", "--size", args.size, "--seed", args.screen_seed, "--replicates", args.replicates, "--out", screen)
    if not (crops / "meta.json").exists():
        run("data.py", "prepare", "--images", screen / "images", "--metadata", screen / "metadata.csv", "--out", crops,
            "--crop_size", 32, "--channels", ",".join(synth.CHANNELS))
    if not (train_dir / "model.pt").exists():
        run("train.py", "config/demo.py", f"--data={crops}", f"--out_dir={train_dir}", *train_overrides)
    trained_at = time.perf_counter()
    untrained = untrained_dir / "model.pt"
    if not untrained.exists():  # the same settings, no step: train.py's initialization of the same seed
        run("train.py", "config/demo.py", f"--data={crops}", f"--out_dir={untrained_dir}", *train_overrides, "--max_steps=0")

    # Block search: the group task (which complex a gene is in), as the paper's Anax probe
    probe_args = ["--data", crops, "--task", "group", "--groups", screen / "gene_groups.csv", "--trim"]
    for name, ckpt, extra in (("probe_untrained", untrained, []),  # first: the trained curve is drawn beside it
                              ("probe", train_dir / "model.pt", ["--baseline", out / "probe_untrained"])):
        if not (out / name / "probe.json").exists():
            run("probe.py", "--ckpt", ckpt, *probe_args, *extra, "--out", out / name)
    probes = {name: json.loads((out / name / "probe.json").read_text()) for name in ("probe", "probe_untrained")}

    # Benchmarks: every map aligned (TVN on controls, per plate) and scored the same way. The networks'
    # blocks come from probe.py's cache (what evaluate.py --ckpt trimmed.pt computes, without embedding
    # every crop again)
    # the 48 null genes resolve p down to 1/48: consistency is counted at p < 0.05, not 0.01
    benchmarks = ["--null_perturbations", screen / "null_genes.txt", "--consistency_p", "0.05",
                  "--compound_activity", screen / "compound_activity.csv"]
    best, depth = probes["probe"]["best_block"]["group"], len(probes["probe"]["curves"]["group"])
    best_untrained = probes["probe_untrained"]["best_block"]["group"]
    cached = lambda name, block: ["--embeddings", out / name / "features.npy", "--metadata", out / name / "wells.csv", "--block", block]
    maps = {"trained_best": cached("probe", best),
            "trained_last": cached("probe", depth),
            "untrained": cached("probe_untrained", best_untrained),
            "handcrafted": ["--features", "handcrafted", "--data", crops],
            "planted": ["--embeddings", screen / "planted.npy", "--metadata", screen / "planted.csv"]}
    for name, source in maps.items():
        if not (out / f"eval_{name}" / "report.json").exists():
            run("evaluate.py", *source, *benchmarks, "--out", out / f"eval_{name}")
    # The probe of the maps that are not a network's blocks
    for name, embeddings, metadata in (("handcrafted", out / "eval_handcrafted" / "embeddings.npy", out / "eval_handcrafted" / "wells.csv"),
                                       ("planted", screen / "planted.npy", screen / "planted.csv")):
        if not (out / f"probe_{name}" / "probe.json").exists():
            run("probe.py", "--embeddings", embeddings, "--metadata", metadata, "--task", "group",
                "--groups", screen / "gene_groups.csv", "--out", out / f"probe_{name}")
        probes[f"probe_{name}"] = json.loads((out / f"probe_{name}" / "probe.json").read_text())

    curve = lambda name, block: probes[name]["curves"]["group"][str(block)]
    rows = [row("MAE trained, best block", best, out / "eval_trained_best", curve("probe", best)),
            row("MAE trained, last block", depth, out / "eval_trained_last", curve("probe", depth)),
            row("same MAE untrained", best_untrained, out / "eval_untrained", curve("probe_untrained", best_untrained)),
            row("hand-crafted features", "-", out / "eval_handcrafted", curve("probe_handcrafted", 1)),
            row("planted truth (ceiling)", "-", out / "eval_planted", curve("probe_planted", 1))]
    text = table_markdown(rows)
    data.write_json(out / "table.json", dict(rows=rows, size=args.size, train_overrides=train_overrides,
                                             seconds=dict(to_trained=round(trained_at - started, 1),
                                                          total=round(time.perf_counter() - started, 1))))
    data.write_atomic(out / "table.md", lambda f: f.write(text.encode()))
    drawn = [out / "probe" / "probe.png", out / "eval_trained_best" / "map.png"]  # need matplotlib; the others do not
    pictures = [str(p) for p in [*drawn, train_dir / "loss.png", *sorted(train_dir.glob("recon_*.png"))] if p.exists()]
    skipped = "" if all(p.exists() for p in drawn) else \
        f" (skipped {', '.join(str(p) for p in drawn if not p.exists())}: they need matplotlib, pip install matplotlib)"
    print(f"\n{text}\n{out / 'table.md'}; pictures: {', '.join(pictures)}{skipped}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
