"""
Speed, printed as figures.

    python bench.py                                   # CPU: our step vs Hugging Face ViTMAE, vits16
    python bench.py --presets vits16,vitl8,vitg8 --parallel fsdp --activation_checkpointing --compile blocks
    python bench.py recall --genes 20000 --dims 1664  # evaluate.py's recall vs efaar-benchmarking's
    python bench.py probe                             # probe.py's block sweep vs a naive one

1. The step of our MAE against `transformers`' ViTMAEForPreTraining (the MAE users reach for
   today; an optional, benchmark-only dependency) at the same size and standard tokenization, random
   weights, one process, same batch, measured in this run: their time / our time. Twice: as the
   paper trains it (parallel blocks, QK-norm, LayerScale, MSE + Fourier loss), and in HF's form
   (sequential blocks, MSE only), which does the same work as theirs.
2. train.py itself, per preset, on 256x256x6 random crops prepared by data.py: steps/s, crops/s,
   tokens/s, MFU and peak memory, read from its log.
3. `recall`: known-relationship recall on a whole-genome-sized map (real gene symbols, random
   clustered features), all five sources: evaluate.py vs efaar-benchmarking's
   known_relationship_benchmark (benchmark-only: pandas, scikit-learn, scipy, geomloss), same map,
   same run, numbers checked identical.
4. `probe`: probe.py's block search (one model pass for all blocks, torch L-BFGS per block) vs the
   naive one (re-embed the crops up to each block, scikit-learn's LogisticRegression per block and
   penalty), same model (the demo architecture, standard tokens, at --depth), same synthetic screen,
   same run.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data
import evaluate
import synth
from data import random_dataset
from model import MAEConfig, build, save_consolidated

ROOT = Path(__file__).resolve().parent
PEAK_FLOPS = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak_flops():
    """bf16 dense peak of this GPU from the table above (None on a CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS.items() if key.replace(" ", "") in name.replace(" ", "")), None)


def hf_model(config):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    return ViTMAEForPreTraining(ViTMAEConfig(
        hidden_size=config.dim, num_hidden_layers=config.depth, num_attention_heads=config.heads,
        intermediate_size=config.mlp_dim, image_size=config.img_size, patch_size=config.patch_size,
        num_channels=config.in_chans, decoder_hidden_size=config.dec_dim, decoder_num_hidden_layers=config.dec_depth,
        decoder_num_attention_heads=config.dec_heads, decoder_intermediate_size=config.dec_mlp_dim,
        mask_ratio=config.mask_ratio, attn_implementation="sdpa"))


def seconds_per_step(contenders, steps, device, dtype):
    """Median wall time of forward + backward + AdamW step for each (model, loss_of, x), after two
    warm-up steps. The contenders take turns, one step each per round, so drift in the machine's
    speed lands on all of them alike."""
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    optimizers = {name: torch.optim.AdamW(model.to(device).train().parameters(), lr=1e-4, fused=device == "cuda")
                  for name, (model, _, _) in contenders.items()}
    times = {name: [] for name in contenders}
    for _ in range(steps + 2):
        for name, (model, loss_of, x) in contenders.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast:
                loss = loss_of(model, x)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t[2:])[len(t[2:]) // 2] for name, t in times.items()}


def compare_with_hf(preset, batch_size, steps, device, dtype, compile):
    config = MAEConfig.from_preset(preset, channel_agnostic=False, drop_path=0.0)
    x = torch.randint(0, 256, (batch_size, config.in_chans, config.img_size, config.img_size), dtype=torch.uint8).to(device)
    ours = build(config, verbose=False)
    ours_as_hf = build(MAEConfig.from_preset(preset, channel_agnostic=False, drop_path=0.0, parallel_blocks=False,
                                             qk_norm=False, qkv_bias=True, layerscale_init=0.0, fourier_weight=0.0),
                       verbose=False)
    if compile:
        ours.compile()
        ours_as_hf.compile()
    ours_loss = lambda model, x: model(x)[0]
    hf_loss = lambda model, x: model(pixel_values=x).loss
    results = seconds_per_step({
        "ours (paper blocks)": (ours, ours_loss, x),
        "ours (HF's blocks, MSE)": (ours_as_hf, ours_loss, x),
        # HF takes float pixels and does not standardize them; ours does it inside the model
        "transformers ViTMAE": (hf_model(config), hf_loss, x.float() / 255),
    }, steps, device, dtype)
    reference = results["transformers ViTMAE"]
    print(f"\n{preset}, standard tokenization, batch {batch_size}, {device} {dtype}, compile {compile}, median of {steps} steps")
    print(f"{'model':24} {'s/step':>8} {'crops/s':>8} {'speed vs transformers':>22}")
    for name, seconds in results.items():
        print(f"{name:24} {seconds:8.3f} {batch_size / seconds:8.1f} {reference / seconds:21.2f}x")


def train_figures(presets, parallel, steps, batch_size, extra):
    """Run train.py per preset on random 256x256x6 crops; print its throughput from the log."""
    with tempfile.TemporaryDirectory() as tmp:
        crops = random_dataset(Path(tmp) / "random", crops=max(2048, 2 * batch_size))
        peak = device_peak_flops()
        print(f"\ntrain.py, {parallel}, {steps} steps, batch {batch_size}, {torch.cuda.get_device_name() if peak else 'cpu'}"
              f" (peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s bf16)")
        print(f"{'preset':8} {'steps/s':>8} {'crops/s':>8} {'tokens/s':>10} {'MFU':>6} {'memory GiB':>11}")
        for preset in presets:
            out = Path(tmp) / preset
            args = [f"--preset={preset}", "--channel_agnostic=False", f"--data={crops}", f"--out_dir={out}",
                    f"--max_steps={steps}", f"--batch_size={batch_size}", f"--global_batch={batch_size}",
                    f"--parallel={parallel}", "--log_interval=1", "--log_file=log.jsonl", f"--ckpt_interval={10 ** 9}",
                    f"--peak_flops={peak or 1.0}"] + extra
            launcher = [sys.executable] if parallel == "none" else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
            run = subprocess.run(launcher + [str(ROOT / "train.py")] + args, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"{preset:8} failed: {run.stderr.strip().splitlines()[-1]}")
                continue
            log = [json.loads(line) for line in open(out / "log.jsonl")][2:]  # the first steps compile and warm up
            dt = sorted(r["dt"] for r in log)[len(log) // 2]
            r = log[-1]
            mfu = f"{r['mfu'] * 100:5.1f}%" if peak else "    -"
            print(f"{preset:8} {1 / dt:8.2f} {batch_size / dt:8.1f} {r['tokens_per_s'] * r['dt'] / dt:10.0f} {mfu:>6} {r['memory_gib']:11.1f}")


def efaar_reference():
    """efaar-benchmarking's benchmarking module (the reference implementation), imported from its wheel,
    which evaluate.annotation_tables() keeps (its own dependencies are not installed: scvi-tools and co.)."""
    annotations = evaluate.annotation_tables()
    wheel = next(annotations.parent.glob("efaar_benchmarking-*.whl"), None) if annotations else None
    if wheel is None and annotations:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(annotations.parent), evaluate.ANNOTATION_PACKAGE]
        subprocess.run(pip, check=True, capture_output=True)
        wheel = next(annotations.parent.glob("efaar_benchmarking-*.whl"))
    if str(wheel) not in sys.path:
        sys.path.insert(0, str(wheel))  # a pure-Python wheel imports as a zip
    import efaar_benchmarking.benchmarking
    return efaar_benchmarking.benchmarking


def recall_figures(genes, dims, seed=0):
    """Our known_relationship_recall vs the reference on the same map: seconds, ratio, identical?"""
    import pandas as pd
    from sklearn.utils import Bunch
    reference = efaar_reference()
    annotations = evaluate.annotation_tables()
    symbols = sorted({g for s in evaluate.SOURCES for g in np.concatenate(evaluate.read_relationships(str(annotations), s))})
    symbols += [f"UNANNOTATED-{i}" for i in range(max(0, genes - len(symbols)))]
    rng = np.random.default_rng(seed)
    labels = rng.choice(symbols, genes, replace=False)
    centers = rng.normal(size=(100, dims))
    features = centers[rng.integers(0, 100, genes)] * rng.uniform(0, 0.5, (genes, 1)) + rng.normal(size=(genes, dims))
    evaluate.read_relationships.cache_clear()  # both sides read the tables inside the timing
    start = time.perf_counter()
    ours = evaluate.known_relationship_recall(features, labels, annotations_dir=annotations)
    our_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs = reference.known_relationship_benchmark(
        Bunch(features=pd.DataFrame(features), metadata=pd.DataFrame({"gene": labels})), "gene",
        benchmark_data_dir=str(annotations))
    their_seconds = time.perf_counter() - start
    identical = all(ours[r["source"]]["n_pairs"] == r["query_distribution_size"]
                    and ours[r["source"]][k] == r[k] for r in theirs.to_dict("records")
                    for k in ("recall_0.05_0.95", "recall_0.1_0.9"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nknown-relationship recall, {genes} genes x {dims} dims, {len(theirs)} sources, {device}")
    print(f"{'source':10} {'pairs':>7} {'recall 5/95':>12} {'recall 10/90':>13}")
    for source, r in ours.items():
        print(f"{source:10} {r['n_pairs']:7d} {r['recall_0.05_0.95']:12.6f} {r['recall_0.1_0.9']:13.6f}")
    print(f"evaluate.py {our_seconds:.1f} s, efaar-benchmarking {their_seconds:.1f} s: {their_seconds / our_seconds:.1f}x "
          f"faster, numbers {'identical' if identical else 'DIFFERENT'}")


def probe_figures(depth, seed=0):
    """Whole block sweep, ours vs naive, on the demo screen with a random-init demo-architecture model."""
    import probe
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth.synth(tmp / "synth", size="demo", seed=seed)
        crops = data.prepare(tmp / "synth" / "images", tmp / "synth" / "metadata.csv", tmp / "crops", crop_size=64)
        config = dict(channel_agnostic=False, img_size=64, patch_size=8, dim=128, depth=depth,
                      heads=4, mlp_dim=512, dec_dim=128, dec_depth=2, dec_heads=4, dec_mlp_dim=256)
        model = build(MAEConfig.from_preset("vits16", **config), verbose=False)
        save_consolidated(tmp / "model.pt", model.config, model.state_dict())
        grid = (1e-1, 1e-2, 1e-3, 1e-4)
        start = time.perf_counter()
        features, wells = probe.block_features(tmp / "model.pt", crops, tmp / "probe")
        labels = probe.task_labels(wells, "perturbation")
        train, validation, _ = probe.split_wells(wells, "experiment")
        ours = probe.sweep(features, labels, train, validation, list(range(1, depth + 1)), grid)
        our_seconds = time.perf_counter() - start
        start = time.perf_counter()
        dataset = data.CropDataset(crops)
        naive = {}
        used = labels != ""
        for block in range(1, depth + 1):  # what one writes without the single pass: re-embed per block
            z = evaluate.embed_wells(lambda x: model.eval().embed(x, [block]), dataset, tmp / "naive.npy")[0][0]
            x = np.asarray(z, np.float32)
            x = (x - x[train & used].mean(0)) / (x[train & used].std(0) + 1e-6)
            seen = validation & used & np.isin(labels, labels[train & used])
            naive[block] = max(balanced_accuracy_score(labels[seen], LogisticRegression(
                C=1 / (l2 * (train & used).sum()), max_iter=1000).fit(x[train & used], labels[train & used]).predict(x[seen]))
                for l2 in grid)
        naive_seconds = time.perf_counter() - start
    print(f"\nblock sweep, {depth} blocks, {len(wells)} wells of the demo screen, task perturbation, "
          f"{len(grid)} penalties, cpu {torch.get_num_threads()} threads")
    print(f"{'block':>5} {'ours bal.acc':>13} {'naive bal.acc':>14}")
    for block in ours:
        print(f"{block:5d} {ours[block]['balanced_accuracy']:13.3f} {naive[block]:14.3f}")
    print(f"probe.py {our_seconds:.1f} s, naive {naive_seconds:.1f} s: {naive_seconds / our_seconds:.1f}x faster")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    parser.add_argument("suite", nargs="?", default="train", choices=["train", "recall", "probe"], help="which figures")
    parser.add_argument("--depth", type=int, default=12, help="probe: blocks of the model")
    parser.add_argument("--genes", type=int, default=20000, help="recall: perturbations in the map")
    parser.add_argument("--dims", type=int, default=1664, help="recall: embedding dimensions")
    parser.add_argument("--presets", default="vits16", help="train: comma-separated model.PRESETS keys")
    parser.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"], help="train: train.py's parallel")
    parser.add_argument("--batch_size", type=int, default=8, help="train: crops per step")
    parser.add_argument("--steps", type=int, default=5, help="train: timed steps (the median is printed)")
    parser.add_argument("--compile", default="none", choices=["none", "blocks", "model"], help="train: train.py's compile")
    parser.add_argument("--activation_checkpointing", action="store_true", help="train: recompute each block in the backward pass")
    parser.add_argument("--skip_hf", action="store_true", help="only the train.py figures")
    parser.add_argument("--skip_train", action="store_true", help="only the comparison with transformers")
    args = parser.parse_args()
    if args.suite in ("recall", "probe"):
        recall_figures(args.genes, args.dims) if args.suite == "recall" else probe_figures(args.depth)
        sys.exit()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    if not args.skip_hf:
        for preset in args.presets.split(","):
            compare_with_hf(preset, args.batch_size, args.steps, device, dtype, args.compile != "none")
    extra = [f"--compile={args.compile}", f"--activation_checkpointing={args.activation_checkpointing}"]
    if not args.skip_train:
        train_figures(args.presets.split(","), args.parallel, args.steps + 3, args.batch_size, extra)
