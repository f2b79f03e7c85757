"""Loading weights made elsewhere: the OpenPhenom release's layout (maes_microscopy, trained with timm
0.9), built here with random weights and recomputed from the layout's definition written out; timm's
ViTs against timm itself."""

import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import model as mae
import weights

timm = pytest.importorskip("timm", reason="timm is in tests/requirements.txt")
from timm.models import save_for_hf  # noqa: E402
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer  # noqa: E402

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
    token first; timm 0.9's ParallelScalingBlock (timm09_parallel_block); the mean of the last block's
    patch tokens."""
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
        h = timm09_parallel_block(s, f"{P}blocks.{i}.", h, head_dim, eps)
    return h[:, 1:].mean(1)


def timm09_parallel_block(s, b, h, head_dim, eps):
    """timm 0.9's ParallelScalingBlock (the tensors under prefix b), as it computed: the bias
    cat(qkv_bias = 0, mlp_bias) on the [mlp | q | k | v] projection."""
    B, _, dim = h.shape
    y = F.layer_norm(h, (dim,), s[b + "in_norm.weight"], s[b + "in_norm.bias"], eps)
    mlp = s[b + "mlp_bias"].shape[0]
    y = F.linear(y, s[b + "in_proj.weight"], torch.cat([torch.zeros(3 * dim), s[b + "mlp_bias"]]))
    x_mlp, q, k, v = torch.split(y, [mlp, dim, dim, dim], dim=-1)
    split = lambda z: z.view(B, -1, dim // head_dim, head_dim).transpose(1, 2)
    q = F.layer_norm(split(q), (head_dim,), s[b + "q_norm.weight"], s[b + "q_norm.bias"], eps)
    k = F.layer_norm(split(k), (head_dim,), s[b + "k_norm.weight"], s[b + "k_norm.bias"], eps)
    attn = torch.softmax(q @ k.transpose(-2, -1) / head_dim ** 0.5, -1) @ split(v)
    attn = F.linear(attn.transpose(1, 2).reshape(B, -1, dim), s[b + "attn_out_proj.weight"], s[b + "attn_out_proj.bias"])
    out = F.linear(F.gelu(x_mlp), s[b + "mlp_out_proj.weight"], s[b + "mlp_out_proj.bias"])
    return h + s[b + "ls.gamma"] * (attn + out)


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


# ---- timm VisionTransformer layouts, against timm itself ---------------------------------------------
# The real package (tests/requirements.txt pins it): its models built with random weights, every tensor
# perturbed (timm starts biases at 0, norms at 1, LayerScale at its init: a loader that dropped or
# misplaced one would still match), written by timm's own hub writer, embedded by timm's
# forward_intermediates at the first, middle and last block, natively and at a resampled size.



def perturbed(vit, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return vit.eval()


def timm_embeddings(vit, x, blocks=(1, 2, 3)):
    """timm's own forward to each block, without the final norm, the patch tokens averaged: what our embed() returns."""
    tokens = vit.forward_intermediates(x, indices=[b - 1 for b in blocks], norm=False, output_fmt="NLC",
                                       intermediates_only=True)
    return torch.stack([t.mean(1) for t in tokens])


def assert_embeds_like(model, vit, size, seed=0):
    """At the native size and at 1.5 times it (timm resampling its table as dynamic_img_size does)."""
    g = torch.Generator().manual_seed(seed)
    patch = model.config.patch_size
    for side in (size, size * 3 // 2 // patch * patch):
        x = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8, generator=g)
        torch.testing.assert_close(model.embed(x, [1, 2, 3]), timm_embeddings(vit, mae.standardize(x)), atol=1e-5, rtol=1e-5)


# timm's names: what each adds to the loader's work
TIMM_FAMILIES = {
    "vit_small_patch16_224": 64,                # the plain ViT: class token, qkv bias, GELU
    "vit_huge_patch14_224": 56,                 # ImageNet MAE's ViT-H/14: 16 heads of 80, told by config.json
    "vit_medium_patch16_gap_256": 64,           # no class token, average pooling through fc_norm
    "deit3_small_patch16_224": 64,              # LayerScale; a class token without a position row
    "vit_small_patch14_dinov2": 56,             # DINOv2: LayerScale, patch 14
    "vit_base_patch16_clip_224": 64,            # CLIP: pre-norm, no patch-embedding bias, LayerNorm eps 1e-5
    "vit_base_patch16_clip_quickgelu_224": 64,  # OpenAI CLIP: QuickGELU
    "vit_base_patch16_siglip_224": 64,          # SigLIP: no class token, attention-pooling head
    "vit_so400m_patch16_siglip_256": 64,        # SigLIP so400m: tanh-approximated GELU, 16 heads of 72
}


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_families_embed_like_timm(tmp_path, name):
    """Loaded from a hub folder as timm writes it (config.json + model.safetensors), by the folder's path."""
    size = TIMM_FAMILIES[name]
    vit = perturbed(timm.create_model(name, pretrained=False, depth=3, img_size=size, num_classes=10, dynamic_img_size=True))
    save_for_hf(vit, tmp_path, safe_serialization=True)
    model = mae.from_pretrained(tmp_path).eval()
    assert model.config.heads == vit.blocks[0].attn.num_heads and model.config.img_size == size
    assert_embeds_like(model, vit, size)


def small_vit(**kwargs):
    return perturbed(VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=3,
                                                 num_classes=10, dynamic_img_size=True), **kwargs}))


PARALLEL_VARIANTS = {  # timm's ParallelScalingBlock as VisionTransformer builds it, and its options
    "timm default (qkv bias, no QK-norm, no LayerScale)": dict(),
    "OpenPhenom's form (mlp_bias, QK-norm, LayerScale)": dict(qkv_bias=False, qk_norm=True, init_values=1e-4),
    "qkv bias and QK-norm": dict(qk_norm=True),
    "fused output projection": dict(block_fn=partial(ParallelScalingBlock, fuse_out_proj=True), qkv_bias=False),
    "no output biases": dict(proj_bias=False, qkv_bias=False),
}


@pytest.mark.parametrize("variant", PARALLEL_VARIANTS)
def test_timm_parallel_blocks_embed_like_timm(tmp_path, variant):
    vit = small_vit(**{"block_fn": ParallelScalingBlock, **PARALLEL_VARIANTS[variant]})
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    assert_embeds_like(mae.from_pretrained(tmp_path / "vit.pth", heads=3).eval(), vit, 32)


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(proj_bias=False, qkv_bias=False),
                                     dict(class_token=False, global_pool="avg", fc_norm=True)])
def test_timm_blocks_embed_like_timm(tmp_path, options):
    """QK-norm gives the heads by itself; missing output biases are zeros; no class token."""
    vit = small_vit(**options)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    heads = None if options.get("qk_norm") else 3
    assert_embeds_like(mae.from_pretrained(tmp_path / "vit.pth", heads=heads).eval(), vit, 32)


def test_mlp_bias_where_the_timm_that_trained_it_adds_it(tmp_path):
    """timm >= 1.0 adds a parallel block's mlp_bias to the MLP's hidden units; timm 0.9 added
    cat(zeros(3 dim), mlp_bias) to the whole [mlp | q | k | v] projection (timm issue 2653). A timm
    state dict is read the current way; parallel_bias='timm0.9' reads it as timm 0.9 computed it (the
    written-out OpenPhenom reference above), and the OpenPhenom layout is read that way by default."""
    vit = small_vit(block_fn=ParallelScalingBlock, qkv_bias=False, qk_norm=True, init_values=1e-4)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    now = mae.from_pretrained(tmp_path / "vit.pth").eval()
    then = mae.from_pretrained(tmp_path / "vit.pth", parallel_bias="timm0.9").eval()
    torch.testing.assert_close(now.embed(x), timm_embeddings(vit, mae.standardize(x), [3]), atol=1e-5, rtol=1e-5)
    h = vit._pos_embed(vit.patch_embed(mae.standardize(x)))
    for i in range(3):
        h = timm09_parallel_block(vit.state_dict(), f"blocks.{i}.", h, 32, 1e-6)
    torch.testing.assert_close(then.embed(x)[0], h[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    assert (now.embed(x) - then.embed(x)).abs().max() > 1e-3  # the two placements differ: the choice matters
    back = weights.to_timm(now)  # the round trip writes timm 1.0's form
    assert back.keys() == {k for k in vit.state_dict() if not k.startswith("head.")}
    for key in back:
        torch.testing.assert_close(back[key], vit.state_dict()[key], atol=0, rtol=0, msg=key)


def test_heads_are_never_guessed(tmp_path):
    """ViT-H/14 is 1280 wide with 16 heads of 80: 64 dims per head would make it 20. Without QK-norm,
    heads come from heads=, arch= (timm's definition) or timm's config.json, else one line says so."""
    vit = perturbed(timm.create_model("vit_huge_patch14_224", pretrained=False, depth=3, img_size=56, num_classes=0,
                                       dynamic_img_size=True))
    torch.save(vit.state_dict(), tmp_path / "vit_h.pth")
    with pytest.raises(SystemExit, match="do not tell this ViT's attention heads") as error:
        mae.from_pretrained(tmp_path / "vit_h.pth")
    assert "\n" not in str(error.value)
    for given in (dict(heads=16), dict(arch="vit_huge_patch14_224")):
        assert_embeds_like(mae.from_pretrained(tmp_path / "vit_h.pth", **given).eval(), vit, 56)
    (tmp_path / "config.json").write_text("{'architecture': ")  # beside the file, damaged
    with pytest.raises(SystemExit, match="config.json: not JSON"):
        mae.from_pretrained(tmp_path / "vit_h.pth")
    (tmp_path / "config.json").write_text('{"architecture": "vit_huge_patch14_224"}')
    assert mae.from_pretrained(tmp_path / "vit_h.pth").config.heads == 16
    with pytest.raises(SystemExit, match="20 heads disagree with the QK-norm's 32 dims per head"):
        weights.from_timm(small_vit(qk_norm=True).state_dict(), heads=20)
    with pytest.raises(SystemExit, match="timm cannot build 'no_such_vit'"):
        mae.from_pretrained(tmp_path / "vit_h.pth", arch="no_such_vit")


@pytest.mark.parametrize("named,message", [
    ("resnet50", "'resnet50' is a timm ResNet, not a VisionTransformer these weights fit"),
    ("vit_base_patch16_224", "'vit_base_patch16_224' is 768 wide, the weights 96: not their architecture"),
])
def test_a_name_that_is_not_the_weights_architecture_is_refused(tmp_path, named, message):
    """A config.json (or arch=) naming another model: a ResNet has no ViT blocks (a traceback before), and
    ViT-B's 12 heads divide this 96-wide ViT too, so its heads would have been taken in silence."""
    torch.save(small_vit().state_dict(), tmp_path / "vit.pth")
    (tmp_path / "config.json").write_text(f'{{"architecture": "{named}"}}')
    with pytest.raises(SystemExit, match=message):
        mae.from_pretrained(tmp_path / "vit.pth")


def test_an_architecture_named_without_timm_installed_is_one_line(tmp_path, monkeypatch):
    """The name in config.json cannot be read without timm: one line saying to install it, no guess."""
    torch.save(small_vit(qk_norm=True).state_dict(), tmp_path / "vit.pth")
    (tmp_path / "config.json").write_text('{"architecture": "vit_base_patch16_clip_quickgelu_224"}')
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets where it is not installed
    with pytest.raises(SystemExit, match="pip install timm to read 'vit_base_patch16_clip_quickgelu_224'"):
        mae.from_pretrained(tmp_path / "vit.pth")


@pytest.mark.parametrize("options,variant", [
    (dict(reg_tokens=4, no_embed_class=True), "not supported: register tokens"),
    (dict(scale_mlp_norm=True), "not supported: a norm inside the MLP"),
    (dict(norm_layer="rmsnorm"), "norms without a bias"),
    (dict(mlp_ratio=16 / 3, mlp_layer="swiglu_packed"), "a gated MLP such as SwiGLU"),
])
def test_timm_variants_refused_by_name(tmp_path, options, variant):
    from timm.layers import RmsNorm, SwiGLUPacked
    options = {k: {"rmsnorm": RmsNorm, "swiglu_packed": SwiGLUPacked}.get(v, v) if isinstance(v, str) else v
               for k, v in options.items()}
    torch.save(small_vit(**options).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(SystemExit, match=variant) as error:
        mae.from_pretrained(tmp_path / "vit.pth", heads=3)
    assert "\n" not in str(error.value)


def test_rgb_model_on_microscopy_channels_at_another_size(tmp_path):
    """Each of C channels as a gray RGB image at the crop's size (timm resampling its positions),
    embeddings concatenated: [1, B, C * D]."""
    vit = small_vit(qk_norm=True)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = mae.from_pretrained(tmp_path / "vit.pth").eval()
    crops = torch.randint(0, 256, (2, 5, 48, 48), dtype=torch.uint8)
    z = model.embed(crops)
    assert z.shape == (1, 2, 5 * 96)
    for c in range(5):
        gray = mae.standardize(crops[:, c:c + 1].expand(-1, 3, -1, -1))
        torch.testing.assert_close(z[0, :, c * 96:(c + 1) * 96], timm_embeddings(vit, gray, [3])[0], atol=1e-5, rtol=1e-5)


def test_timm_unknown_tensors_are_errors():
    s = small_vit(qk_norm=True).state_dict()
    weights.from_timm(dict(s, **{"fc_norm.weight": torch.ones(96)}))  # known, unused by embed(): no error
    with pytest.raises(SystemExit, match="blocks.1.attn.mystery"):
        weights.from_timm(dict(s, **{"blocks.1.attn.mystery": torch.ones(3)}))


@pytest.mark.parametrize("dropped", ["blocks.1.mlp.fc2.bias", "blocks.2.attn.proj.bias", "blocks.1.norm2.bias"])
def test_bad_input_a_timm_file_missing_one_blocks_bias_is_one_line_naming_it(tmp_path, dropped):
    """A bias that block 0 has and a later block lacks is a damaged file, not timm's proj_bias=False: it
    was read as zeros (embeddings 0.33 off). Saved as safetensors, as a hub would, and loaded by path."""
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in small_vit(qk_norm=True).state_dict().items() if k != dropped}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(SystemExit, match=rf"model.safetensors: no tensor '{dropped}', which this layout needs"):
        mae.from_pretrained(tmp_path / "model.safetensors")


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
    torch.save(small_vit(qk_norm=True).state_dict(), tmp_path / "vit.pth")
    evaluate.main(["--ckpt", str(tmp_path / "vit.pth"), "--data", str(crops), "--out", str(tmp_path / "eval"),
                   "--align", "centerscale"])
    result = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert result["counts"]["dims"] == 6 * 96 and result["recall"]["CORUM"]["n_pairs"] > 0


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
