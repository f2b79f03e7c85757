"""
Speed, printed as figures.

    python bench.py                                   # train.py's throughput, vits16 (add --hf: against transformers' ViTMAE)
    python bench.py gpu                               # the GPU bench, one command: vits16-ca, vitl8, vitg8 on one GPU
    python bench.py lion                              # Lion's step on vitg8's shards: a loop vs foreach
    python bench.py recall --genes 20000 --dims 1664  # evaluate.py's recall vs efaar-benchmarking's
    python bench.py recall --maps random --reference cpu   # on a GPU: recall there, checked against the CPU
    python bench.py probe                             # probe.py's block sweep vs a naive one
    python bench.py probe --depth 48 --crop_size 128  # the same at vitg8's depth (4x fewer crops)
    python bench.py map                               # evaluate.py's copairs mAP vs copairs, 10k and 50k profiles
    python bench.py embed --presets vitg8 --batch_size 64   # embedding crops/s and MFU (every block, one pass)
    python bench.py gallery                           # prepare of a JUMP plate from S3 on localhost vs local files

1. train.py itself, per preset, on 256x256x6 random crops prepared by data.py: steps/s, crops/s,
   tokens/s, MFU and peak memory, read from its log. With --hf, first the step of our MAE against
   `transformers`' ViTMAEForPreTraining (an optional, benchmark-only dependency) at the same size and
   standard tokenization, random weights, one process, same batch: their time / our time, as the
   paper trains it (parallel blocks, QK-norm, LayerScale, MSE + Fourier loss) and in HF's form
   (sequential blocks, MSE only), which does the same work as theirs.
2. `gpu`: on one CUDA GPU, train.py for CA-MAE-S/16, MAE-L/8 and MAE-G/8, eager and with compiled
   blocks (crops/s, MFU against the GPU's bf16 peak, peak memory), the SDPA kernel PyTorch picks for
   each, `lion` and `embed` on the GPU, and `recall` on the GPU (random and complexes maps, its numbers
   checked against the same code on the CPU).
3. `lion`: train.py's foreach Lion against the loop over parameters it replaced, on one rank's shards
   of vitg8's 732 parameters (--world_size), same tensors, taking turns.
4. `recall`: known-relationship recall, all five sources, on whole-genome-sized maps of five kinds
   (recall_map: random, planted complexes, clustered, tied duplicates, 80% unannotated): evaluate.py,
   its float32 matrix products alone (its floor), and efaar-benchmarking's
   known_relationship_benchmark (benchmark-only: pandas, scikit-learn, scipy, geomloss), same map,
   same run, numbers checked identical. Ours and its floor: the best of 5, taken in turns.
5. `probe`: probe.py's block search (one model pass for all blocks, the blocks' probes fitted as one
   stack) vs the naive one (re-embed the crops up to each block, scikit-learn's LogisticRegression
   per block and penalty), same model (the demo architecture, standard tokens, at --depth), same synthetic screen,
   same run.
6. `map`: copairs' mean average precision (phenotypic activity of a JUMP-like plate map: compounds in
   4 replicate wells, 6% DMSO) by evaluate.py and by copairs itself (benchmark-only), each side in
   its own process under the same memory limit: seconds, peak memory, and the agreement of the APs,
   mAPs and p-values.
7. `embed`: evaluate.embed_wells as probe.py and evaluate.py run it (every block from one pass, bf16
   on a GPU): crops/s and MFU per preset; `gpu` runs it for vits16-ca, vitl8 and vitg8.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import data
import evaluate
import synth
from data import random_dataset
from model import MAE, MAEConfig, build, peak_flops_of, save_consolidated

ROOT = Path(__file__).resolve().parent


def device_peak_flops():
    """bf16 dense peak of this GPU (model.PEAK_FLOPS; None on a CPU or an unknown GPU)."""
    return peak_flops_of(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


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


def train_figures(runs, parallel="none", steps=8, crops=None, overrides=()):
    """Run train.py on 256x256x6 random crops (or `crops`, a prepared dataset) for each (preset, batch
    size, extra settings) of runs, e.g. ("vits16-ca", 64, ["--compile=blocks"]) (-ca: channel-agnostic);
    print its throughput from its log (the median step after the first three, which compile and warm
    up). No checkpoint and no model.pt are written (ckpt_interval 0). overrides: more settings for every
    run (the GPU bench's dry run: tiny sizes on the CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        crops = crops or random_dataset(Path(tmp) / "random", crops=max(512, 2 * max(b for _, b, _ in runs)))
        peak = device_peak_flops() if "--device=cpu" not in overrides else None
        print(f"\ntrain.py, {parallel}, {steps} steps, {torch.cuda.get_device_name() if peak else 'cpu'}"
              f" (peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s bf16)", flush=True)
        print(f"{'preset':10} {'settings':32} {'batch':>5} {'steps/s':>8} {'crops/s':>8} {'tokens/s':>10} {'MFU':>6} {'memory GiB':>11}")
        for i, (label, batch_size, extra) in enumerate(runs):
            out = Path(tmp) / f"run{i}"
            args = [f"--preset={label.removesuffix('-ca')}", f"--channel_agnostic={label.endswith('-ca')}", f"--data={crops}",
                    f"--out_dir={out}", f"--max_steps={steps}", f"--batch_size={batch_size}", f"--global_batch={batch_size}",
                    f"--parallel={parallel}", "--log_interval=1", "--ckpt_interval=0", *overrides, *extra]
            launcher = [sys.executable] if parallel == "none" else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
            run = subprocess.run(launcher + [str(ROOT / "train.py")] + args, capture_output=True, text=True)
            shown = " ".join(extra) or "eager"
            if run.returncode != 0:
                print(f"{label:10} {shown:32} failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                continue
            log = [json.loads(line) for line in open(out / "log.jsonl")][3:]
            dt = sorted(r["dt"] for r in log)[len(log) // 2]
            r = log[-1]
            mfu = f"{r['mfu'] * 100:5.1f}%" if r["mfu"] is not None else "    -"
            print(f"{label:10} {shown:32} {batch_size:5d} {1 / dt:8.2f} {batch_size / dt:8.1f} {r['tokens_per_s'] * r['dt'] / dt:10.0f} "
                  f"{mfu:>6} {r['memory_gib']:11.1f}", flush=True)


def sdpa_backend_that_runs(config, batch_size, device="cuda", dtype=torch.bfloat16):
    """Which kernel PyTorch picks for this model's attention (its encoder's shapes on this device), read
    off the profiler's operator names."""
    tokens = (config.img_size // config.patch_size) ** 2 * (6 if config.channel_agnostic else 1)
    visible = tokens - round(config.mask_ratio * tokens) + 1
    q = torch.randn(batch_size, config.heads, visible, config.dim // config.heads, device=device, dtype=dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    names = " ".join(e.name for e in profile.events())
    return next((b for op, b in (("flash", "flash"), ("efficient", "efficient"), ("cudnn", "cudnn"), ("math", "math"))
                 if f"_scaled_dot_product_{op}" in names or (op == "math" and "attention_math" in names)), "unknown")


def lion_figures(preset="vitg8", world_size=8, steps=5, device="cpu", config=None):
    """Lion's step on one rank's shards of a preset's parameters (each split over world_size along its
    first axis, as FSDP shards them), held as DTensors as under FSDP: a loop of DTensor operations, as
    train.py had it, against the two paths of train.py's Lion on the local shards (a loop, its CPU
    path; one foreach call per operation, its GPU path; and that with the device-side skip flag train.py
    sets, which adds a masked_fill_ per gradient); same tensors, taking turns. (One process: a one-rank
    mesh, whose DTensors dispatch like any.)"""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    sys.argv = [sys.argv[0]]  # train.py reads its settings at import: none here
    from train import Lion
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device, (1,))
    with torch.device("meta"):
        shapes = [p.shape for p in MAE(config or MAEConfig.from_preset(preset)).parameters()]
    shard = lambda s: (max(1, -(-s[0] // world_size)), *s[1:]) if len(s) else s
    as_dtensor = lambda t: distribute_tensor(t, mesh, [Shard(0)])
    params = [torch.nn.Parameter(as_dtensor(torch.randn(shard(s), device=device))) for s in shapes]
    for p in params:
        p.grad = as_dtensor(torch.randn(p.shape, device=device))
    momenta = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def loop_step(local=False, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.05):
        for p, m in zip(params, momenta):
            p, grad, m = (p._local_tensor, p.grad._local_tensor, m._local_tensor) if local else (p, p.grad, m)
            p.mul_(1 - lr * weight_decay)
            p.add_(torch.sign(m.lerp(grad, 1 - beta1)), alpha=-lr)
            m.lerp_(grad, 1 - beta2)

    foreach = Lion(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, foreach=True)
    gated = Lion(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, foreach=True)
    gated.found_inf = torch.zeros((), device=device)  # as train.py steps it: the skip decided on the device
    contenders = (("loop over DTensors", loop_step), ("loop on local shards", lambda: loop_step(local=True)),
                  ("foreach on local shards", foreach.step), ("foreach with the skip flag", gated.step))
    times = {name: [] for name, _ in contenders}
    for _ in range(steps + 1):
        for name, step in contenders:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    median = {name: sorted(t[1:])[len(t[1:]) // 2] for name, t in times.items()}
    numel = sum(p.numel() for p in params)
    print(f"\nLion step on {preset}'s {len(params)} parameters sharded over {world_size} ({numel / 1e6:.0f}M per rank), "
          f"{device}, median of {steps}: " + ", ".join(f"{name} {t * 1000:.1f} ms" for name, t in median.items()))


# The GPU bench: stages in the order we most need their figures, each a process of its own under a time
# budget (seconds on one H100) and printing as it goes, so that a failure or an overrun costs its stage
# alone. Nothing is written to disk but the random crops the stages read and train.py's logs.
GPU_STAGES = (("vitg8 train, compiled blocks", 130), ("vitg8 embed", 40), ("vitl8, vits16-ca train, compiled blocks", 100),
              ("train, eager", 80), ("lion", 20), ("vitl8, vits16-ca embed", 30), ("recall", 60))
GPU_BATCH = {"vitg8": 16, "vitl8": 64, "vits16-ca": 64}  # crops per step on one GPU: vitg8 at 16 fits 80 GB unsharded
TINY = dict(img_size=32, patch_size=8, dim=64, depth=2, heads=4, mlp_dim=128, dec_dim=32, dec_depth=1, dec_heads=4,
            dec_mlp_dim=64)  # the dry run's model: every stage's code path, on a CPU, in seconds


def gpu_figures(dry_run=False):
    """The GPU bench in one command: GPU_STAGES one after the other, each stopped at its budget. With
    dry_run, the same stages on the CPU at tiny sizes (compiled with aot_eager, which runs on a CPU):
    what the suite runs, so that a script error is found before a GPU is lent."""
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("bench.py gpu needs a CUDA GPU (bench.py gpu --dry-run runs its stages on the CPU)")
    print(f"torch {torch.__version__}, {'dry run on the CPU' if dry_run else torch.cuda.get_device_name()}; "
          f"stage budgets {sum(b for _, b in GPU_STAGES)} s in all", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        crops = random_dataset(Path(tmp) / "random", crops=64 if dry_run else 512, size=32 if dry_run else 256)
        for stage, (name, budget) in enumerate(GPU_STAGES):
            start = time.perf_counter()
            command = [sys.executable, str(ROOT / "bench.py"), "gpu", f"--stage={stage}", f"--data={crops}"] + ["--dry-run"] * dry_run
            job = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)  # its train.py too
            try:
                _, errors = job.communicate(timeout=budget)
                verdict = "done" if job.returncode == 0 else f"failed: {(errors.strip().splitlines() or ['?'])[-1]}"
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, 9)
                job.communicate()
                verdict = f"stopped at its {budget} s budget"
            print(f"[stage {stage + 1}/{len(GPU_STAGES)}: {name}: {verdict}, {time.perf_counter() - start:.0f} s]", flush=True)


def gpu_stage(stage, crops, dry_run):
    """One stage of GPU_STAGES, on the crops gpu_figures wrote."""
    device = "cpu" if dry_run else "cuda"
    size = TINY if dry_run else {}
    config = lambda label: MAEConfig.from_preset(label.removesuffix("-ca"), channel_agnostic=label.endswith("-ca"), **size)
    overrides = [f"--{k}={v}" for k, v in size.items()]
    overrides += ["--device=cpu", "--dtype=float32", "--compile_backend=aot_eager"] if dry_run else []
    batch = lambda label: GPU_BATCH[label] // (8 if dry_run else 1)
    train = lambda labels, extra: train_figures([(label, batch(label), extra) for label in labels],
                                                steps=5 if dry_run else 10, crops=crops, overrides=overrides)
    kernel = lambda label: print(f"{label}: SDPA kernel at batch {batch(label)}: "
                                 f"{sdpa_backend_that_runs(config(label), batch(label), device)}", flush=True)
    if stage == 0:
        kernel("vitg8")
        train(["vitg8"], ["--compile=blocks"])
    elif stage == 1:
        embed_figures([("vitg8", config("vitg8"))], 64, crops)
    elif stage == 2:
        kernel("vitl8")
        kernel("vits16-ca")
        train(["vitl8", "vits16-ca"], ["--compile=blocks"])
    elif stage == 3:
        train(["vitg8", "vitl8", "vits16-ca"], [])
    elif stage == 4:
        lion_figures("vitg8", world_size=8, device=device, config=config("vitg8"))
    elif stage == 5:
        embed_figures([(label, config(label)) for label in ("vitl8", "vits16-ca")], 64, crops)
    else:
        recall_figures(400 if dry_run else 20000, 16 if dry_run else 1664, ("random", "complexes"), repeats=1 if dry_run else 3,
                       reference="cpu")


def embed_figures(models, batch_size, crops):
    """evaluate.embed_wells as probe.py runs it (every block from one pass, crops averaged into wells as
    they stream, bf16 on a GPU): crops/s and MFU (the encoder's matmul FLOPs, model.flops_per_crop
    with train=False, against the GPU's bf16 peak) for each (label, MAEConfig) of models, on the
    prepared dataset `crops`, after a warm-up pass."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = device_peak_flops()
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    dataset = data.CropDataset(crops)
    print(f"\nembedding (every block, one pass), {len(dataset)} crops of {dataset.channels}x{dataset.meta['crop_size']}"
          f"x{dataset.meta['crop_size']}, batch {batch_size}, {where}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in models:
            model = build(replace(config, img_size=dataset.meta["crop_size"]), device=device, verbose=False).eval()
            blocks = list(range(1, len(model.blocks) + 1))
            encode = lambda x: model.embed(x, blocks)
            evaluate.embed_wells(encode, dataset, Path(tmp) / "warm.npy", batch_size, device)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            evaluate.embed_wells(encode, dataset, Path(tmp) / "timed.npy", batch_size, device)
            if device == "cuda":
                torch.cuda.synchronize()
            rate = len(dataset) / (time.perf_counter() - start)
            mfu = f"MFU {rate * model.flops_per_crop(dataset.channels, train=False) / peak:.1%}" if peak else "MFU: no GPU peak known"
            print(f"{label:10} {rate:9.1f} crops/s  {mfu}  ({len(blocks)} blocks kept per crop)", flush=True)


def embed_presets(presets, batch_size, crops=2048):
    """bench.py embed: embed_figures for model.PRESETS keys (-ca: channel-agnostic) on random 256x256x6 crops."""
    with tempfile.TemporaryDirectory() as tmp:
        models = [(label, MAEConfig.from_preset(label.removesuffix("-ca"), channel_agnostic=label.endswith("-ca")))
                  for label in presets]
        embed_figures(models, batch_size, random_dataset(Path(tmp) / "random", crops=crops))


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


RECALL_MAPS = ("random", "complexes", "clustered", "duplicates", "unannotated")


def recall_map(kind, genes, dims, rng):
    """(features, labels) of a kind of map. random: no structure; complexes: the members of each CORUM
    complex share a direction, as a real map has them; clustered: 100 clusters of any genes; duplicates:
    a third of the rows repeat others exactly (ties in the null and in the queries); unannotated: 80% of
    the genes in no table (few queries)."""
    tables = evaluate.annotation_tables()
    annotated = sorted({g for s in evaluate.SOURCES for g in np.concatenate(evaluate.read_relationships(str(tables), s))})
    share = 0.2 if kind == "unannotated" else 1.0
    chosen = list(rng.choice(annotated, min(len(annotated), int(genes * share)), replace=False))
    labels = np.array(chosen + [f"UNANNOTATED-{i}" for i in range(genes - len(chosen))])
    x = rng.normal(size=(genes, dims))
    if kind == "complexes":
        row = {g: i for i, g in enumerate(labels)}
        for members in evaluate.corum_complexes(tables).values():
            rows = [row[g] for g in members if g in row]
            x[rows] += 1.5 * rng.normal(size=dims)
    elif kind == "clustered":
        x += rng.normal(size=(100, dims))[rng.integers(0, 100, genes)] * rng.uniform(0, 0.5, (genes, 1)) * 2
    elif kind == "duplicates":
        copies = rng.choice(genes, genes // 3, replace=False)
        x[copies] = x[rng.integers(0, genes, len(copies))]
    return x, labels


def matrix_product_seconds(features, device):
    """The floor: recall's float32 matrix products over the upper triangle alone, as its pass runs them
    (evaluate.triangle_pass: the same tiles, shared among the same threads)."""
    rows, cols, chunks = evaluate.TILE_ROWS, evaluate.TILE_COLS, evaluate.FLOAT32_CHUNKS
    x = evaluate.float64_rows(features, device)  # as recall reads the map
    x32 = evaluate.float32_unit_rows(x, evaluate.row_norms(x), chunks)

    def products(tiles):
        for i0, j0 in tiles:
            evaluate.tile_cosines(x32, i0, j0, chunks, rows, cols)

    start = time.perf_counter()
    evaluate.in_threads(products, evaluate.triangle_tiles(len(x32), rows, cols), evaluate.pass_threads(x32))
    if x32.is_cuda:
        torch.cuda.synchronize()  # the products were only queued
    return time.perf_counter() - start


def recall_figures(genes, dims, kinds=RECALL_MAPS, seed=0, repeats=5, reference="efaar"):
    """Our known_relationship_recall against efaar-benchmarking's on several kinds of map of the same
    size (recall_map): seconds, ratio, identical numbers?, and our time over our own matrix products.
    reference="cpu" (the GPU bench) compares with our own CPU result instead, which the tests and this
    bench hold equal to efaar-benchmarking's, and leaves efaar-benchmarking's minute per map out."""
    unknown = [kind for kind in kinds if kind not in RECALL_MAPS]
    if unknown:  # recall_map would make them plain random maps, printed under the wrong name
        raise SystemExit(f"bench.py recall: no map kind {', '.join(unknown)} (kinds: {', '.join(RECALL_MAPS)})")
    if genes < 2 or dims < 1:  # else a traceback: recall refuses them, and the floor's tiles cannot slice 0 dims
        raise SystemExit(f"bench.py recall: a map of {genes} genes x {dims} dims (--genes 2+, --dims 1+)")
    annotations = evaluate.required_tables()  # one line where they cannot be had: set VITALLY_CACHE to a folder holding them
    efaar = efaar_reference() if reference == "efaar" else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nknown-relationship recall, {genes} genes x {dims} dims, {where}; each table read inside each timing; "
          f"ours and matmul: the best of {repeats}, taken in turns")
    print(f"{'map':12} {'queries':>8} {'ours s':>7} {'matmul s':>9} {'ours/matmul':>12} "
          + (f"{'efaar s':>8} {'x faster':>9} {'efaar/matmul':>13}  numbers" if efaar else "numbers vs our CPU run"))
    for kind in kinds:
        features, labels = recall_map(kind, genes, dims, np.random.default_rng(seed))
        floor = our_seconds = math.inf
        for _ in range(repeats):  # in turns, so that a noisy neighbour slows both alike
            floor = min(floor, matrix_product_seconds(features, device))
            evaluate.relationship_codes.cache_clear()  # both sides read the tables inside the timing
            start = time.perf_counter()
            ours = evaluate.known_relationship_recall(features, labels, annotations_dir=annotations, device=device)
            our_seconds = min(our_seconds, time.perf_counter() - start)
        queries = sum(r["n_pairs"] for r in ours.values())
        line = f"{kind:12} {queries:8d} {our_seconds:7.1f} {floor:9.1f} {our_seconds / floor:12.2f} "
        if efaar:
            import pandas as pd
            from sklearn.utils import Bunch
            start = time.perf_counter()
            theirs = efaar.known_relationship_benchmark(
                Bunch(features=pd.DataFrame(features), metadata=pd.DataFrame({"gene": labels})), "gene",
                benchmark_data_dir=str(annotations))
            their_seconds = time.perf_counter() - start
            identical = len(theirs) == sum(r["n_pairs"] > 0 for r in ours.values()) and all(
                ours[r["source"]]["n_pairs"] == r["query_distribution_size"] and ours[r["source"]][k] == r[k]
                for r in theirs.to_dict("records") for k in ("recall_0.05_0.95", "recall_0.1_0.9"))
            # efaar/matmul: the most any speed-up could be while the products are done this way
            line += f"{their_seconds:8.1f} {their_seconds / our_seconds:9.1f} {their_seconds / floor:13.1f}  "
        else:
            on_cpu = evaluate.known_relationship_recall(features, labels, annotations_dir=annotations, device="cpu")
            identical = on_cpu.keys() == ours.keys() and all(
                on_cpu[s][k] == ours[s][k] or math.isnan(on_cpu[s][k]) and math.isnan(ours[s][k])
                for s in ours for k in ours[s])
        print(line + ("identical" if identical else "DIFFERENT"), flush=True)


def probe_figures(depth, crop_size=64, seed=0, repeats=3):
    """Whole block sweep, ours vs naive, on the demo screen with a random-init demo-architecture model
    (depth 48: vitg8's depth at a small width); and ours against one embedding pass alone, its floor.
    Crops of crop_size px in 8x8 patches (64 tokens each): 128 px makes 4x fewer crops than 64, for the
    48-block run, whose naive sweep embeds 24.5x as much as one pass. Ours and the floor: the best of
    `repeats`, taken in turns; the naive sweep once."""
    import probe
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth.synth(tmp / "synth", size="demo", seed=seed)
        crops = data.prepare(tmp / "synth" / "images", tmp / "synth" / "metadata.csv", tmp / "crops", crop_size=crop_size)
        config = dict(channel_agnostic=False, img_size=crop_size, patch_size=crop_size // 8, dim=128, depth=depth,
                      heads=4, mlp_dim=512, dec_dim=128, dec_depth=2, dec_heads=4, dec_mlp_dim=256)
        model = build(MAEConfig.from_preset("vits16", **config), verbose=False)
        save_consolidated(tmp / "model.pt", model.config, model.state_dict())
        grid = (1e-1, 1e-2, 1e-3, 1e-4)
        dataset = data.CropDataset(crops)
        floor_seconds = our_seconds = math.inf
        for repeat in range(repeats):  # in turns, the best of each: a noisy neighbour slows both alike
            start = time.perf_counter()  # the floor: one embedding pass to the last block, nothing else
            evaluate.embed_wells(lambda x: model.eval().embed(x, [depth]), dataset, tmp / "floor.npy")
            floor_seconds = min(floor_seconds, time.perf_counter() - start)
            start = time.perf_counter()
            features, wells = probe.block_features(tmp / "model.pt", crops, tmp / f"probe_{repeat}")  # no cache
            embedded_at = time.perf_counter()
            labels = probe.task_labels(wells, "perturbation")
            train, validation, test, _ = probe.split_wells(wells, "experiment")
            ours = probe.sweep(features, labels, train, validation, test, list(range(1, depth + 1)), grid)
            seconds = time.perf_counter() - start
            if seconds < our_seconds:
                our_seconds, embed_seconds = seconds, embedded_at - start
        start = time.perf_counter()
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
    print(f"\nblock sweep, {depth} blocks, {len(wells)} wells ({len(dataset)} crops of {crop_size} px) of the demo screen, "
          f"task perturbation, {len(grid)} penalties, cpu {torch.get_num_threads()} threads; ours and one pass: "
          f"the best of {repeats}, taken in turns")
    print(f"{'block':>5} {'ours bal.acc':>13} {'naive bal.acc':>14}   (validation, where both choose the penalty)")
    for block in ours:
        print(f"{block:5d} {ours[block]['validation_balanced_accuracy']:13.3f} {naive[block]:14.3f}")
    print(f"probe.py {our_seconds:.1f} s, naive {naive_seconds:.1f} s: {naive_seconds / our_seconds:.1f}x faster; "
          f"one embedding pass alone {floor_seconds:.1f} s: the sweep is {our_seconds / floor_seconds:.2f}x it "
          f"(its pass, every block pooled and cached: {embed_seconds:.1f} s; {depth} probes: {our_seconds - embed_seconds:.1f} s)")


def gallery_figures(wells, sites, size, repeats=3, workers=2):
    """data.py prepare of a Cell Painting Gallery plate (synth.write_gallery_plate: 5 stains, 3
    brightfield planes, illumination functions, a gzip LoadData of s3:// addresses) served by moto's
    S3 server on localhost (benchmark-only: pip install "moto[server]" s3fs), against the same plate
    from local files (--mirror): seconds each (the best of `repeats`, taken in turns), the ratio, and
    whether the crops are identical. The network path's cost on this machine, not the internet's."""
    import boto3
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE"):
        os.environ.pop(key, None)  # anonymous, as the public gallery is read
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "gallery"
        load_data = synth.write_gallery_plate(root, wells=[f"{r}{c:02d}" for r in "AB" for c in range(1, 13)][:wells],
                                              sites=sites, size=size)
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"], aws_access_key_id="o",
                          aws_secret_access_key="o", region_name="us-east-1")
        s3.create_bucket(Bucket="cellpainting-gallery")
        for path in root.rglob("*"):
            if path.is_file():
                s3.put_object(Bucket="cellpainting-gallery", Key=path.relative_to(root).as_posix(), Body=path.read_bytes(),
                              ACL="public-read")
        url = f"s3://cellpainting-gallery/{load_data.relative_to(root).as_posix()}"
        runs = {"local files": dict(load_data=load_data, mirrors=[("s3://cellpainting-gallery", str(root))]),
                "S3 on localhost": dict(load_data=url)}
        seconds = dict.fromkeys(runs, math.inf)
        for repeat in range(repeats):
            for name, where in runs.items():
                out = Path(tmp) / f"{name}_{repeat}"
                start = time.perf_counter()
                data.prepare(None, None, out, illum=True, workers=workers, **where)
                seconds[name] = min(seconds[name], time.perf_counter() - start)
        same = all((Path(tmp) / f"local files_{r}" / "shard_00000.npy").read_bytes()
                   == (Path(tmp) / f"S3 on localhost_{r}" / "shard_00000.npy").read_bytes() for r in range(repeats))
    server.stop()
    images = wells * sites
    print(f"\nprepare of a gallery plate: {images} fields of {size}x{size} (5 stains read, illumination-corrected), "
          f"crop 256, {workers} workers; the best of {repeats}, taken in turns")
    for name, s in seconds.items():
        print(f"{name:16} {s:6.2f} s  {images / s:6.1f} fields/s")
    print(f"S3 / local: {seconds['S3 on localhost'] / seconds['local files']:.2f}x; crops {'identical' if same else 'DIFFERENT'}")


def map_profiles(n, dims, seed=0, replicates=4, control_fraction=0.06):
    """A JUMP-like plate map: compounds in `replicates` wells each, DMSO in control_fraction of the wells,
    a third of the compounds active (a shift along one of 20 directions), copairs' reference index."""
    rng = np.random.default_rng(seed)
    controls = int(n * control_fraction)
    compounds = (n - controls) // replicates
    names = np.r_[np.repeat([f"JCP{i:06d}" for i in range(compounds)], replicates), ["DMSO"] * (n - compounds * replicates)]
    effect = np.zeros((len(names), dims))
    active = np.flatnonzero((np.arange(len(names)) // replicates) % 3 == 0)[:compounds * replicates // 3 * 3]
    effect[active] = rng.normal(size=(20, dims))[(active // replicates) % 20] * 0.3
    effect[names == "DMSO"] = 0
    features = rng.normal(size=(len(names), dims)) + effect
    reference = np.where(names == "DMSO", np.arange(len(names)), -1)
    return dict(compound=names, reference=reference), features


def map_run(who, n, dims, null_size, out):
    """One side of `bench.py map`, in its own process (its peak memory is its own): APs, mAPs and p."""
    import resource
    meta, features = map_profiles(n, dims)
    design = (["compound", "reference"], [], [], ["compound", "reference"])  # copairs' phenotypic activity
    start = time.perf_counter()
    if who == "ours":
        ap = evaluate.average_precision(meta, features, *design)
        _, table = evaluate.map_benchmark(features, meta, *design, "compound", null_size)
        groups = sorted(table)
        maps, p = [table[g]["map"] for g in groups], [table[g]["p"] for g in groups]
    else:
        import pandas as pd
        from copairs.map import average_precision, mean_average_precision
        frame = average_precision(pd.DataFrame(meta), features, *design, progress_bar=False)
        ap = frame["average_precision"].to_numpy()
        table = mean_average_precision(frame, ["compound"], null_size=null_size, threshold=0.05, seed=0,
                                       progress_bar=False).sort_values("compound")
        maps, p = table["mean_average_precision"].to_numpy(), table["p_value"].to_numpy()
    seconds = time.perf_counter() - start
    np.savez(out, ap=ap, map=maps, p=p, seconds=seconds, peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def map_figures(sizes, dims, null_size, memory_gib=16, timeout=1800):
    """evaluate.py's copairs mAP against copairs itself, on the same maps, each side in a process of its
    own with the same memory limit (copairs lists every pair: it fails where that does not fit)."""
    print(f"copairs mAP (phenotypic activity), {dims} dims, null {null_size}, {os.cpu_count()} cores, "
          f"each side limited to {memory_gib} GiB and {timeout} s")
    print(f"{'profiles':>9} {'ours s':>8} {'GiB':>5} {'copairs s':>10} {'GiB':>5} {'speed-up':>9}  agreement")
    for n in sizes:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for who in ("ours", "copairs"):
                out = Path(tmp) / f"{who}.npz"
                limit = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory_gib << 30}, {memory_gib << 30}))"
                code = f"{limit}; import bench; bench.map_run({who!r}, {n}, {dims}, {null_size}, {str(out)!r})"
                try:
                    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True,
                                         text=True, timeout=timeout)
                    results[who] = dict(np.load(out)) if run.returncode == 0 else \
                        (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1][:60]
                except subprocess.TimeoutExpired:
                    results[who] = f"over {timeout} s"
        ours, theirs = results["ours"], results["copairs"]
        if isinstance(theirs, str):
            print(f"{n:9d} {float(ours['seconds']):8.1f} {float(ours['peak_gib']):5.1f} {'failed':>10} {'':>5} {'':>9}  copairs: {theirs}")
            continue
        ap_diff = np.nanmax(np.abs(ours["ap"] - theirs["ap"]))
        map_diff = np.max(np.abs(ours["map"] - theirs["map"]))
        error = 4 * np.sqrt(theirs["p"] * (1 - theirs["p"]) / null_size) + 2 / null_size
        within = np.mean(np.abs(ours["p"] - theirs["p"]) <= error)
        print(f"{n:9d} {float(ours['seconds']):8.1f} {float(ours['peak_gib']):5.1f} {float(theirs['seconds']):10.1f} "
              f"{float(theirs['peak_gib']):5.1f} {float(theirs['seconds']) / float(ours['seconds']):8.1f}x  AP max diff {ap_diff:.1e}, "
              f"mAP max diff {map_diff:.1e}, p within 4 s.e. of copairs' for {within:.1%} of {len(ours['p'])} compounds")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    parser.add_argument("suite", nargs="?", default="train", choices=["train", "gpu", "lion", "recall", "probe", "map", "embed", "gallery"],
                        help="which figures")
    parser.add_argument("--profiles", default="10000,50000", help="map: comma-separated profile counts")
    parser.add_argument("--null_size", type=int, default=10000, help="map: null draws of the p-values")
    parser.add_argument("--crops", type=int, default=512, help="embed: random crops embedded")
    parser.add_argument("--depth", type=int, default=12, help="probe: blocks of the model")
    parser.add_argument("--crop_size", type=int, default=64, help="probe: crops of the demo screen (128: 4x fewer)")
    parser.add_argument("--genes", type=int, default=20000, help="recall: perturbations in the map")
    parser.add_argument("--dims", type=int, default=1664, help="recall: embedding dimensions")
    parser.add_argument("--maps", default=",".join(RECALL_MAPS), help="recall: comma-separated kinds of map")
    parser.add_argument("--reference", default="efaar", choices=["efaar", "cpu"],
                        help="recall: check the numbers against efaar-benchmarking (a minute a map) or our own CPU run (for a GPU)")
    parser.add_argument("--presets", default="vits16", help="train: comma-separated model.PRESETS keys (-ca: channel-agnostic)")
    parser.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp", "hsdp"], help="train: train.py's parallel")
    parser.add_argument("--batch_size", type=int, default=8, help="train: crops per step")
    parser.add_argument("--steps", type=int, default=5, help="train: timed steps (the median is printed)")
    parser.add_argument("--compile", default="none", choices=["none", "blocks", "model"], help="train: train.py's compile")
    parser.add_argument("--activation_checkpointing", action="store_true", help="train: recompute each block in the backward pass")
    parser.add_argument("--world_size", type=int, default=8, help="lion: ranks the parameters are sharded over")
    parser.add_argument("--hf", action="store_true", help="train: also compare with transformers' ViTMAE (pip install transformers)")
    parser.add_argument("--wells", type=int, default=6, help="gallery: wells of the plate (24 at most)")
    parser.add_argument("--sites", type=int, default=4, help="gallery: fields per well")
    parser.add_argument("--field_size", type=int, default=1080, help="gallery: field side in pixels (an Opera Phenix's 1080)")
    parser.add_argument("--dry-run", action="store_true", help="gpu: every stage on the CPU at tiny sizes (under 2 minutes)")
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)  # gpu: one stage, in the process gpu_figures starts
    parser.add_argument("--data", help=argparse.SUPPRESS)  # gpu --stage: the crops gpu_figures wrote
    args = parser.parse_args()
    if args.suite == "gpu" and args.stage is not None:
        gpu_stage(args.stage, args.data, args.dry_run)
    elif args.suite != "train":
        {"gpu": lambda: gpu_figures(args.dry_run), "lion": lambda: lion_figures("vitg8", args.world_size),
         "recall": lambda: recall_figures(args.genes, args.dims, args.maps.split(","), reference=args.reference), "probe": lambda: probe_figures(args.depth, args.crop_size),
         "map": lambda: map_figures([int(n) for n in args.profiles.split(",")], args.dims if args.dims != 1664 else 384,
                                    args.null_size),
         "embed": lambda: embed_presets(args.presets.split(","), args.batch_size, args.crops),
         "gallery": lambda: gallery_figures(args.wells, args.sites, args.field_size)}[args.suite]()
    if args.suite != "train":
        sys.exit()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    if args.hf:
        for preset in args.presets.split(","):
            compare_with_hf(preset, args.batch_size, args.steps, device, dtype, args.compile != "none")
    extra = [f"--compile={args.compile}", f"--activation_checkpointing={args.activation_checkpointing}"]
    train_figures([(preset, args.batch_size, extra) for preset in args.presets.split(",")], args.parallel, args.steps + 3)
