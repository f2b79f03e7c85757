"""
The main job end to end on the built-in synthetic screen, one command:

    python demo.py                                           # the demo screen, ~11 minutes on a 2-core CPU
    python demo.py --max_steps=600 --snapshot_interval=300   # what tests/test_demo.py runs (~5 minutes)
    python demo.py --size tests --max_steps=300              # the small screen: the path only (~2 minutes)
    python demo.py --screen_seed=1 --seed=7                  # another screen, another training seed
    python demo.py --seeds 3 --channels                      # 3 training seeds, and the channel study (~1 hour)
    python demo.py --size large --config config/demo_gpu.py  # CA-MAE-S/16 on the large screen, one GPU

Every step is a command of this project, printed before it runs, so any one of them can be re-run or
changed by hand; a step whose output is already there is skipped (delete OUT to start over):
  1. synth.py           a Cell-Painting-like CRISPR screen with planted biology (real CORUM complexes)
  2. data.py prepare    TIFFs -> shards of 32x32 crops (config/demo.py's img_size)
  3. train.py           pretrain the demo channel-agnostic MAE (config/demo.py), with reconstruction grids,
                        once per seed (--seeds); and the same network untrained (train.py --max_steps=0)
  4. probe.py --trim    the block search, on the trained networks and on the untrained one
  5. evaluate.py        the benchmarks of five maps of the same screen: the trained MAE at its best and at
                        its last block, the untrained network at its best block (these three from probe.py's
                        cache of every block), hand-crafted features, and the planted phenotypes themselves
                        (the ceiling: no image, no noise); and every block of the trained MAE, for the
                        Spearman correlation between the probe's and the recall's ranking of the blocks
  6. one table side by side -> OUT/table.md, table.json (with --seeds N, the trained rows as mean ± sd);
                        pictures: OUT/train/recon_*.png, OUT/train/loss.png, and with matplotlib
                        OUT/probe/probe.png (trained vs untrained per block) and OUT/eval_trained_best/map.png
  7. with --channels    channel_study: stains left out at inference, channel_sampling, the standard MAE,
                        a 5-stain JUMP-like plate mixed in -> OUT/channels/table.md
Extra --key=value arguments go to train.py (e.g. --max_steps=500, --seed=7); --screen_seed is the screen's.
"""

import argparse
import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

import data
import evaluate
import synth
from evaluate import SOURCES

TRAIN_SEED = 1337  # train.py's default seed, the demo's first unless --seed=N is given


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


def fmt(value):
    """A table cell: a number to 3 decimals, (mean, sd) as mean ± sd, None as -."""
    if value is None:
        return "-"
    if isinstance(value, (tuple, list)):
        return f"{value[0]:.3f} ± {value[1]:.3f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(header, keys, rows):
    """A markdown table: the header, then a line per row of its values at `keys` (fmt)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]) + "\n"


def table_markdown(rows, consistency_p):
    header = ["map", "block", *(f"{s} 5/95" for s in SOURCES), f"consistent p<{consistency_p:g}", "KS", "probe bal.acc", "compound AP"]
    keys = ["map", "block", *SOURCES, "consistent", "ks", "probe", "compound_ap"]
    chance = rows[0]["chance"]
    return markdown(header, keys, rows) + (f"\nchance: recall 0.100 (a random pair is in the top 5% or bottom 5% one time "
                                           f"in ten), probe {chance['probe']:.3f}, compound AP {fmt(chance['compound_ap'])}\n")


def scored(network, stains, where, ckpt, crops, keep, benchmarks, probe_args):
    """A row of the channel study: evaluate.py on the network's last block seeing the stains `keep` (None:
    all) of `crops`, and the group probe on that map."""
    if not (where / "report.json").exists():
        run("evaluate.py", "--ckpt", ckpt, "--data", crops, *(["--channels", ",".join(keep)] if keep else []),
            *benchmarks, "--out", where)
    if not (where / "probe" / "probe.json").exists():
        run("probe.py", "--embeddings", where / "embeddings.npy", "--metadata", where / "wells.csv", *probe_args,
            "--out", where / "probe")
    probe_result = json.loads((where / "probe" / "probe.json").read_text())["curves"]["group"]["1"]
    return dict(network=network, stains=stains, **row(network, "last", where, probe_result))


def channel_study(out, args, crop_size, benchmarks, consistency_p, split, train_args):
    """What a map is worth when a stain is missing, and one CA-MAE trained on screens of 6 and of 5 stains
    -> OUT/channels/table.md, table.json. The networks, each trained as the demo's (train_args): the demo
    CA-MAE itself (OUT/train), the same with channel_sampling, the standard-tokenization MAE, and a CA-MAE
    trained on the screen and on the same screen as a JUMP plate (synth.py --channels 5: DNA, ER, RNA, AGP
    with Golgi, Mito; read from its LoadData CSV), 1:1. Each of the first three is shown all 6 stains, each
    one left out, and DNA, AGP and Mito alone (a 3-stain panel); a stain the standard MAE misses is a
    blank image. Scored at the last block: recall, consistency and the group probe."""
    study, screen, crops = out / "channels", out / "synth", out / "crops"
    jump, jump_crops = out / "jump", out / "jump_crops"
    if not (jump / "load_data.csv").exists():
        run("synth.py", "--size", args.size, "--seed", args.screen_seed, "--replicates", args.replicates,
            "--channels", 5, "--out", jump)
    if not (jump_crops / "meta.json").exists():
        run("data.py", "prepare", "--load_data", jump / "load_data.csv", "--metadata", jump / "metadata.csv",
            "--out", jump_crops, "--crop_size", crop_size)
    networks = {"CA-MAE": (out / "train", crops, []),
                "CA-MAE, channel_sampling": (study / "sampled", crops, ["--channel_sampling=True"]),
                "standard MAE": (study / "standard", crops, ["--channel_agnostic=False", "--channelwise_embeddings=False"]),
                "CA-MAE, 6-stain + JUMP screens": (study / "mixed", f"{crops},{jump_crops}", ["--data_weights=1,1"])}
    for train_dir, data_arg, extra in networks.values():
        if not (train_dir / "model.pt").exists():
            run("train.py", args.config, f"--data={data_arg}", f"--out_dir={train_dir}", *train_args, *extra)
    views = {"all 6": None, **{f"without {c}": [k for k in synth.CHANNELS if k != c] for c in synth.CHANNELS},
             "DNA, AGP, Mito": ["DNA", "AGP", "Mito"]}
    probe_args, rows = ["--task", "group", "--groups", screen / "gene_groups.csv", *split], []
    for n, (network, (train_dir, _, _)) in enumerate(networks.items()):
        shown = {"all 6": None} if network.endswith("JUMP screens") else views
        for v, (view, keep) in enumerate(shown.items()):
            rows.append(scored(network, view, study / f"eval_{n}_{v}", train_dir / "model.pt", crops, keep, benchmarks, probe_args))
        if network in ("CA-MAE", "CA-MAE, 6-stain + JUMP screens"):
            rows.append(scored(network, "JUMP plate, its 5 stains", study / f"eval_{n}_jump", train_dir / "model.pt",
                               jump_crops, None, benchmarks, probe_args))
    header = ["network", "stains seen", "CORUM 5/95", "StringDB 5/95", f"consistent p<{consistency_p:g}", "probe bal.acc"]
    keys = ["network", "stains", "CORUM", "StringDB", "consistent", "probe"]
    text = markdown(header, keys, rows)
    data.write_json(study / "table.json", dict(rows=rows, train_args=train_args))
    data.write_atomic(study / "table.md", lambda f: f.write(text.encode()))
    print(f"\n{text}\n{study / 'table.md'}")


def spread(values):
    """Mean and sample standard deviation of the values that are numbers (not None or NaN, e.g. the recall
    of a source with no pair in the screen); one value is itself, none is None."""
    values = [v for v in values if v is not None and v == v]
    if len(values) < 2:
        return values[0] if values else None
    mean = sum(values) / len(values)
    return (mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5)


def over_seeds(name, rows):
    """One table row from the same row of several training seeds: each number as (mean, sd), the blocks listed."""
    numbers = ["CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB", "consistent", "ks", "probe", "compound_ap"]
    return dict(map=name, block=",".join(str(r["block"]) for r in rows), chance=rows[0]["chance"],
                **{k: spread([r[k] for r in rows]) for k in numbers})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    parser.add_argument("--size", default="demo", choices=sorted(synth.SYNTH_SIZES), help="of the synthetic screen")
    parser.add_argument("--out", help="folder of every step's output; None: out/demo (out/demo_SIZE for another --size)")
    parser.add_argument("--screen_seed", type=int, default=0, help="of the synthetic screen (--seed=N goes to train.py)")
    parser.add_argument("--replicates", type=int, default=1, help="wells per gene per experiment in the screen")
    parser.add_argument("--config", default="config/demo.py", help="train.py's config; its img_size is the crops' size")
    parser.add_argument("--seeds", type=int, default=1, help="train the MAE with this many seeds (--seed=N and the next "
                        "ones): the trained rows become the mean and standard deviation over them")
    parser.add_argument("--channels", action="store_true", help="then the channel study (channel_study): channels left "
                        "out at inference, channel_sampling, the standard MAE, a JUMP-like 5-stain screen mixed in")
    args, train_overrides = parser.parse_known_args()
    out = Path(args.out or ("out/demo" if args.size == "demo" else f"out/demo_{args.size}"))
    screen, crops, untrained_dir = out / "synth", out / "crops", out / "untrained"
    crop_size = runpy.run_path(args.config)["img_size"]
    seed = next((int(a.split("=", 1)[1]) for a in train_overrides if a.startswith("--seed=")), TRAIN_SEED)
    overrides = [a for a in train_overrides if not a.startswith("--seed=")]
    started = time.perf_counter()

    if not (screen / "metadata.csv").exists():
        run("synth.py", "--size", args.size, "--seed", args.screen_seed, "--replicates", args.replicates, "--out", screen)
    if not (crops / "meta.json").exists():
        run("data.py", "prepare", "--images", screen / "images", "--metadata", screen / "metadata.csv", "--out", crops,
            "--crop_size", crop_size, "--channels", ",".join(synth.CHANNELS))
    # The first seed's run is out/train and out/probe; another seed's out/seed_S/train and out/seed_S/probe
    seeds = [seed + k for k in range(args.seeds)]
    runs = {s: out if s == seed else out / f"seed_{s}" for s in seeds}
    for s, where in runs.items():
        if not (where / "train" / "model.pt").exists():
            run("train.py", args.config, f"--data={crops}", f"--out_dir={where / 'train'}", *overrides, f"--seed={s}")
    trained_at = time.perf_counter()
    untrained = untrained_dir / "model.pt"
    if not untrained.exists():  # the same settings, no step: train.py's initialization of the first seed
        run("train.py", args.config, f"--data={crops}", f"--out_dir={untrained_dir}", *overrides, f"--seed={seed}", "--max_steps=0")

    # Block search: the group task (which complex a gene is in), as the paper's Anax probe
    # the probe trains, chooses and tests on different experiments; the tests screen has two, so wells
    split = ["--split_col", "well"] if synth.SYNTH_SIZES[args.size]["experiments"] < 3 else []
    probe_args = ["--data", crops, "--task", "group", "--groups", screen / "gene_groups.csv", *split]
    probe_dirs = {"probe_untrained": (untrained, []),  # first: the trained curves are drawn beside it
                  **{str((where / "probe").relative_to(out)): (where / "train" / "model.pt", ["--baseline", out / "probe_untrained"])
                     for where in runs.values()}}
    for name, (ckpt, extra) in probe_dirs.items():
        if not (out / name / "probe.json").exists():
            run("probe.py", "--ckpt", ckpt, *probe_args, "--trim", *extra, "--out", out / name)
    probes = {name: json.loads((out / name / "probe.json").read_text()) for name in probe_dirs}

    # Benchmarks: every map aligned (TVN on controls, per plate) and scored the same way. The networks'
    # blocks come from probe.py's cache (what evaluate.py --ckpt trimmed.pt computes, without embedding
    # every crop again)
    # the demo's 48 null genes resolve p down to 1/48: consistency is counted at p < 0.05, not 0.01 (the
    # tests screen's 8 at p < 1/8)
    consistency_p = max(0.05, 1 / synth.SYNTH_SIZES[args.size]["null_genes"])
    benchmarks = ["--null_perturbations", screen / "null_genes.txt", "--consistency_p", consistency_p,
                  "--compound_activity", screen / "compound_activity.csv"]
    cached = lambda probe_dir, block: ["--embeddings", out / probe_dir / "features.npy", "--metadata",
                                       out / probe_dir / "wells.csv", "--block", block]
    curve = lambda probe_dir, block: probes[probe_dir]["curves"]["group"][str(block)]
    best_untrained = probes["probe_untrained"]["best_block"]["group"]
    maps = {"untrained": cached("probe_untrained", best_untrained),
            "handcrafted": ["--features", "handcrafted", "--data", crops],
            "planted": ["--embeddings", screen / "planted.npy", "--metadata", screen / "planted.csv"]}
    seed_rows, agreement = [], []
    for where in runs.values():
        probe_dir = str((where / "probe").relative_to(out))
        best, depth = probes[probe_dir]["best_block"]["group"], len(probes[probe_dir]["curves"]["group"])
        evals = {"trained_best": best, "trained_last": depth, "blocks": "all"}  # all: every block, for the agreement
        for name, block in evals.items():
            if not (where / f"eval_{name}" / ("blocks.csv" if block == "all" else "report.json")).exists():
                run("evaluate.py", *cached(probe_dir, block), *benchmarks, "--out", where / f"eval_{name}")
        seed_rows.append([row("MAE trained, best block", best, where / "eval_trained_best", curve(probe_dir, best)),
                          row("MAE trained, last block", depth, where / "eval_trained_last", curve(probe_dir, depth))])
        # The paper's case for the block search: per-block probe accuracy ranks the blocks as per-block
        # recall does (Spearman 0.97 with StringDB over MAE-G/8's 48 blocks)
        per_block = data.read_csv(where / "eval_blocks" / "blocks.csv")
        accuracy = [curve(probe_dir, int(r["block"]))["balanced_accuracy"] for r in per_block]
        agreement.append({s: evaluate.spearman(accuracy, [float(r[f"{s} recall 5/95"]) for r in per_block]) for s in SOURCES})
    for name, source in maps.items():
        if not (out / f"eval_{name}" / "report.json").exists():
            run("evaluate.py", *source, *benchmarks, "--out", out / f"eval_{name}")
    # The probe of the maps that are not a network's blocks
    for name, embeddings, metadata in (("handcrafted", out / "eval_handcrafted" / "embeddings.npy", out / "eval_handcrafted" / "wells.csv"),
                                       ("planted", screen / "planted.npy", screen / "planted.csv")):
        if not (out / f"probe_{name}" / "probe.json").exists():
            run("probe.py", "--embeddings", embeddings, "--metadata", metadata, "--task", "group",
                "--groups", screen / "gene_groups.csv", *split, "--out", out / f"probe_{name}")
        probes[f"probe_{name}"] = json.loads((out / f"probe_{name}" / "probe.json").read_text())

    trained = seed_rows[0] if len(seeds) == 1 else [over_seeds(r[0]["map"], r) for r in zip(*seed_rows)]
    rows = [*trained,
            row("same MAE untrained", best_untrained, out / "eval_untrained", curve("probe_untrained", best_untrained)),
            row("hand-crafted features", "-", out / "eval_handcrafted", curve("probe_handcrafted", 1)),
            row("planted truth (ceiling)", "-", out / "eval_planted", curve("probe_planted", 1))]
    agreement_line = "block search: Spearman correlation over the blocks between probe balanced accuracy and recall 5/95: " + \
        ", ".join(f"{s} {fmt(spread([a[s] for a in agreement]))}" for s in SOURCES) + " (paper: 0.97 with StringDB)"
    text = table_markdown(rows, consistency_p) + (f"trained rows: mean ± standard deviation over training seeds {', '.join(map(str, seeds))}\n"
                                   if len(seeds) > 1 else "") + f"\n{agreement_line}\n"
    data.write_json(out / "table.json", dict(rows=rows, size=args.size, train_overrides=train_overrides, seeds=seeds,
                                             seed_rows=seed_rows, block_agreement=agreement,
                                             seconds=dict(to_trained=round(trained_at - started, 1),
                                                          total=round(time.perf_counter() - started, 1))))
    data.write_atomic(out / "table.md", lambda f: f.write(text.encode()))
    drawn = [out / "probe" / "probe.png", out / "eval_trained_best" / "map.png"]  # need matplotlib; the others do not
    pictures = [str(p) for p in [*drawn, out / "train" / "loss.png", *sorted((out / "train").glob("recon_*.png"))] if p.exists()]
    skipped = "" if all(p.exists() for p in drawn) else \
        f" (skipped {', '.join(str(p) for p in drawn if not p.exists())}: they need matplotlib, pip install matplotlib)"
    print(f"\n{text}\n{out / 'table.md'}; pictures: {', '.join(pictures)}{skipped}; {time.perf_counter() - started:.0f} s")
    if args.channels:
        channel_study(out, args, crop_size, benchmarks, consistency_p, split, overrides + [f"--seed={seed}"])


if __name__ == "__main__":
    main()
