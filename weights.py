"""
Weights made elsewhere, translated to this project's MAE: reading the files, and each foreign layout's
tensor names and shapes mapped onto ours (and back). `model.MAE.from_pretrained` is the one entry point;
it calls `read_weights` and `translate`.

- OpenPhenom (CA-MAE-S/16, recursionpharma's maes_microscopy): a timm VisionTransformer of
  ParallelScalingBlocks under `encoder.vit_backbone.`, a frozen sin-cos pos_embed, per-channel decoders;
- timm VisionTransformer state dicts (DINOv2, ImageNet MAE, ...): Block or ParallelScalingBlock.

This file knows tensor layouts only; it imports nothing of the project. What it needs of the model (the
sin-cos table, to recognize OpenPhenom's frozen one) is handed to it, and what it returns is plain: a
dict of MAEConfig fields and a state dict in our names.
"""

from pathlib import Path

import torch


def read_weights(path):
    """A state dict from a .safetensors file (the optional `safetensors` package) or a torch file, told
    apart by their first bytes, not their names: OpenPhenom's model.safetensors may be a torch pickle
    of {"state_dict": ...}. A folder (as a hub download holds one) is read through the weights file in
    it. Anything else is one line; never the suggestion to unpickle an untrusted file."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin", "model.pt") if (path / n).is_file()]
        if not found:
            raise SystemExit(f"{path}: a folder without model.safetensors, pytorch_model.bin or model.pt")
        path = found[0]
    if not path.exists():
        raise SystemExit(f"{path}: no such checkpoint")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)  # safetensors: the JSON header's length (8 bytes), then the header
    if size == 0:
        raise SystemExit(f"{path}: an empty file, not a checkpoint")
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or a legacy pickle
        try:
            with open(path, "rb") as f:  # a file object: torch.load would go by the .safetensors name
                state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zips and foreign pickles fail in many ways
            raise SystemExit(f"{path}: an unreadable torch checkpoint ({type(e).__name__}; truncated, or holding more "
                             f"than tensors)") from None
    elif head[8:9] == b"{":
        if 8 + int.from_bytes(head[:8], "little") > size:
            raise SystemExit(f"{path}: a truncated safetensors file (its header runs past the end)")
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SystemExit(f"{path}: a safetensors file; pip install safetensors to read it") from None
        try:
            state = load_file(path)
        except Exception as e:
            raise SystemExit(f"{path}: an unreadable safetensors file ({type(e).__name__}: {e})".splitlines()[0]) from None
    else:
        raise SystemExit(f"{path}: not a checkpoint (neither a torch file nor safetensors)")
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state["state_dict"] if "state_dict" in state and "config" not in state else state


def translate(state, path, sincos_2d):
    """A foreign state dict -> (MAEConfig fields, our state dict), by the layout its keys show."""
    if any(k.startswith(OPENPHENOM) for k in state):
        return from_openphenom(state, sincos_2d, path)
    if "patch_embed.proj.weight" in state and ("blocks.0.norm1.weight" in state or "blocks.0.in_norm.weight" in state):
        return from_timm(state, path)
    raise SystemExit(f"{path}: a layout this loader does not know (first key {next(iter(state), None)!r})")


def missing(path, key):
    raise SystemExit(f"{path}: no tensor {key!r}, which this layout needs")


# ---- OpenPhenom -----------------------------------------------------------------------------------

OPENPHENOM = "encoder.vit_backbone."
OPENPHENOM_DECODER = ("decoder.", "encoder_decoder_proj.", "decoder_pred.")


def from_openphenom(state, sincos_2d, path="weights"):
    """OpenPhenom layout -> (MAEConfig fields, our state dict), every encoder tensor used, the decoder's
    skipped (listed in OPENPHENOM_DECODER: its per-channel decoders are not this project's decoder).

    Sizes come from the tensors; the frozen pos_embed must be sincos_2d's table repeated per channel
    (which also gives the grid and the channel count). One quirk is kept exactly: timm's
    ParallelScalingBlock adds cat(qkv_bias = 0, mlp_bias) to the fused [mlp | q | k | v] projection,
    so its `mlp_bias` really lands on the last dim hidden units and on q, k, v; here that is our
    mlp_bias (zeros, then its first dim entries) and qkv_bias (the rest)."""
    P = OPENPHENOM
    take = dict(state)
    need = lambda key: take.pop(P + key) if P + key in take else missing(path, P + key)
    cls_token, pos, patch_w = need("cls_token"), need("pos_embed"), state.get(P + "patch_embed.proj.weight")
    dim, depth = cls_token.shape[-1], 1 + max(int(k[len(P):].split(".")[1]) for k in state if k.startswith(P + "blocks."))
    mlp_dim = state[P + "blocks.0.in_proj.weight"].shape[0] - 3 * dim
    head_dim = state[P + "blocks.0.q_norm.weight"].shape[0]
    patch = patch_w.shape[-1]
    rows = pos.shape[1] - 1
    is_table = lambda g: torch.allclose(pos[0, 1:].float(), sincos_2d(dim, g).repeat(rows // g ** 2, 1), atol=1e-4)
    grid = next((g for g in range(128, 0, -1) if rows % (g * g) == 0 and is_table(g)), None)
    if grid is None or pos[0, 0].abs().max() > 0:
        raise SystemExit(f"{path}: {P}pos_embed is not the sin-cos table this model computes")
    config = dict(img_size=grid * patch, patch_size=patch, in_chans=min(6, rows // grid ** 2), channel_agnostic=True,
                  max_chans=rows // grid ** 2, dim=dim, depth=depth, heads=dim // head_dim, mlp_dim=mlp_dim,
                  parallel_blocks=True, qk_norm=True, qkv_bias=True, layerscale_init=1e-4, drop_path=0.0,
                  norm_eps=1e-6, dec_depth=0)
    ours = {"cls_token": cls_token, "patch_embed.weight": need("patch_embed.proj.weight"),
            "patch_embed.bias": need("patch_embed.proj.bias"),
            "norm.weight": need("fc_norm.weight"), "norm.bias": need("fc_norm.bias")}  # the final norm, unused by embed()
    for i in range(depth):
        ours.update(parallel_block(need, f"blocks.{i}.", dim, mlp_dim))
    left = [k for k in take if not k.startswith(OPENPHENOM_DECODER)]
    if left:
        raise SystemExit(f"{path}: {len(left)} tensor(s) this loader does not use, first {left[0]!r}")
    return config, ours


def to_openphenom(model):
    """Our CA encoder -> the OpenPhenom encoder layout (the inverse of from_openphenom)."""
    c, P = model.config, OPENPHENOM
    sd = model.state_dict()
    grid_rows = model.pos_embed.cpu().repeat(c.max_chans, 1)  # our sin-cos table, once per channel
    out = {P + "cls_token": sd["cls_token"], P + "pos_embed": torch.cat([torch.zeros(1, c.dim), grid_rows])[None],
           P + "patch_embed.proj.weight": sd["patch_embed.weight"], P + "patch_embed.proj.bias": sd["patch_embed.bias"],
           P + "fc_norm.weight": sd["norm.weight"], P + "fc_norm.bias": sd["norm.bias"]}
    for i in range(c.depth):
        out.update(to_parallel_block(sd, f"blocks.{i}.", c.dim, P))
    return out


# ---- timm blocks ----------------------------------------------------------------------------------

PARALLEL_NAMES = (("in_norm", "norm"), ("q_norm", "attn.q_norm"), ("k_norm", "attn.k_norm"),
                  ("attn_out_proj", "attn.out_proj"), ("mlp_out_proj", "mlp_out"))  # timm ParallelScalingBlock -> ours
SEQUENTIAL_NAMES = (("norm1", "norm1"), ("attn.qkv", "qkv"), ("attn.q_norm", "attn.q_norm"), ("attn.k_norm", "attn.k_norm"),
                    ("attn.proj", "attn.out_proj"), ("ls1", "ls1"), ("norm2", "norm2"), ("mlp.fc1", "fc1"),
                    ("mlp.fc2", "fc2"), ("ls2", "ls2"))                     # timm Block -> ours


def parallel_block(need, b, dim, mlp_dim):
    """One timm ParallelScalingBlock's tensors (need(key) pops them) as our ParallelBlock's."""
    ours = {}
    for theirs, mine in PARALLEL_NAMES:
        ours[b + mine + ".weight"], ours[b + mine + ".bias"] = need(b + theirs + ".weight"), need(b + theirs + ".bias")
    ours[b + "in_proj.weight"], ours[b + "ls.gamma"] = need(b + "in_proj.weight"), need(b + "ls.gamma")
    bias = torch.cat([torch.zeros(3 * dim), need(b + "mlp_bias").float()])  # timm's placement: see from_openphenom
    ours[b + "mlp_bias"], ours[b + "qkv_bias"] = bias[:mlp_dim], bias[mlp_dim:]
    return ours


def to_parallel_block(sd, b, dim, prefix=""):
    """The inverse of parallel_block."""
    out = {}
    for theirs, mine in PARALLEL_NAMES:
        out[prefix + b + theirs + ".weight"], out[prefix + b + theirs + ".bias"] = sd[b + mine + ".weight"], sd[b + mine + ".bias"]
    out[prefix + b + "in_proj.weight"], out[prefix + b + "ls.gamma"] = sd[b + "in_proj.weight"], sd[b + "ls.gamma"]
    bias = torch.cat([sd[b + "mlp_bias"], sd[b + "qkv_bias"]])
    if bias[:3 * dim].abs().max() > 0:
        raise ValueError(f"{b}mlp_bias: nonzero on the first {3 * dim} hidden units, which timm's block cannot hold")
    out[prefix + b + "mlp_bias"] = bias[3 * dim:]
    return out


# ---- timm VisionTransformer -----------------------------------------------------------------------

TIMM_UNUSED = ("head.", "fc_norm.")  # a classifier and the pooled-feature norm: embed() uses neither


def from_timm(state, path="weights"):
    """A timm VisionTransformer state dict (standard tokenization; Block or ParallelScalingBlock; with or
    without class token, qkv bias, QK-norm, LayerScale; any patch size, width, depth) -> (MAEConfig
    fields, our state dict). The learned pos_embed is kept (and resampled for other crop sizes); heads
    come from the QK-norm width, else timm's 64 dims per head. head.* and fc_norm.* are recognized and
    skipped; any other tensor this does not use is an error."""
    take = dict(state)
    need = lambda key: take.pop(key) if key in take else missing(path, key)
    if "reg_token" in state:
        raise SystemExit(f"{path}: 'reg_token' (register tokens) is not supported")
    patch_w = state["patch_embed.proj.weight"]
    dim, in_chans, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    parallel = "blocks.0.in_proj.weight" in state
    class_token = "cls_token" in state
    pos = need("pos_embed")[0]
    grid = int(round((pos.shape[0] - class_token) ** 0.5))
    if grid * grid + class_token != pos.shape[0]:
        raise SystemExit(f"{path}: pos_embed has {pos.shape[0]} rows, not a class-token row and a square grid")
    q_norm = state.get("blocks.0.q_norm.weight" if parallel else "blocks.0.attn.q_norm.weight")
    head_dim = q_norm.shape[0] if q_norm is not None else 64
    if parallel:
        mlp_dim = state["blocks.0.in_proj.weight"].shape[0] - 3 * dim
    else:
        mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
        if state["blocks.0.mlp.fc2.weight"].shape[1] != mlp_dim:
            raise SystemExit(f"{path}: blocks.0.mlp.fc1/fc2 do not match (a gated MLP such as SwiGLU is not supported)")
    layerscale = "blocks.0.ls.gamma" in state or "blocks.0.ls1.gamma" in state
    config = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, channel_agnostic=False, dim=dim,
                  depth=depth, heads=dim // head_dim, mlp_dim=mlp_dim, parallel_blocks=parallel,
                  qk_norm=q_norm is not None, qkv_bias=parallel or "blocks.0.attn.qkv.bias" in state,
                  layerscale_init=1e-4 if layerscale else 0.0, drop_path=0.0, norm_eps=1e-6, dec_depth=0,
                  class_token=class_token, learned_pos=True)
    ours = {"patch_embed.weight": need("patch_embed.proj.weight"), "patch_embed.bias": need("patch_embed.proj.bias"),
            "pos_table": pos}
    if class_token:
        ours["cls_token"] = need("cls_token")
    # the final norm is unused by embed(); a model pooled through fc_norm has none: a neutral one stands in
    ours["norm.weight"] = take.pop("norm.weight", torch.ones(dim))
    ours["norm.bias"] = take.pop("norm.bias", torch.zeros(dim))
    for i in range(depth):
        b = f"blocks.{i}."
        if parallel:
            ours.update(parallel_block(need, b, dim, mlp_dim))
            continue
        for theirs, mine in SEQUENTIAL_NAMES:
            for kind in ("weight", "bias", "gamma"):
                if f"{b}{theirs}.{kind}" in take:
                    ours[f"{b}{mine}.{kind}"] = need(f"{b}{theirs}.{kind}")
    left = [k for k in take if not k.startswith(TIMM_UNUSED)]
    if left:
        raise SystemExit(f"{path}: {len(left)} tensor(s) this loader does not use, first {left[0]!r}")
    return config, ours


def to_timm(model):
    """Our standard-tokenization encoder with a learned table -> timm's VisionTransformer layout."""
    c, sd = model.config, model.state_dict()
    out = {"patch_embed.proj.weight": sd["patch_embed.weight"], "patch_embed.proj.bias": sd["patch_embed.bias"],
           "pos_embed": sd["pos_table"][None], "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    if c.class_token:
        out["cls_token"] = sd["cls_token"]
    for i in range(c.depth):
        b = f"blocks.{i}."
        if c.parallel_blocks:
            out.update(to_parallel_block(sd, b, c.dim))
            continue
        for theirs, mine in SEQUENTIAL_NAMES:
            for kind in ("weight", "bias", "gamma"):
                if f"{b}{mine}.{kind}" in sd:
                    out[f"{b}{theirs}.{kind}"] = sd[f"{b}{mine}.{kind}"]
    return out
