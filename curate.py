"""
The paper's step 1: a diverse, self-consistent training set, cut from a prepared dataset without
copying a pixel (arXiv 2411.02572: Phenoprints-16M, 16M images kept of 93M).

    python curate.py --data out/demo/crops --out out/demo/curated
    python curate.py --data data/junk_crops --out data/junk_curated --min_experiments 3 --min_wells 6

Four rules, each a function below, applied in order:
  1. image quality   out of focus, empty (no nuclei) or saturated images;
  2. labels          wells with no perturbation or several; perturbations in too few experiments or wells;
  3. consistency     perturbations whose replicate wells do not agree (per experiment, combined by the
                     Cauchy combination test);
  4. controls        undersampled to a fraction of their wells.
`--out` gets index.csv (the kept crops, same shards), meta.json (pointing at the source's shards) and
curate_report.json (what each rule dropped, per experiment): a dataset train.py opens like any other.
"""

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import evaluate
import inputs
import model as mae


# ---- 1. image quality -----------------------------------------------------------------------------

def crop_quality(x, nuclear=0):
    """Per uint8 crop [B, C, H, W]: focus (variance of the Laplacian of the nuclear channel over its
    variance: blur lowers it), structure (correlation of neighbouring nuclear pixels: ~0 for a field
    of noise, ~1 with nuclei), saturated (fraction of pixels at 255 in any channel). All three ignore
    the per-image contrast stretch of prepare."""
    dna = x[:, nuclear].float()
    centered = dna - dna.mean((-2, -1), keepdim=True)
    var = centered.pow(2).mean((-2, -1)) + 1e-6
    focus = evaluate.laplacian(dna).var((-2, -1)) / var
    structure = ((centered[:, 1:] * centered[:, :-1]).mean((-2, -1)) + (centered[:, :, 1:] * centered[:, :, :-1]).mean((-2, -1))) / (2 * var)
    saturated = (x == 255).any(1).float().mean((-2, -1))
    return torch.stack([focus, structure, saturated], 1)


def bad_images(quality, plate_of_image, crops_of, focus_min, structure_min, saturated_max):
    """Per image, from its crops' quality: blurred (median focus < focus_min x its plate's median),
    empty (max structure < structure_min), saturated (mean saturated fraction > saturated_max: over the
    whole image, since prepare's stretch puts ~0.1% of each channel's pixels at 255, which the max over
    small crops would count many times). Returns {rule: boolean mask over images}."""
    per_image = np.stack([[np.median(quality[c, 0]), quality[c, 1].max(), quality[c, 2].mean()] for c in crops_of])
    plate_focus = {p: np.median(per_image[plate_of_image == p, 0]) for p in set(plate_of_image)}
    return {"blurred": per_image[:, 0] < focus_min * np.array([plate_focus[p] for p in plate_of_image]),
            "empty": per_image[:, 1] < structure_min, "saturated": per_image[:, 2] > saturated_max}


# ---- 2. labels ------------------------------------------------------------------------------------

def unlabeled(label):
    """Wells with no perturbation, or several in one (';' '|' ',' separate them in screens' metadata)."""
    return (label == "") | np.any([np.char.find(label, sep) >= 0 for sep in ";|,"], axis=0)


def too_rare(label, experiment, well, controls, min_experiments, min_wells):
    """Perturbations (controls exempt) seen in fewer than min_experiments experiments or min_wells wells."""
    seen = {}
    for p, e, w in zip(label, experiment, well):
        experiments, wells = seen.setdefault(p, (set(), set()))
        experiments.add(e)
        wells.add(w)
    return sorted(p for p, (es, ws) in seen.items()
                  if p not in controls and (len(es) < min_experiments or len(ws) < min_wells))


# ---- 3. consistency -------------------------------------------------------------------------------

def cauchy_combination(p_values, weights=None):
    """Combine p-values of one hypothesis tested in several experiments, valid under any dependence
    (Liu & Xie 2020): T = sum w_i tan((0.5 - p_i) pi), p = 0.5 - arctan(T / sum w) / pi."""
    p = np.clip(np.asarray(p_values, np.float64), 1e-300, 1 - 1e-16)
    w = np.ones_like(p) if weights is None else np.asarray(weights, np.float64)
    t = (w * np.tan((0.5 - p) * np.pi)).sum() / w.sum()
    return float(0.5 - np.arctan(t) / np.pi)


def well_embeddings(source, rows, keep, out, embeddings=None, ckpt=None, batch_size=256):
    """[wells, D] embeddings of the wells with kept crops, and their metadata rows: given ones
    ([wells, D] .npy in evaluate.well_table order), a model's (ckpt), or hand-crafted features."""
    if embeddings is not None:
        well_of_crop, well_rows = evaluate.well_table(source)
        present = np.unique(well_of_crop[keep])
        features = inputs.npy(embeddings)
        if features.ndim != 2 or len(features) != len(well_rows):
            inputs.refuse(embeddings, f"shape {list(features.shape)}, not [wells, D] for the {len(well_rows)} wells of {source.root}")
        return features[present], [well_rows[i] for i in present]
    if ckpt is None:
        encode = lambda x: evaluate.handcrafted_features(x.cpu())[None]
    else:
        model = mae.from_pretrained(ckpt).eval()
        encode = lambda x: model.embed(x)
    index_so_far = out / "quality_index.csv"
    data.write_csv(index_so_far, list(rows[0]), [list(r.values()) for r, k in zip(rows, keep) if k])
    features, well_rows = evaluate.embed_wells(encode, data.CropDataset(source.root, index_so_far),
                                               out / "curate_features.npy", batch_size)
    index_so_far.unlink()
    return features[0], well_rows


def consistency_p_values(x, well_rows, control, controls, out, seed):
    """Per experiment: TVN-align the wells on their plate's control wells (is_control where the
    metadata has it, else those named `control`; 99% of the control variance),
    then evaluate.replicate_consistency's p-value for each perturbation with two or more wells there;
    the experiments' p-values combined by the Cauchy combination test. Returns {perturbation: p}."""
    x = np.asarray(x, np.float64)
    label = evaluate.replicate_key(well_rows)
    plate = np.array([r["plate"] for r in well_rows], dtype=str)
    experiment = np.array([r.get("experiment", r["plate"]) for r in well_rows], dtype=str)
    is_control = evaluate.control_wells(well_rows, label, control, "curate")
    p_values = {}
    for e in sorted(set(experiment)):
        rows_e = experiment == e
        aligned = evaluate.align(x[rows_e], plate[rows_e], is_control[rows_e], "tvn", out / "curate_aligned.npy", 0.99)
        tested = [p for p in set(label[rows_e]) - controls if (label[rows_e] == p).sum() >= 2]
        if tested:
            _, p_e = evaluate.replicate_consistency(aligned, label[rows_e], plate[rows_e], control=control, seed=seed)
            for p in tested:
                p_values.setdefault(p, []).append(p_e[p])
    return {p: cauchy_combination(v) for p, v in p_values.items()}


# ---- 4. controls ----------------------------------------------------------------------------------

def undersampled_wells(wells, fraction, rng):
    """The control wells to drop so that about `fraction` of them stay (whole wells, random by rng)."""
    wells = sorted(set(wells))
    return set(np.array(wells)[rng.random(len(wells)) >= fraction].tolist()) if wells else set()


# ---- the whole step -------------------------------------------------------------------------------

def curate(data_dir, out, embeddings=None, ckpt=None, nuclear_channel="DNA", focus_min=0.5, structure_min=0.3,
           saturated_max=0.05, min_experiments=3, min_wells=20, alpha=0.01, control="non-targeting",
           positive_controls=(), negative_fraction=0.3, positive_fraction=0.1, batch_size=256, seed=0):
    """The four rules on the dataset at data_dir, in order, each on what the ones before kept; writes
    the curated dataset to `out` and returns the report. Consistency (rule 3) is tested on the wells'
    embeddings: `embeddings` ([wells, D] .npy in evaluate.well_table order), a model's (`ckpt`), or
    hand-crafted features of the crops that passed rules 1-2; kept if the combined p < alpha."""
    source = data.CropDataset(data_dir)
    out = inputs.output_folder(out, data_dir, embeddings)
    rows = data.read_csv(source.index_path)
    absent = [c for c in ("plate", "well", "perturbation") if c not in rows[0]]
    if absent:
        raise SystemExit(f"{source.index_path}: no column {', '.join(absent)}: curation needs each crop's plate, well and "
                         "perturbation (name the perturbation column so when preparing)")
    channels = source.meta["channels"]
    nuclear = channels.index(nuclear_channel) if nuclear_channel in channels else 0
    column = lambda name, fallback=None: np.array([r.get(name, r.get(fallback)) for r in rows], dtype=str)
    label, experiment = column("perturbation"), column("experiment", "plate")
    well = np.char.add(np.char.add(column("plate"), "/"), column("well"))
    controls = set(positive_controls) | {control}
    report = {"crops": len(rows)}

    quality = torch.cat([crop_quality(torch.from_numpy(source.crops(range(i, min(i + 1024, len(rows))))), nuclear)
                         for i in tqdm(range(0, len(rows), 1024), desc="quality", unit="batch")]).numpy()
    images, crops_of = evaluate.group_rows(column("source"))
    bad = bad_images(quality, np.array([rows[c[0]]["plate"] for c in crops_of]), crops_of,
                     focus_min, structure_min, saturated_max)
    report["images"] = {"total": len(images), **{k: sorted(images[v].tolist()) for k, v in bad.items()}}
    keep = np.ones(len(rows), bool)
    for k in np.flatnonzero(np.any(list(bad.values()), 0)):
        keep[crops_of[k]] = False

    no_label = unlabeled(label)
    report["wells_unlabeled"] = sorted(set(well[no_label].tolist()))
    keep &= ~no_label
    rare = too_rare(label[keep], experiment[keep], well[keep], controls, min_experiments, min_wells)
    report["perturbations_too_rare"] = rare
    keep &= ~np.isin(label, rare)

    features, well_rows = well_embeddings(source, rows, keep, out, embeddings, ckpt, batch_size)
    if not np.isfinite(np.asarray(features, np.float64)).all():
        raise SystemExit(f"{embeddings or ckpt or 'the hand-crafted features'}: the wells' embeddings are not all finite "
                         "(NaN or inf): consistency cannot be tested on them")
    combined = consistency_p_values(features, well_rows, control, controls, out, seed)
    flagged = evaluate.control_wells(well_rows, evaluate.replicate_key(well_rows), control, "curate")
    controls |= set(evaluate.replicate_key(well_rows)[flagged].tolist())  # is_control decides, named or not
    candidates = set(evaluate.replicate_key(well_rows)) - controls
    inconsistent = sorted(p for p in candidates if combined.get(p, 1.0) >= alpha)
    report["consistency"] = {"alpha": alpha, "combined_p": combined, "dropped": inconsistent,
                             "untested": sorted(candidates - set(combined))}
    keep &= ~np.isin(evaluate.replicate_key(rows), inconsistent)

    rng = np.random.default_rng(seed)
    for kind, names, fraction in (("negative", {control}, negative_fraction),
                                  ("positive", set(positive_controls), positive_fraction)):
        control_wells = well[keep & np.isin(label, list(names))]
        dropped = undersampled_wells(control_wells, fraction, rng)
        keep &= ~np.isin(well, list(dropped))
        report[f"control_wells_{kind}"] = dict(before=len(set(control_wells)), kept=len(set(control_wells)) - len(dropped))

    kept_rows = [r for r, k in zip(rows, keep) if k]
    report.update(crops_kept=len(kept_rows), wells_kept=len(set(well[keep].tolist())),
                  perturbations_kept=len(set(label[keep].tolist()) - controls),
                  per_experiment={e: dict(crops=int((keep & (experiment == e)).sum()), wells=len(set(well[keep & (experiment == e)].tolist())))
                                  for e in sorted(set(experiment))})
    data.write_csv(out / "index.csv", list(rows[0]), [list(r.values()) for r in kept_rows])
    data.write_json(out / "curate_report.json", report)
    meta = dict(source.meta, crops=len(kept_rows), curated_from=str(Path(data_dir).resolve()),
                shard_root=os.path.relpath(source.shard_root.resolve(), out.resolve()))
    data.write_json(out / "meta.json", meta)  # last: the dataset is complete
    print(f"{out}: kept {len(kept_rows)} of {len(rows)} crops, {report['wells_kept']} wells, "
          f"{report['perturbations_kept']} perturbations; dropped images " +
          ", ".join(f"{k} {len(report['images'][k])}" for k in bad) +
          f"; unlabeled wells {len(report['wells_unlabeled'])}; rare {len(rare)}; inconsistent {len(inconsistent)}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    parser.add_argument("--data", dest="data_dir", required=True, help="a prepared dataset")
    parser.add_argument("--out", required=True, help="folder of the curated dataset (index.csv, meta.json, curate_report.json)")
    parser.add_argument("--embeddings", help="[wells, D] .npy in evaluate.well_table order; None: hand-crafted features")
    parser.add_argument("--ckpt", help="embed the wells with this model instead")
    parser.add_argument("--nuclear_channel", default="DNA", help="the channel the quality rules read (the first if absent)")
    parser.add_argument("--focus_min", type=float, default=0.5, help="blurred: focus below this fraction of the plate's median")
    parser.add_argument("--structure_min", type=float, default=0.3, help="empty: neighbouring nuclear pixels correlate below this")
    parser.add_argument("--saturated_max", type=float, default=0.05, help="saturated: more than this fraction of pixels at 255")
    parser.add_argument("--min_experiments", type=int, default=3, help="perturbations in fewer experiments are dropped")
    parser.add_argument("--min_wells", type=int, default=20, help="perturbations in fewer wells are dropped")
    parser.add_argument("--alpha", type=float, default=0.01, help="consistency: kept if the combined p-value is below")
    parser.add_argument("--control", default="non-targeting", help="the perturbation name of negative-control wells")
    parser.add_argument("--positive_controls", type=lambda v: v.split(","), default=[], help="comma-separated perturbation names")
    parser.add_argument("--negative_fraction", type=float, default=0.3, help="of the negative-control wells kept")
    parser.add_argument("--positive_fraction", type=float, default=0.1, help="of the positive-control wells kept")
    parser.add_argument("--batch_size", type=int, default=256, help="crops per embedding batch")
    parser.add_argument("--seed", type=int, default=0, help="of the consistency null and the control undersampling")
    curate(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
