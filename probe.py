"""
The block search (the paper's step 3): which transformer block represents biology best?

    python probe.py --ckpt out/demo/train/model.pt --data out/demo/crops --task perturbation --out out/probe --trim

ONE pass of the model embeds every crop at every block (MAE.embed(x, blocks=all)); crops are averaged
into wells and cached in DIR (float16, memory-mapped: a rerun or another task skips the model). Then,
for each block, a multinomial logistic regression predicts the task from the well embeddings, trained
on some plates/experiments and scored on the others (the blocks' probes fitted together, as one stack).
The block with the best balanced accuracy wins; --trim writes the encoder cut there (decoder dropped),
which evaluate.py and MAE.embed load as is.

Tasks: `perturbation` (which gene/siRNA/compound is in the well: the RxRx1 task) and `group` (which
functional group the perturbed gene belongs to, from --groups CSV perturbation,group: the "Anax" task).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import evaluate
import inputs
import model as mae


# ---- features: every block, one pass, cached ---------------------------------------------------------

def block_features(ckpt, dataset_root, out, batch_size=256, device="cpu", channels=None):
    """[blocks, wells, D] float16 (memory-mapped) and the wells' metadata, from out/features.npy when it
    was made from the same checkpoint, data (same files, same modification times) and channels (the
    dataset's channels the model sees, by name; None: all; see evaluate.channel_encoder)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = dict(ckpt=str(Path(ckpt).resolve()), ckpt_mtime=os.path.getmtime(ckpt),
                  data=str(Path(dataset_root).resolve()), index_mtime=os.path.getmtime(Path(dataset_root) / "index.csv"),
                  channels=channels)
    cached = out / "features.json"
    if inputs.cache_valid(out / "features.npy", cached, source) and (out / "wells.csv").exists():
        print(f"block features from the cache {out / 'features.npy'}")
        return np.load(out / "features.npy", mmap_mode="r"), data.read_csv(out / "wells.csv")
    if evaluate.torchrun_rank()[0] == 0:
        cached.unlink(missing_ok=True)  # the description goes first: a run killed after this describes nothing
    device = evaluate.rank_device(device)
    model = mae.from_pretrained(ckpt, device).eval()
    blocks = list(range(1, len(model.blocks) + 1))
    dataset = data.CropDataset(dataset_root)
    features, wells = evaluate.embed_wells(evaluate.channel_encoder(model, dataset, channels, blocks), dataset,
                                           out / "features.npy", batch_size, device)
    if evaluate.torchrun_rank()[0] == 0:
        data.write_csv(out / "wells.csv", list(wells[0]), [list(w.values()) for w in wells])
        inputs.describe_cache(out / "features.npy", cached, source=source, blocks=blocks, shape=list(features.shape))
    return features, wells


# ---- tasks and the split -----------------------------------------------------------------------------

def task_labels(wells, task, groups=None, perturbation_col="perturbation", control="non-targeting",
                keep_controls=False):
    """A label per well ("" = not used): the perturbation, or the group of the perturbed gene."""
    perturbation = np.array([w[perturbation_col] for w in wells], dtype=str)
    if task == "perturbation":
        labels = perturbation.copy()
    elif task == "group":
        if not groups:
            raise SystemExit("--task group needs --groups (a CSV with columns perturbation, group)")
        group_of = {}
        for group, members in inputs.matching_groups(groups, perturbation).items():
            for p in members:
                group_of.setdefault(p, group)  # a perturbation in several groups: the first is its label
        labels = np.array([group_of.get(p, "") for p in perturbation], dtype=str)
    else:
        raise SystemExit(f"unknown task {task!r}: perturbation or group")
    if not keep_controls:
        labels[perturbation == control] = ""
    return labels


def split_wells(wells, split_col, stratify=None, fraction=0.25):
    """Train, validation and test wells, by whole values of split_col (plates, experiments: replicates
    of one plate never straddle two sides), within each stratum of `stratify` (e.g. cell_type: every
    cell type is trained on, chosen on and tested on). Per stratum, of its sorted values, the last
    ceil(fraction) test and the ceil(fraction) before them validate. The penalty and the block are
    chosen on validation; the accuracy reported is the test's. Returns three masks and the held-out
    values: {"validation": [...], "test": [...]}."""
    for column in (split_col, stratify):
        if column and column not in wells[0]:
            raise SystemExit(f"no metadata column {column!r} to split by (columns: {', '.join(wells[0])})")
    values = np.array([w[split_col] for w in wells], dtype=str)
    strata = np.array([w[stratify] for w in wells], dtype=str) if stratify else np.zeros(len(wells), str)
    held = {"validation": [], "test": []}
    for stratum in sorted(set(strata.tolist())):
        names = sorted(set(values[strata == stratum].tolist()))
        k = max(1, math.ceil(fraction * len(names)))
        if len(names) < 2 * k + 1:
            where = f" of {stratify} {stratum}" if stratify else ""
            raise SystemExit(f"{split_col}: {len(names)} value(s){where} ({', '.join(names)}); a train/validation/test split "
                             f"needs {2 * k + 1} or more: pass a --split_col with more values (plate, well)")
        held["validation"] += names[-2 * k:-k]
        held["test"] += names[-k:]
    validation, test = np.isin(values, held["validation"]), np.isin(values, held["test"])
    return ~(validation | test), validation, test, held


# ---- the classifier -----------------------------------------------------------------------------------

def fit_logistic(x, y, n_classes, l2, init=None, max_iter=200, tolerance=1e-4, history=10):
    """Multinomial logistic regression on each of a stack of feature sets x [B, n, d] with labels y [n]:
    minimize, for each, mean cross-entropy + l2/2 ||W||^2 (bias not penalized; scikit-learn's
    LogisticRegression with C = 1 / (l2 * n)) until every gradient entry is within `tolerance`
    (scikit-learn's default and stopping rule, its gtol). L-BFGS with a backtracking line search, run for
    each block on its own (its own curvature pairs, steps and stop) and vectorized over the blocks: one
    small problem costs mostly Python per iteration, B of them the same Python and one batched product,
    and each block ends where it would alone, whatever else is in the stack. Returns (W [B, d, C], b [B, C])."""
    blocks, n, d = x.shape
    split = d * n_classes
    theta = torch.zeros(blocks, split + n_classes, device=x.device) if init is None else \
        torch.cat([init[0].reshape(blocks, split), init[1]], 1)
    one_hot = torch.nn.functional.one_hot(y, n_classes).to(x.dtype)

    def loss_and_gradient(theta):  # per block; the gradient written out (softmax minus one-hot)
        w, b = theta[:, :split].view(blocks, d, n_classes), theta[:, split:].view(blocks, 1, n_classes)
        log_p = torch.log_softmax(torch.baddbmm(b, x, w), 2)
        loss = -(log_p * one_hot).sum((1, 2), dtype=torch.float64) / n + 0.5 * l2 * w.pow(2).sum((1, 2), dtype=torch.float64)
        residual = log_p.exp_().sub_(one_hot).div_(n)
        grad_w = torch.baddbmm(w, x.transpose(1, 2), residual, beta=l2)
        return loss, torch.cat([grad_w.reshape(blocks, split), residual.sum(1)], 1)

    loss, grad = loss_and_gradient(theta)
    pairs = []  # the last `history` (step, gradient change, 1 / their dot), each block's own row; 0: pair unused
    scale = 1 / grad.abs().sum(1, keepdim=True).clamp(min=1)  # the first step's length, as torch's L-BFGS
    stalled = torch.zeros(blocks, dtype=torch.bool, device=x.device)
    for _ in range(max_iter):
        active = (grad.abs().amax(1) > tolerance) & ~stalled
        if not active.any():
            break
        direction, alphas = -grad, []  # two-loop recursion: -H grad, H from the block's own pairs
        for s, change, rho in reversed(pairs):
            alphas.append(rho * (s * direction).sum(1, keepdim=True))
            direction -= alphas[-1] * change
        direction *= scale
        for (s, change, rho), alpha in zip(pairs, reversed(alphas)):
            direction += s * (alpha - rho * (change * direction).sum(1, keepdim=True))
        slope = (grad * direction).sum(1)
        direction = torch.where((slope < 0)[:, None], direction, -grad * scale)  # not downhill: plain gradient
        direction *= active[:, None]
        slope = (grad * direction).sum(1)
        step = torch.ones(blocks, device=x.device)
        for _ in range(10):  # halve each block's step until its loss falls enough (Armijo)
            new_loss, new_grad = loss_and_gradient(theta + step[:, None] * direction)
            enough = new_loss <= loss + 1e-4 * step * slope
            if enough.all():
                break
            step = torch.where(enough, step, step / 2)
        stalled |= active & ~enough  # float32 can go no further downhill: it stops there
        s = torch.where(enough[:, None], step[:, None] * direction, 0)
        change = torch.where(enough[:, None], new_grad - grad, 0)
        theta, loss, grad = theta + s, torch.where(enough, new_loss, loss), torch.where(enough[:, None], new_grad, grad)
        curvature = (s * change).sum(1, keepdim=True)
        useful = curvature > 1e-10
        pairs = (pairs + [(s, change, torch.where(useful, 1 / curvature, 0))])[-history:]
        scale = torch.where(useful, curvature / (change * change).sum(1, keepdim=True).clamp(min=1e-30), scale)
    return theta[:, :split].view(blocks, d, n_classes), theta[:, split:]


def balanced_accuracy(truth, predicted):
    """Mean over the classes present in `truth` [wells] of the fraction of their wells predicted right, for
    each row of `predicted` [B, wells]."""
    classes, truth = truth.unique(return_inverse=True)
    right = torch.zeros(len(predicted), len(classes), device=truth.device)
    right.index_add_(1, truth, (predicted == classes[truth]).float())
    return right.div_(torch.bincount(truth)).mean(1)


def probe(x, labels, train, validation, test, grid=(1e-1, 1e-2, 1e-3, 1e-4), device="cpu"):
    """For each block of x [blocks, wells, D]: fit on the train wells at each L2 penalty of `grid`
    (strongest first, each fit starting from the last); keep the penalty whose balanced accuracy on the
    validation wells is best, and report that fit's accuracy on the test wells (wells of classes seen in
    training are scored). One dict per block."""
    names, y = np.unique(labels[train], return_inverse=True)
    index = {n: i for i, n in enumerate(names)}
    x = torch.as_tensor(np.array(x, np.float32), device=device)  # a copy: x may be a read-only memmap of the cache
    mean, std = x[:, train].mean(1, keepdim=True), x[:, train].std(1, keepdim=True) + 1e-6  # on the training wells
    x = (x - mean) / std
    y_train = torch.as_tensor(y, device=device)
    scored = lambda split: split & np.isin(labels, names)
    truth = lambda split: torch.as_tensor([index[label] for label in labels[scored(split)]], device=device, dtype=torch.long)
    predict = lambda params, split: torch.baddbmm(params[1][:, None], x[:, scored(split)], params[0]).argmax(2)
    x_train, y_validation, params, best = x[:, train].contiguous(), truth(validation), None, None
    for l2 in grid:
        params = fit_logistic(x_train, y_train, len(names), l2, params)
        chosen_by = balanced_accuracy(y_validation, predict(params, validation))
        if best is None:
            best, best_l2, best_params = chosen_by, torch.full_like(chosen_by, l2, dtype=torch.float64), params
        better = chosen_by > best  # ties keep the stronger penalty, as a loop over the grid would
        best, best_l2 = torch.where(better, chosen_by, best), torch.where(better, l2, best_l2)
        best_params = tuple(torch.where(better.view(-1, *[1] * (p.dim() - 1)), p, q) for p, q in zip(params, best_params))
    y_test, predicted = truth(test), predict(best_params, test)
    test_balanced = balanced_accuracy(y_test, predicted)
    majority = float(torch.bincount(y_test, minlength=len(names)).max() / len(y_test))
    return [dict(balanced_accuracy=float(test_balanced[k]), accuracy=float((predicted[k] == y_test).float().mean()),
                 validation_balanced_accuracy=float(best[k]), l2=float(best_l2[k]), chance_balanced=1 / len(y_test.unique()),
                 chance_accuracy=majority, classes=len(names), train_wells=int(train.sum()),
                 validation_wells=int(scored(validation).sum()), test_wells=int(scored(test).sum()),
                 test_unseen=int((test & (labels != "") & ~scored(test)).sum()))
            for k in range(len(x))]


PROBE_MEMORY = 2**30  # bytes of features, logits and L-BFGS history that a stack of blocks fitted at once may take


def sweep(features, labels, train, validation, test, blocks, grid, batches=None, is_control=None, device="cpu"):
    """probe() for each of `blocks` (1-based rows of features [blocks, wells, D]), read from the memory map
    as many blocks at a time as fit PROBE_MEMORY (all of a small screen's: one L-BFGS for them all; a
    large one's one at a time, where each product is big enough to keep the device busy); centered and
    scaled per batch on its control wells first when batches are given (evaluate.align's centerscale)."""
    used = labels != ""
    train, validation, test = train & used, validation & used, test & used
    aligned = lambda x: x if batches is None else evaluate.align(x, batches, is_control, "centerscale")

    def finite(block):  # a NaN would make its block's probe score chance, and another block win, silently
        x = features[block - 1]
        bad = np.flatnonzero(~np.isfinite(x).all(1))
        if len(bad):
            raise SystemExit(f"block {block}: {len(bad)} well(s) with NaN or inf features, the first row {bad[0]} of the wells")
        return x

    wells, dims, classes = len(labels), features.shape[2], len(np.unique(labels[train]))
    # float32: the features thrice (read, standardized, training rows), logits and residual and their
    # product, L-BFGS's 10 pairs of [D, classes] steps and a few more
    per_block = 4 * (3 * wells * dims + 3 * int(train.sum()) * classes + 28 * dims * classes)
    at_once = max(1, PROBE_MEMORY // per_block)
    results = {}
    with tqdm(total=len(blocks), desc="probe", unit="block") as progress:
        for start in range(0, len(blocks), at_once):
            group = blocks[start:start + at_once]
            x = np.stack([aligned(finite(block)) for block in group])
            results.update(zip(group, probe(x, labels, train, validation, test, grid, device)))
            progress.update(len(group))
    return results


# ---- output ---------------------------------------------------------------------------------------------

def plot_curve(path, curves, baseline=None):
    """block vs test balanced accuracy per task, as a PNG, with another run's curves dashed (--baseline:
    e.g. the same network untrained); None without matplotlib."""
    plt = evaluate.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task, points in curves.items():
        blocks = sorted(points)
        ax.plot(blocks, [points[b]["balanced_accuracy"] for b in blocks], marker="o", label=task)
        color = ax.lines[-1].get_color()
        ax.axhline(points[blocks[0]]["chance_balanced"], ls=":", color=color)
        other = (baseline or {}).get(task)
        if other:
            ax.plot(sorted(map(int, other)), [other[str(b)]["balanced_accuracy"] for b in sorted(map(int, other))],
                    ls="--", color=color, label=f"{task}, baseline")
    ax.set(xlabel="block", ylabel="balanced accuracy (test)", title="linear probe per block (dotted: chance)")
    ax.legend()
    return evaluate.save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    source = parser.add_argument_group("what to probe (one of)")
    source.add_argument("--ckpt", help="a checkpoint (model.pt, a training checkpoint folder, OpenPhenom, timm), with --data")
    source.add_argument("--embeddings", help="well embeddings made elsewhere: a parquet profile table, or [wells, D] or "
                        "[blocks, wells, D] .npy with --metadata")
    parser.add_argument("--data", help="a prepared dataset (with --ckpt)")
    parser.add_argument("--metadata", help="CSV, one row per well of --embeddings")
    parser.add_argument("--task", default="perturbation", help="perturbation, group, or both: perturbation,group")
    parser.add_argument("--groups", help="CSV perturbation,group for --task group (as evaluate.py reads it)")
    parser.add_argument("--blocks", default="all", help="all, or e.g. 4,8,12")
    parser.add_argument("--out", required=True, help="folder of probe.csv, probe.json, the block cache and trimmed.pt")
    parser.add_argument("--split_col", default="experiment", help="metadata column whose values are held out whole")
    parser.add_argument("--stratify", default="auto", help="metadata column whose every value is split alike (auto: "
                        "cell_type when there is one; none)")
    parser.add_argument("--fraction", type=float, default=0.25, help="of each stratum's --split_col values for validation, "
                        "and as many for test")
    parser.add_argument("--keep_controls", action="store_true", help="controls are a class of their own")
    parser.add_argument("--align", default="centerscale", choices=["centerscale", "none"],
                        help="center and scale the features per --batch_col on its control wells first")
    parser.add_argument("--batch_col", default="plate", help="metadata column of the batches centered apart")
    parser.add_argument("--control", default="non-targeting", help="the perturbation name of control wells")
    parser.add_argument("--grid", default="0.1,0.01,0.001,0.0001", help="L2 penalties tried")
    parser.add_argument("--trim", action="store_true", help="write trimmed.pt: the encoder cut at the best block (of the first task)")
    parser.add_argument("--baseline", help="another probe.py --out folder (e.g. the untrained network's), drawn dashed in probe.png")
    parser.add_argument("--batch_size", type=int, default=256, help="crops per embedding batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model embeds and the probes fit")
    parser.add_argument("--channels", type=lambda s: s.split(","),
                        help="with --ckpt: the dataset's channels the model sees, by name (e.g. DNA,AGP,Mito); a CA-MAE "
                             "gets those alone, a standard one the others as zeros. None: all")
    args = parser.parse_args(argv)
    if not (args.ckpt and args.data or args.embeddings):
        parser.error("give --ckpt with --data, or --embeddings (with --metadata for a .npy)")
    if args.trim and not args.ckpt:
        parser.error("--trim needs --ckpt")
    if args.channels and not args.ckpt:
        parser.error("--channels chooses what a model (--ckpt) sees")
    out = inputs.output_folder(args.out, args.data, args.embeddings, args.metadata)
    inputs.clear_stale(out, ("probe.csv", "probe.json", "probe.png", "trimmed.pt"))  # this run writes its own
    started = time.perf_counter()
    if args.ckpt:  # under torchrun every rank embeds its share; rank 0 alone goes on to the probes
        features, wells = block_features(args.ckpt, args.data, out, args.batch_size, args.device, args.channels)
        if not evaluate.finish_embedding():
            return None
    else:
        features, wells = evaluate.read_embeddings(args.embeddings, args.metadata)
    depth = features.shape[0]
    blocks = list(range(1, depth + 1)) if args.blocks == "all" else [int(b) for b in args.blocks.split(",")]
    if not all(1 <= b <= depth for b in blocks):
        raise SystemExit(f"--blocks: the model has blocks 1..{depth}")
    stratify = ("cell_type" if "cell_type" in wells[0] else None) if args.stratify == "auto" else \
        None if args.stratify == "none" else args.stratify
    train, validation, test, held_out = split_wells(wells, args.split_col, stratify, args.fraction)
    grid = [float(v) for v in args.grid.split(",")]
    batches = np.array([w[args.batch_col] for w in wells], dtype=str) if args.align == "centerscale" else None
    is_control = evaluate.control_wells(wells, [w["perturbation"] for w in wells], args.control, "probe")
    curves = {}
    for task in args.task.split(","):
        labels = task_labels(wells, task, args.groups, control=args.control, keep_controls=args.keep_controls)
        curves[task] = sweep(features, labels, train, validation, test, blocks, grid, batches, is_control, args.device)
    # the block is chosen on validation, like the penalty; the test accuracy is what is reported
    best = {task: max(r, key=lambda b: r[b]["validation_balanced_accuracy"]) for task, r in curves.items()}
    rows = [[task, b, f"{r['balanced_accuracy']:.4f}", f"{r['accuracy']:.4f}", f"{r['validation_balanced_accuracy']:.4f}",
             f"{r['chance_balanced']:.4f}", f"{r['chance_accuracy']:.4f}", r["l2"], r["classes"], r["train_wells"],
             r["validation_wells"], r["test_wells"]]
            for task, results in curves.items() for b, r in sorted(results.items())]
    header = ["task", "block", "balanced_accuracy", "accuracy", "validation_balanced_accuracy", "chance_balanced",
              "chance_accuracy", "l2", "classes", "train_wells", "validation_wells", "test_wells"]
    data.write_csv(out / "probe.csv", header, rows)
    print(f"\nsplit by {args.split_col}" + (f" within each {stratify}" if stratify else "") +
          f": validation {', '.join(held_out['validation'])}; test {', '.join(held_out['test'])}")
    print(f"{'task':14} {'block':>5} {'test bal.acc':>12} {'acc':>7} {'val bal.acc':>11} {'chance':>7} {'l2':>7}")
    for task, b, bal, acc, val, chance, _, l2, *_ in rows:
        print(f"{task:14} {b:5d} {bal:>12} {acc:>7} {val:>11} {chance:>7} {l2:7g}" + ("  <- chosen on validation" if best[task] == b else ""))
    report = dict(ckpt=args.ckpt, data=args.data, embeddings=args.embeddings, split_col=args.split_col, stratify=stratify,
                  held_out=held_out,
                  align=args.align, batch_col=args.batch_col,
                  best_block=best, curves={t: {str(b): r for b, r in c.items()} for t, c in curves.items()},
                  seconds=round(time.perf_counter() - started, 1))
    baseline = json.loads((Path(args.baseline) / "probe.json").read_text())["curves"] if args.baseline else None
    picture = plot_curve(out / "probe.png", curves, baseline)
    if picture is None:
        print(f"{out / 'probe.png'} skipped: drawing it needs matplotlib (pip install matplotlib)")
    if args.trim:
        block = best[args.task.split(",")[0]]
        model = mae.from_pretrained(args.ckpt).trim(block)
        mae.save_consolidated(out / "trimmed.pt", model.config, model.state_dict(), trimmed_at=block,
                              probe=report["curves"])
        report["trimmed"] = str(out / "trimmed.pt")
        print(f"trimmed at block {block} of {depth}: {out / 'trimmed.pt'}")
    data.write_json(out / "probe.json", report)
    print(f"best block: {best}; {out / 'probe.csv'}, {out / 'probe.json'}" + (f", {picture}" if picture else ""))
    return report


if __name__ == "__main__":
    main()
