"""
Weights made elsewhere, translated to this project's MAE: reading the files, and each foreign layout's
tensor names and shapes mapped onto ours (and back). `model.MAE.from_pretrained` is the one entry point;
it calls `read_weights` and `translate`.

- OpenPhenom (CA-MAE-S/16, recursionpharma's maes_microscopy): a timm VisionTransformer of
  ParallelScalingBlocks under `encoder.vit_backbone.`, a frozen sin-cos pos_embed, per-channel decoders;
- timm VisionTransformer state dicts (DINOv2, ImageNet MAE, DeiT III, CLIP, SigLIP, ...): Block or
  ParallelScalingBlock.

This file knows tensor layouts only; it imports nothing of the project (and timm, optional, only to read
an architecture's definition by name). What it needs of the model (the
sin-cos table, to recognize OpenPhenom's frozen one) is handed to it, and what it returns is plain: a
dict of MAEConfig fields and a state dict in our names.
"""

import json
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


def translate(state, path, sincos_2d, heads=None, arch=None, parallel_bias=None):
    """A foreign state dict -> (MAEConfig fields, our state dict), by the layout its keys show.
    heads, arch: what the tensors of a ViT without QK-norm cannot tell (see from_timm).
    parallel_bias: where a ParallelScalingBlock's `mlp_bias` is added, "timm0.9" or "timm1.0" (see
    parallel_block); by default timm 0.9's for the OpenPhenom layout (what it was trained with), current
    timm's for timm state dicts."""
    if parallel_bias not in (None, "timm0.9", "timm1.0"):
        raise ValueError(f"parallel_bias must be 'timm0.9' or 'timm1.0', got {parallel_bias!r}")
    if any(k.startswith(OPENPHENOM) for k in state):
        return from_openphenom(state, sincos_2d, path, parallel_bias or "timm0.9")
    if "patch_embed.proj.weight" in state and ("blocks.0.norm1.weight" in state or "blocks.0.in_norm.weight" in state):
        name, model_args = hub_config(path)
        return from_timm(state, path, heads, arch or name, model_args if arch in (None, name) else {},
                         parallel_bias or "timm1.0")
    raise SystemExit(f"{path}: a layout this loader does not know (first key {next(iter(state), None)!r})")


def hub_config(path):
    """(architecture, model_args) from the config.json that timm and hub folders keep beside the weights
    (in the folder given, or beside the file given); (None, {}) without one."""
    path = Path(path)
    sidecar = (path if path.is_dir() else path.parent) / "config.json"
    if not sidecar.is_file():
        return None, {}
    try:
        config = json.loads(sidecar.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"{sidecar}: not JSON ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise SystemExit(f"{sidecar}: not a JSON object")
    older = config.get("pretrained_cfg")  # older timm kept the name there
    name = config.get("architecture") or (older.get("architecture") if isinstance(older, dict) else None)
    return name, config.get("model_args") or {}


def pop_tensor(take, key, path):
    """take.pop(key): every tensor a layout needs is taken once; a missing one is one line naming it."""
    if key not in take:
        raise SystemExit(f"{path}: no tensor {key!r}, which this layout needs")
    return take.pop(key)


# ---- OpenPhenom -----------------------------------------------------------------------------------

OPENPHENOM = "encoder.vit_backbone."
OPENPHENOM_DECODER = ("decoder.", "encoder_decoder_proj.", "decoder_pred.")


def from_openphenom(state, sincos_2d, path="weights", parallel_bias="timm0.9"):
    """OpenPhenom layout -> (MAEConfig fields, our state dict), every encoder tensor used, the decoder's
    skipped (listed in OPENPHENOM_DECODER: its per-channel decoders are not this project's decoder).

    Sizes come from the tensors; the frozen pos_embed must be sincos_2d's table repeated per channel
    (which also gives the grid and the channel count). The released weights were trained with timm 0.9,
    whose block adds its `mlp_bias` where parallel_block's "timm0.9" says."""
    P = OPENPHENOM
    take = dict(state)
    need = lambda key: pop_tensor(take, P + key, path)
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
                  parallel_blocks=True, qk_norm=True, drop_path=0.0,
                  qkv_bias=P + "blocks.0.in_proj.bias" in state or parallel_bias == "timm0.9",
                  layerscale_init=1e-4 if P + "blocks.0.ls.gamma" in state else 0.0,
                  norm_eps=1e-6, dec_depth=0)
    ours = {"cls_token": cls_token, "patch_embed.weight": need("patch_embed.proj.weight"),
            "patch_embed.bias": need("patch_embed.proj.bias"),
            "norm.weight": need("fc_norm.weight"), "norm.bias": need("fc_norm.bias")}  # the final norm, unused by embed()
    for i in range(depth):
        ours.update(parallel_block(take, P, i, dim, mlp_dim, parallel_bias, path))
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
        out.update(to_parallel_block(sd, f"blocks.{i}.", c.dim, "timm0.9", P))
    return out


# ---- timm blocks ----------------------------------------------------------------------------------

PARALLEL_NAMES = (("in_norm", "norm"), ("q_norm", "attn.q_norm"), ("k_norm", "attn.k_norm"))  # timm's -> ours
SEQUENTIAL_NAMES = (("norm1", "norm1"), ("attn.qkv", "qkv"), ("attn.q_norm", "attn.q_norm"), ("attn.k_norm", "attn.k_norm"),
                    ("attn.proj", "attn.out_proj"), ("ls1", "ls1"), ("norm2", "norm2"), ("mlp.fc1", "fc1"),
                    ("mlp.fc2", "fc2"), ("ls2", "ls2"))                     # timm Block -> ours


def parallel_block(take, prefix, i, dim, mlp_dim, parallel_bias, path):
    """Block i of timm ParallelScalingBlocks under `prefix` (its tensors popped from take) as our
    ParallelBlock's. Its fused projection gives [MLP hidden | q | k | v]. A bias on
    all of it (`in_proj.bias`, timm's qkv_bias=True) means the same in every timm. Without one, the block
    has an `mlp_bias`, added
    - "timm1.0": to the MLP hidden units, as timm >= 1.0 does;
    - "timm0.9": as cat(zeros(3 dim), mlp_bias) onto the whole projection, as timm <= 0.9 did, so it
      lands on the last 3 dim hidden units and on q, k, v: our mlp_bias (zeros, then its first
      mlp_dim - 3 dim entries) and qkv_bias (the rest).
    A fused output projection (fuse_out_proj) on cat(attention, MLP) is split into our two; missing
    output biases (proj_bias=False) are zeros."""
    ours, b = {}, f"{prefix}blocks.{i}."
    need = lambda key: pop_tensor(take, key, path)
    mine = lambda name: f"blocks.{i}.{name}"
    for theirs, name in PARALLEL_NAMES:
        if b + theirs + ".weight" in take:
            ours[mine(name + ".weight")], ours[mine(name + ".bias")] = need(b + theirs + ".weight"), need(b + theirs + ".bias")
    ours[mine("in_proj.weight")] = need(b + "in_proj.weight")
    if b + "ls.gamma" in take:  # LayerScale (OpenPhenom has it; timm's default block does not)
        ours[mine("ls.gamma")] = need(b + "ls.gamma")
    zeros = torch.zeros(dim)
    if b + "out_proj.weight" in take:  # fuse_out_proj: one projection of cat(attention, MLP)
        fused = need(b + "out_proj.weight")
        ours[mine("attn.out_proj.weight")], ours[mine("mlp_out.weight")] = fused[:, :dim], fused[:, dim:]
        ours[mine("attn.out_proj.bias")], ours[mine("mlp_out.bias")] = take.pop(b + "out_proj.bias", zeros), zeros
    else:
        ours[mine("attn.out_proj.weight")] = need(b + "attn_out_proj.weight")
        ours[mine("attn.out_proj.bias")] = take.pop(b + "attn_out_proj.bias", zeros)
        ours[mine("mlp_out.weight")] = need(b + "mlp_out_proj.weight")
        ours[mine("mlp_out.bias")] = take.pop(b + "mlp_out_proj.bias", zeros)
    if b + "in_proj.bias" in take:
        bias = need(b + "in_proj.bias")
        ours[mine("mlp_bias")], ours[mine("qkv_bias")] = bias[:mlp_dim], bias[mlp_dim:]
    elif parallel_bias == "timm0.9":
        bias = torch.cat([torch.zeros(3 * dim), need(b + "mlp_bias").float()])
        ours[mine("mlp_bias")], ours[mine("qkv_bias")] = bias[:mlp_dim], bias[mlp_dim:]
    else:
        ours[mine("mlp_bias")] = need(b + "mlp_bias")
    return ours


def to_parallel_block(sd, b, dim, parallel_bias, prefix=""):
    """The inverse of parallel_block (separate output projections, as ours are)."""
    out = {}
    names = PARALLEL_NAMES + (("attn_out_proj", "attn.out_proj"), ("mlp_out_proj", "mlp_out"))
    for theirs, mine in names:
        if b + mine + ".weight" in sd:
            out[prefix + b + theirs + ".weight"], out[prefix + b + theirs + ".bias"] = sd[b + mine + ".weight"], sd[b + mine + ".bias"]
    out[prefix + b + "in_proj.weight"] = sd[b + "in_proj.weight"]
    if b + "ls.gamma" in sd:
        out[prefix + b + "ls.gamma"] = sd[b + "ls.gamma"]
    if b + "qkv_bias" not in sd:
        out[prefix + b + "mlp_bias"] = sd[b + "mlp_bias"]
        return out
    bias = torch.cat([sd[b + "mlp_bias"], sd[b + "qkv_bias"]])
    if parallel_bias == "timm1.0":
        out[prefix + b + "in_proj.bias"] = bias
    elif bias[:3 * dim].abs().max() > 0:
        raise ValueError(f"{b}mlp_bias: nonzero on the first {3 * dim} hidden units, which timm 0.9's block cannot hold")
    else:
        out[prefix + b + "mlp_bias"] = bias[3 * dim:]
    return out


# ---- timm VisionTransformer -----------------------------------------------------------------------

TIMM_UNUSED = ("head.", "fc_norm.", "attn_pool.")  # a classifier and the pooling heads: embed() uses none


def from_timm(state, path="weights", heads=None, arch=None, model_args=None, parallel_bias="timm1.0"):
    """A timm VisionTransformer state dict (standard tokenization; Block or ParallelScalingBlock; with or
    without class token, its position row (DeiT III has none), qkv bias, QK-norm, LayerScale, CLIP's
    pre-norm; any patch size, width, depth) -> (MAEConfig fields, our state dict). The learned pos_embed
    is kept (and resampled for other crop sizes). head.*, fc_norm.* and attn_pool.* (classifier and
    pooling heads, unused by embed()) are skipped; any other tensor this does not use is an error.

    What the tensors cannot tell: the heads (but for a QK-norm's width), the MLP's activation and the
    norms' eps. These come from `heads`, and from timm's own definition of the architecture `arch`
    (its timm name, built with `model_args` on the meta device; hub folders name it in config.json).
    Without either, a ViT with QK-norm is read with timm's defaults (GELU, eps 1e-6) and one without is
    refused: a guess of 64 dims per head embeds ViT-H/14 (16 heads of 80) a few percent off."""
    take = dict(state)
    need = lambda key: pop_tensor(take, key, path)
    for key, variant in REFUSED_TIMM:
        if key in state:
            raise SystemExit(f"{path}: not supported: {variant} ({key!r})")
    parallel = "blocks.0.in_proj.weight" in state
    norm = "blocks.0.in_norm" if parallel else "blocks.0.norm1"
    if norm + ".bias" not in state:
        raise SystemExit(f"{path}: norms without a bias ({norm}.weight alone: RMSNorm) are not supported")
    patch_w = state["patch_embed.proj.weight"]
    dim, in_chans, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    class_token = "cls_token" in state
    pos = need("pos_embed")[0]
    if class_token and round(pos.shape[0] ** 0.5) ** 2 == pos.shape[0]:  # no position row for the class
        pos = torch.cat([torch.zeros(1, dim), pos])                      # token (DeiT III): a zero one
    grid = int(round((pos.shape[0] - class_token) ** 0.5))
    if grid * grid + class_token != pos.shape[0]:
        raise SystemExit(f"{path}: pos_embed has {pos.shape[0]} rows, not a class-token row and a square grid")
    if parallel:
        mlp_dim = state["blocks.0.in_proj.weight"].shape[0] - 3 * dim
    else:
        mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
        if state["blocks.0.mlp.fc2.weight"].shape[1] != mlp_dim:
            raise SystemExit(f"{path}: blocks.0.mlp.fc1/fc2 do not match (a gated MLP such as SwiGLU is not supported)")
    defined = timm_architecture(arch, model_args or {}, path, dim) if arch else {}
    heads = heads or defined.get("heads") or (model_args or {}).get("num_heads")
    q_norm = state.get("blocks.0.q_norm.weight" if parallel else "blocks.0.attn.q_norm.weight")
    if q_norm is not None:
        if heads and heads * q_norm.shape[0] != dim:
            raise SystemExit(f"{path}: {heads} heads disagree with the QK-norm's {q_norm.shape[0]} dims per head of {dim}")
        heads = dim // q_norm.shape[0]
    if not heads:
        raise SystemExit(f"{path}: the tensors do not tell this ViT's attention heads (it has no QK-norm): pass heads= or "
                         f"arch= (its timm name), or keep timm's config.json beside the weights")
    if dim % heads:
        raise SystemExit(f"{path}: {heads} heads do not divide the width {dim}")
    layerscale = "blocks.0.ls.gamma" in state or "blocks.0.ls1.gamma" in state
    qkv_bias = ("blocks.0.in_proj.bias" in state or parallel_bias == "timm0.9") if parallel else "blocks.0.attn.qkv.bias" in state
    config = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, channel_agnostic=False, dim=dim,
                  depth=depth, heads=heads, mlp_dim=mlp_dim, parallel_blocks=parallel, qk_norm=q_norm is not None,
                  qkv_bias=qkv_bias, layerscale_init=1e-4 if layerscale else 0.0, drop_path=0.0,
                  norm_eps=defined.get("eps", 1e-6), dec_depth=0, class_token=class_token, learned_pos=True,
                  pre_norm="norm_pre.weight" in state, mlp_act=defined.get("act", "gelu"))
    zeros = torch.zeros(dim)
    ours = {"patch_embed.weight": need("patch_embed.proj.weight"),
            "patch_embed.bias": take.pop("patch_embed.proj.bias", zeros), "pos_table": pos}  # CLIP's has no bias
    if class_token:
        ours["cls_token"] = need("cls_token")
    if config["pre_norm"]:
        ours["norm_pre.weight"], ours["norm_pre.bias"] = need("norm_pre.weight"), need("norm_pre.bias")
    # the final norm is unused by embed(); a model pooled through fc_norm has none: a neutral one stands in
    ours["norm.weight"] = take.pop("norm.weight", torch.ones(dim))
    ours["norm.bias"] = take.pop("norm.bias", zeros)
    for i in range(depth):
        b = f"blocks.{i}."
        if parallel:
            ours.update(parallel_block(take, "", i, dim, mlp_dim, parallel_bias, path))
            continue
        for theirs, mine in SEQUENTIAL_NAMES:
            for kind in ("weight", "bias", "gamma"):
                if f"blocks.0.{theirs}.{kind}" in state:  # what block 0 has, every block has: a missing one is named
                    ours[f"{b}{mine}.{kind}"] = need(f"{b}{theirs}.{kind}")
        for mine, width in (("attn.out_proj", dim), ("fc1", mlp_dim), ("fc2", dim)):  # proj_bias=False: zeros
            ours.setdefault(f"{b}{mine}.bias", torch.zeros(width))
    left = [k for k in take if not k.startswith(TIMM_UNUSED)]
    if left:
        raise SystemExit(f"{path}: {len(left)} tensor(s) this loader does not use, first {left[0]!r}")
    return config, ours


REFUSED_TIMM = (("reg_token", "register tokens"), ("patch_embed.norm.weight", "a norm after the patch embedding"),
                ("blocks.0.attn.norm.weight", "a norm inside attention (scale_attn_norm)"),
                ("blocks.0.mlp.norm.weight", "a norm inside the MLP (scale_mlp_norm)"))


def timm_architecture(name, model_args, path, dim):
    """What timm's own definition of an architecture says that the tensors cannot: heads, the MLP's
    activation, the norms' eps (timm builds it on the meta device: no memory, no weights). It must be
    a VisionTransformer as wide as the weights (dim): another one's heads would be wrong in silence."""
    try:
        import timm
    except ImportError:
        raise SystemExit(f"{path}: pip install timm to read {name!r}'s definition (heads, activation, norm eps) "
                         f"from timm") from None
    try:
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, **model_args)
    except Exception as e:  # an unknown name, or arguments it does not take
        raise SystemExit(f"{path}: timm cannot build {name!r} ({type(e).__name__}: {e})".splitlines()[0]) from None
    block = next(iter(getattr(vit, "blocks", [])), None)
    if type(vit).__name__ != "VisionTransformer" or block is None:
        raise SystemExit(f"{path}: {name!r} is a timm {type(vit).__name__}, not a VisionTransformer these weights fit")
    if vit.embed_dim != dim:
        raise SystemExit(f"{path}: {name!r} is {vit.embed_dim} wide, the weights {dim}: not their architecture")
    parallel = hasattr(block, "in_proj")
    act = block.mlp_act if parallel else block.mlp.act
    kind = type(act).__name__
    acts = {("GELU", "none"): "gelu", ("GELU", "tanh"): "gelu_tanh", ("GELUTanh", None): "gelu_tanh",
            ("QuickGELU", None): "quick_gelu"}
    act = acts.get((kind, getattr(act, "approximate", None)))
    if act is None:
        raise SystemExit(f"{path}: {name!r} has the activation {kind}, which this model does not have")
    norm = block.in_norm if parallel else block.norm1
    return dict(heads=block.num_heads if parallel else block.attn.num_heads, act=act, eps=norm.eps)


def to_timm(model):
    """Our standard-tokenization encoder with a learned table -> timm's (>= 1.0) VisionTransformer layout."""
    c, sd = model.config, model.state_dict()
    out = {"patch_embed.proj.weight": sd["patch_embed.weight"], "patch_embed.proj.bias": sd["patch_embed.bias"],
           "pos_embed": sd["pos_table"][None], "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    if c.class_token:
        out["cls_token"] = sd["cls_token"]
    if c.pre_norm:
        out["norm_pre.weight"], out["norm_pre.bias"] = sd["norm_pre.weight"], sd["norm_pre.bias"]
    for i in range(c.depth):
        b = f"blocks.{i}."
        if c.parallel_blocks:
            out.update(to_parallel_block(sd, b, c.dim, "timm1.0"))
            continue
        for theirs, mine in SEQUENTIAL_NAMES:
            for kind in ("weight", "bias", "gamma"):
                if f"{b}{mine}.{kind}" in sd:
                    out[f"{b}{theirs}.{kind}"] = sd[f"{b}{mine}.{kind}"]
    return out
