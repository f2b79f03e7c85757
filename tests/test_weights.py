"""Loading weights made elsewhere: the OpenPhenom release's layout (maes_microscopy), built here with
random weights, recomputed here straight from the layout's definition."""

import pytest
import torch
import torch.nn.functional as F

import model as mae
import weights

P = weights.OPENPHENOM


def maes_microscopy_table(dim, grid):
    """The frozen position table as maes_microscopy builds it (generate_2d_sincos_pos_embeddings), written
    out here on its own, in float32 as there: per patch (row h, column w) of the grid, row-major,
    [sin(h w_k), cos(h w_k), sin(w w_k), cos(w w_k)] for w_k = 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1."""
    k = torch.arange(dim // 4, dtype=torch.float32)
    frequencies = 1.0 / 10000.0 ** (k / (dim // 4))
    h, w = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    h, w = torch.outer(h.flatten(), frequencies), torch.outer(w.flatten(), frequencies)
    return torch.cat([h.sin(), h.cos(), w.sin(), w.cos()], dim=1)


def openphenom_state(dim=64, depth=2, head_dim=16, mlp=256, patch=8, grid=4, chans=11, seed=0):
    """A random state dict in the OpenPhenom layout (small): encoder under encoder.vit_backbone., a
    frozen pos_embed (zero row, then the sin-cos table once per channel), one fused in_proj per block,
    and decoder tensors the loader must recognize and skip."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.1: torch.randn(*shape, generator=g) * scale
    table = maes_microscopy_table(dim, grid).repeat(chans, 1)
    s = {P + "cls_token": r(1, 1, dim), P + "pos_embed": torch.cat([torch.zeros(1, dim), table])[None],
         P + "patch_embed.proj.weight": r(dim, 1, patch, patch), P + "patch_embed.proj.bias": r(dim),
         P + "fc_norm.weight": 1 + r(dim), P + "fc_norm.bias": r(dim)}
    for i in range(depth):
        b = f"{P}blocks.{i}."
        s.update({b + "in_norm.weight": 1 + r(dim), b + "in_norm.bias": r(dim),
                  b + "in_proj.weight": r(mlp + 3 * dim, dim), b + "mlp_bias": r(mlp),
                  b + "q_norm.weight": 1 + r(head_dim), b + "q_norm.bias": r(head_dim),
                  b + "k_norm.weight": 1 + r(head_dim), b + "k_norm.bias": r(head_dim),
                  b + "attn_out_proj.weight": r(dim, dim), b + "attn_out_proj.bias": r(dim),
                  b + "mlp_out_proj.weight": r(dim, mlp), b + "mlp_out_proj.bias": r(dim),
                  b + "ls.gamma": r(dim, scale=0.5)})
    s.update({"decoder.decoders.0.0.norm1.weight": r(32), "decoder.modality_tokens.0": r(1, 1, 32),
              "encoder_decoder_proj.weight": r(32, dim), "decoder_pred.weight": r(patch * patch, 32)})
    return s


def reference_embedding(s, crops, head_dim=16, eps=1e-6):
    """The layout's forward written out: uint8 / 255, per-crop per-channel instance norm (biased var,
    eps 1e-5), one 1->D patch projection per channel, channel-major tokens + the frozen table, class
    token first; timm's ParallelScalingBlock as timm computes it (bias = cat(qkv_bias = 0, mlp_bias) on
    the [mlp | q | k | v] projection); the mean of the last block's patch tokens."""
    x = crops.float() / 255
    var, mean = torch.var_mean(x, dim=(-2, -1), keepdim=True, correction=0)
    x = (x - mean) / torch.sqrt(var + 1e-5)
    B, C = x.shape[:2]
    w = s[P + "patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    t = F.conv2d(x.reshape(B * C, 1, *x.shape[2:]), w, s[P + "patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2).reshape(B, -1, dim)  # [B, C*N, D], channel-major
    n = t.shape[1] // C
    h = torch.cat([s[P + "cls_token"].expand(B, -1, -1), t + s[P + "pos_embed"][:, 1:1 + C * n]], 1)
    depth = 1 + max(int(k.split(".")[3]) for k in s if k.startswith(P + "blocks."))
    for i in range(depth):
        b = f"{P}blocks.{i}."
        y = F.layer_norm(h, (dim,), s[b + "in_norm.weight"], s[b + "in_norm.bias"], eps)
        mlp = s[b + "mlp_bias"].shape[0]
        y = F.linear(y, s[b + "in_proj.weight"], torch.cat([torch.zeros(3 * dim), s[b + "mlp_bias"]]))
        x_mlp, q, k, v = torch.split(y, [mlp, dim, dim, dim], dim=-1)
        heads = dim // head_dim
        split = lambda z: z.view(B, -1, heads, head_dim).transpose(1, 2)
        q = F.layer_norm(split(q), (head_dim,), s[b + "q_norm.weight"], s[b + "q_norm.bias"], eps)
        k = F.layer_norm(split(k), (head_dim,), s[b + "k_norm.weight"], s[b + "k_norm.bias"], eps)
        attn = torch.softmax(q @ k.transpose(-2, -1) / head_dim ** 0.5, -1) @ split(v)
        attn = F.linear(attn.transpose(1, 2).reshape(B, -1, dim), s[b + "attn_out_proj.weight"], s[b + "attn_out_proj.bias"])
        out = F.linear(F.gelu(x_mlp), s[b + "mlp_out_proj.weight"], s[b + "mlp_out_proj.bias"])
        h = h + s[b + "ls.gamma"] * (attn + out)
    return h[:, 1:].mean(1)


@pytest.mark.parametrize("channels", [1, 3, 6, 11])
def test_openphenom_layout_embeds_like_its_definition(tmp_path, channels):
    s = openphenom_state()
    torch.save({"state_dict": s}, tmp_path / "model.safetensors")  # as released: a torch pickle, named .safetensors
    model = mae.from_pretrained(tmp_path / "model.safetensors").eval()
    c = model.config
    assert (c.dim, c.depth, c.heads, c.mlp_dim, c.patch_size, c.img_size, c.max_chans) == (64, 2, 4, 256, 8, 32, 11)
    assert c.channel_agnostic and c.parallel_blocks and c.dec_depth == 0
    crops = torch.randint(0, 256, (3, channels, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.embed(crops)[0], reference_embedding(s, crops), atol=2e-5, rtol=1e-4)


def test_openphenom_real_safetensors_file(tmp_path):
    save_file = pytest.importorskip("safetensors.torch", reason="safetensors is optional").save_file
    s = openphenom_state(seed=2)
    save_file(s, tmp_path / "model.safetensors")
    model = mae.from_pretrained(tmp_path / "model.safetensors").eval()
    crops = torch.randint(0, 256, (2, 6, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(model.embed(crops)[0], reference_embedding(s, crops), atol=2e-5, rtol=1e-4)


def test_openphenom_round_trip_is_exact():
    """Every learned tensor comes back bit for bit; the frozen table is written from our sin-cos code,
    equal to maes_microscopy's float32 one to its rounding."""
    s = openphenom_state(seed=3)
    config, ours = weights.from_openphenom(s, mae.sincos_2d)
    model = mae.build(mae.MAEConfig(**config), verbose=False)
    model.load_state_dict(ours)
    back = weights.to_openphenom(model)
    encoder = {k: v for k, v in s.items() if k.startswith(P)}
    assert back.keys() == encoder.keys()
    for key, value in encoder.items():
        exact = key != P + "pos_embed"
        torch.testing.assert_close(back[key], value, atol=0 if exact else 1e-5, rtol=0, msg=key)


def test_every_tensor_is_accounted_for(tmp_path):
    s = openphenom_state()
    extra = dict(s, **{P + "blocks.0.surprise": torch.zeros(3)})
    with pytest.raises(SystemExit, match="blocks.0.surprise"):
        weights.from_openphenom(extra, mae.sincos_2d)
    missing = {k: v for k, v in s.items() if k != P + "blocks.1.k_norm.bias"}
    with pytest.raises(SystemExit, match="blocks.1.k_norm.bias"):
        weights.from_openphenom(missing, mae.sincos_2d)
    wrong = dict(s, **{P + "pos_embed": s[P + "pos_embed"].flip(-1)})
    with pytest.raises(SystemExit, match="pos_embed"):
        weights.from_openphenom(wrong, mae.sincos_2d)


# ---- timm VisionTransformer layouts ---------------------------------------------------------------------
# timm itself imports torchvision, whose PyPI build does not load with the CPU torch wheel CI installs;
# so, as for OpenPhenom, the layouts are built here and the forward is written out from timm's code.

def timm_state(dim=128, depth=2, mlp=256, patch=8, grid=4, class_token=True, qkv_bias=True, qk_norm=False,
               layerscale=False, parallel=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.1: torch.randn(*shape, generator=g) * scale
    s = {"patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
         "pos_embed": r(1, class_token + grid * grid, dim, scale=0.5), "norm.weight": 1 + r(dim), "norm.bias": r(dim),
         "head.weight": r(10, dim), "head.bias": r(10)}
    if class_token:
        s["cls_token"] = r(1, 1, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        if parallel:  # a ParallelScalingBlock, as in the OpenPhenom layout
            s.update({k.replace(P + "blocks.0.", b): v for k, v in openphenom_state(dim, 1, 16, mlp, seed=seed + i).items()
                      if k.startswith(P + "blocks.0.")})
            continue
        s.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim),
                  b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim), b + "norm2.weight": 1 + r(dim),
                  b + "norm2.bias": r(dim), b + "mlp.fc1.weight": r(mlp, dim), b + "mlp.fc1.bias": r(mlp),
                  b + "mlp.fc2.weight": r(dim, mlp), b + "mlp.fc2.bias": r(dim)})
        if qkv_bias:
            s[b + "attn.qkv.bias"] = r(3 * dim)
        if qk_norm:
            s.update({b + "attn.q_norm.weight": 1 + r(16), b + "attn.q_norm.bias": r(16),
                      b + "attn.k_norm.weight": 1 + r(16), b + "attn.k_norm.bias": r(16)})
        if layerscale:
            s.update({b + "ls1.gamma": r(dim, scale=0.5), b + "ls2.gamma": r(dim, scale=0.5)})
    return s


def timm_reference(s, x, eps=1e-6):
    """timm's VisionTransformer.forward_features for these layouts, then the mean of the patch tokens;
    x already self-standardized [B, 3, H, W] at the model's own size."""
    dim = s["patch_embed.proj.weight"].shape[0]
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=s["patch_embed.proj.weight"].shape[-1])
    t = t.flatten(2).transpose(1, 2)
    B = len(t)
    prefix = int("cls_token" in s)
    h = torch.cat([s["cls_token"].expand(B, -1, -1), t], 1) if prefix else t
    h = h + s["pos_embed"]
    head_dim = s["blocks.0.attn.q_norm.weight"].shape[0] if "blocks.0.attn.q_norm.weight" in s else 16 if "blocks.0.in_proj.weight" in s else 64
    heads = dim // head_dim
    split = lambda z: z.view(B, -1, heads, head_dim).transpose(1, 2)
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        if b + "in_proj.weight" in s:  # ParallelScalingBlock: the OpenPhenom reference above, on these tokens
            wrapped = {P + k: v for k, v in s.items() if k.startswith(b)}
            wrapped = {k.replace(f"blocks.{i}.", "blocks.0."): v for k, v in wrapped.items()}
            h = parallel_reference_block(wrapped, h, head_dim, eps)
            continue
        y = F.layer_norm(h, (dim,), s[b + "norm1.weight"], s[b + "norm1.bias"], eps)
        q, k, v = F.linear(y, s[b + "attn.qkv.weight"], s.get(b + "attn.qkv.bias")).split(dim, -1)
        q, k, v = split(q), split(k), split(v)
        if b + "attn.q_norm.weight" in s:
            q = F.layer_norm(q, (head_dim,), s[b + "attn.q_norm.weight"], s[b + "attn.q_norm.bias"], eps)
            k = F.layer_norm(k, (head_dim,), s[b + "attn.k_norm.weight"], s[b + "attn.k_norm.bias"], eps)
        a = (torch.softmax(q @ k.transpose(-2, -1) / head_dim ** 0.5, -1) @ v).transpose(1, 2).reshape(B, -1, dim)
        a = F.linear(a, s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        h = h + (s[b + "ls1.gamma"] * a if b + "ls1.gamma" in s else a)
        y = F.layer_norm(h, (dim,), s[b + "norm2.weight"], s[b + "norm2.bias"], eps)
        m = F.linear(F.gelu(F.linear(y, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])), s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])
        h = h + (s[b + "ls2.gamma"] * m if b + "ls2.gamma" in s else m)
    return h[:, prefix:].mean(1)


def parallel_reference_block(s, h, head_dim, eps):
    b = P + "blocks.0."
    B, _, dim = h.shape
    y = F.layer_norm(h, (dim,), s[b + "in_norm.weight"], s[b + "in_norm.bias"], eps)
    mlp = s[b + "mlp_bias"].shape[0]
    y = F.linear(y, s[b + "in_proj.weight"], torch.cat([torch.zeros(3 * dim), s[b + "mlp_bias"]]))
    x_mlp, q, k, v = torch.split(y, [mlp, dim, dim, dim], dim=-1)
    split = lambda z: z.view(B, -1, dim // head_dim, head_dim).transpose(1, 2)
    q = F.layer_norm(split(q), (head_dim,), s[b + "q_norm.weight"], s[b + "q_norm.bias"], eps)
    k = F.layer_norm(split(k), (head_dim,), s[b + "k_norm.weight"], s[b + "k_norm.bias"], eps)
    a = torch.softmax(q @ k.transpose(-2, -1) / head_dim ** 0.5, -1) @ split(v)
    a = F.linear(a.transpose(1, 2).reshape(B, -1, dim), s[b + "attn_out_proj.weight"], s[b + "attn_out_proj.bias"])
    out = F.linear(F.gelu(x_mlp), s[b + "mlp_out_proj.weight"], s[b + "mlp_out_proj.bias"])
    return h + s[b + "ls.gamma"] * (a + out)


TIMM_VARIANTS = {"plain": dict(), "no-class-token+qk-norm+layerscale": dict(class_token=False, qk_norm=True, layerscale=True),
                 "no-qkv-bias": dict(qkv_bias=False), "parallel": dict(dim=64, mlp=256, parallel=True)}


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_timm_layouts_embed_like_timm(tmp_path, variant):
    s = timm_state(**TIMM_VARIANTS[variant])
    torch.save(s, tmp_path / "vit.pth")
    model = mae.from_pretrained(tmp_path / "vit.pth").eval()
    assert model.config.learned_pos and model.config.img_size == 32 and not model.config.channel_agnostic
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(model.embed(x)[0], timm_reference(s, mae.standardize(x)), atol=2e-5, rtol=1e-4)
    back = weights.to_timm(model)  # the round trip, head.* aside (a classifier embed() does not use)
    assert back.keys() == {k for k in s if not k.startswith("head.")}
    for key in back:
        torch.testing.assert_close(back[key], s[key], atol=0, rtol=0, msg=key)


def test_rgb_model_on_microscopy_channels_at_another_size():
    """Each of C channels as a gray RGB image, positions resampled to the crop's grid, embeddings
    concatenated: [1, B, C * D]."""
    s = timm_state(seed=5)
    config, tensors = weights.from_timm(s)
    model = mae.build(mae.MAEConfig(**config), verbose=False).eval()
    model.load_state_dict(tensors)
    crops = torch.randint(0, 256, (2, 5, 48, 48), dtype=torch.uint8)
    z = model.embed(crops)
    assert z.shape == (1, 2, 5 * 128)
    table = s["pos_embed"][0, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resampled = F.interpolate(table, size=(6, 6), mode="bicubic", align_corners=False, antialias=True)
    at_48 = dict(s, pos_embed=torch.cat([s["pos_embed"][0, :1], resampled.permute(0, 2, 3, 1).reshape(36, -1)])[None])
    for c in range(5):
        gray = mae.standardize(crops[:, c:c + 1].expand(-1, 3, -1, -1))
        torch.testing.assert_close(z[0, :, c * 128:(c + 1) * 128], timm_reference(at_48, gray), atol=2e-5, rtol=1e-4)


def test_timm_unknown_tensors_are_errors():
    s = timm_state()
    weights.from_timm(dict(s, **{"fc_norm.weight": torch.ones(128)}))  # known, unused by embed(): no error
    with pytest.raises(SystemExit, match="blocks.1.attn.mystery"):
        weights.from_timm(dict(s, **{"blocks.1.attn.mystery": torch.ones(3)}))
    with pytest.raises(SystemExit, match="reg_token"):
        weights.from_timm(dict(s, reg_token=torch.zeros(1, 4, 128)))


def test_probe_and_evaluate_run_on_converted_weights(tmp_path):
    """The commands work on these files as on our checkpoints: probe.py on an OpenPhenom file (and its
    --trim), evaluate.py on a timm state dict (RGB model, 6 channels, per-channel path)."""
    import json

    import data
    import evaluate
    import probe
    import synth
    synth.synth(tmp_path / "synth", size="tests", seed=0)
    crops = data.prepare(tmp_path / "synth" / "images", tmp_path / "synth" / "metadata.csv", tmp_path / "crops",
                         crop_size=32, workers=2)
    torch.save({"state_dict": openphenom_state()}, tmp_path / "model.safetensors")
    report = probe.main(["--ckpt", str(tmp_path / "model.safetensors"), "--data", str(crops), "--out",
                         str(tmp_path / "probe"), "--trim", "--split_col", "well"])
    assert set(report["curves"]["perturbation"]) == {"1", "2"}
    assert len(mae.from_pretrained(tmp_path / "probe" / "trimmed.pt").blocks) == report["best_block"]["perturbation"]
    torch.save(timm_state(), tmp_path / "vit.pth")
    evaluate.main(["--ckpt", str(tmp_path / "vit.pth"), "--data", str(crops), "--out", str(tmp_path / "eval"),
                   "--align", "centerscale"])
    result = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert result["counts"]["dims"] == 6 * 128 and result["recall"]["CORUM"]["n_pairs"] > 0


@pytest.mark.parametrize("damage,message", [
    ("empty", "an empty file, not a checkpoint"),
    ("text", "not a checkpoint (neither a torch file nor safetensors)"),
    ("random", "not a checkpoint (neither a torch file nor safetensors)"),
    ("safetensors cut in its header", "a truncated safetensors file (its header runs past the end)"),
    ("torch file cut short", "an unreadable torch checkpoint"),
    ("a pickle of more than tensors", "an unreadable torch checkpoint"),
])
def test_a_bad_checkpoint_file_is_one_line(tmp_path, damage, message):
    """Never a traceback, and never torch's advice to load with weights_only=False (which would run
    whatever a foreign pickle holds)."""
    import pickle
    path = tmp_path / "model.safetensors"
    good = tmp_path / "good.pt"
    torch.save({"state_dict": openphenom_state()}, good)
    contents = {"empty": b"", "text": b"these are not weights\n", "random": bytes(range(256)) * 4,
                "safetensors cut in its header": (10_000).to_bytes(8, "little") + b'{"a": {"dtype": "F32"',
                "torch file cut short": good.read_bytes()[:2000],
                "a pickle of more than tensors": pickle.dumps({"state_dict": {"x": object()}}, protocol=2)}
    path.write_bytes(contents[damage])
    with pytest.raises(SystemExit) as error:
        mae.from_pretrained(path)
    assert str(error.value).startswith(f"{path}: {message}") and "weights_only" not in str(error.value)
    assert "\n" not in str(error.value)


def test_a_hub_folder_loads_by_its_path(tmp_path):
    """A folder as a hub download holds one (config.json beside model.safetensors) loads by the folder's path."""
    save_file = pytest.importorskip("safetensors.torch", reason="safetensors is optional").save_file
    s = openphenom_state()
    save_file(s, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    crops = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(mae.from_pretrained(tmp_path).eval().embed(crops)[0], reference_embedding(s, crops), atol=2e-5, rtol=1e-4)
