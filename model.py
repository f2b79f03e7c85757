"""
The channel-agnostic ViT masked autoencoder of "ViTally Consistent" (arXiv 2411.02572).

One file, top to bottom: config and presets, sin-cos positions, the two block forms
(sequential and the released models' parallel block), the MAE (self-standardization,
standard or channel-agnostic tokenization, masking, encoder, decoder, MSE + Fourier
loss), embeddings of any set of blocks from one forward pass, trimming, FLOPs accounting,
and the one loader, from_pretrained (weights made elsewhere are translated by weights.py).

Shapes: B crops, C channels, H = W = img_size, p = patch_size, N = (H/p)^2 patches per
channel, T tokens (N for standard tokenization, C*N for channel-agnostic), D width.
"""

import json
import os
import warnings
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from einops import rearrange
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

import weights

# One process reads and writes checkpoints without a process group on purpose (no_dist); torch 2.14
# warns about it at every load and save all the same.
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized, assuming")


@dataclass
class MAEConfig:
    img_size: int = 256           # crop side in pixels
    patch_size: int = 16          # patch side in pixels
    in_chans: int = 6             # channels of the training data (standard tokenization needs exactly this many)
    channel_agnostic: bool = False  # CA-MAE: each channel tokenized alone by one shared 1->D projection
    channel_embed: bool = False   # CA only: add a learned per-channel embedding (off = the released CA-MAE encoder)
    max_chans: int = 11           # CA only: most channels a model accepts (size of the channel tables)
    channelwise_embeddings: bool = False  # CA only: embed = each channel's mean token, concatenated [C*D]
    channel_names: tuple = ()     # CA only: the stain of each channel-table row; train.py appends its data's new names
    dim: int = 384                # encoder width
    depth: int = 12               # encoder blocks
    heads: int = 6                # attention heads (must divide dim)
    mlp_dim: int = 1536           # MLP hidden width
    parallel_blocks: bool = True  # one LayerNorm, one fused projection, attention + MLP summed (released models)
    qk_norm: bool = True          # per-head LayerNorm of queries and keys (keeps big ViTs stable)
    qkv_bias: bool = False        # a bias on q, k, v (off in the released models)
    layerscale_init: float = 1e-4  # 0 turns LayerScale off
    drop_path: float = 0.1        # stochastic depth at the last block (linear from 0)
    norm_eps: float = 1e-6        # LayerNorm epsilon
    dec_dim: int = 512            # decoder width
    dec_depth: int = 8            # decoder blocks (0: an encoder only, for inference)
    dec_heads: int = 16           # decoder attention heads
    dec_mlp_dim: int = 2048       # decoder MLP hidden width
    mask_ratio: float = 0.75      # fraction of tokens masked in training
    fourier_weight: float = 0.01  # a in (1 - a) * MSE + a * Fourier loss
    norm_pix_loss: bool = False   # released configs: off (the target is the self-standardized crop)
    # for timm ViTs loaded by weights.py, which need them: no class token, a learned position table
    class_token: bool = True      # False only for loaded ViTs made without one (no decoder then)
    learned_pos: bool = False     # a learned table (resampled for other crop sizes) instead of fixed sin-cos
    pre_norm: bool = False        # a LayerNorm on the tokens before the first block (CLIP ViTs)
    mlp_act: str = "gelu"         # the MLP's activation: gelu, gelu_tanh (approximate), quick_gelu (OpenAI CLIP)

    @staticmethod
    def from_preset(name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(MAEConfig(), **{**PRESETS[name], **overrides})


# Sizes from the papers (arXiv 2411.02572, the model table; arXiv 2404.10242). vitg8's 16 heads and
# MLP 8192 are not pinned down there; with them the encoder counts 1.84B parameters, matching ~1.86B.
PRESETS = {
    "vits16": dict(patch_size=16, dim=384, depth=12, heads=6, mlp_dim=1536, drop_path=0.1),
    "vitb16": dict(patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072, drop_path=0.1),
    "vitl16": dict(patch_size=16, dim=1024, depth=24, heads=16, mlp_dim=4096, drop_path=0.3),
    "vitl8": dict(patch_size=8, dim=1024, depth=24, heads=16, mlp_dim=4096, drop_path=0.3),
    "vitg8": dict(patch_size=8, dim=1664, depth=48, heads=16, mlp_dim=8192, drop_path=0.6),
}


def sincos_2d(dim, grid):
    """Fixed 2-D sin-cos positions [grid*grid, dim]: first half encodes the row, second the column."""
    assert dim % 4 == 0, "sin-cos positions need a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")
    def encode(pos):  # [grid*grid] -> [grid*grid, dim/2]
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)
    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def standardize(x, eps=1e-5):
    """Self-standardization: z-score each crop's each channel on its own (instance norm, no affine).
    uint8/uint16 are first scaled to [0, 1] as the released models do; a constant channel becomes 0."""
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.dtype == torch.uint16:
        x = x.float() / 65535
    else:
        x = x.float()
    var, mean = torch.var_mean(x, dim=(-2, -1), keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps)


def assign(param, value):
    """Copy a full-size value into a parameter; an FSDP2-sharded one (a DTensor) keeps its own shard."""
    value = value.to(param.device)
    if isinstance(param, DTensor):
        value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""
    if p == 0.0 or not training:
        return x
    keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= p).to(x.dtype)
    return x * keep / (1 - p)


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"),
               "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


class LayerScale(nn.Module):
    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


def layerscale(dim, init):
    return LayerScale(dim, init) if init > 0 else nn.Identity()


class Attention(nn.Module):
    """Multi-head attention on a fused qkv tensor, with optional per-head QK LayerNorm."""
    def __init__(self, dim, heads, qk_norm, eps):
        super().__init__()
        self.heads = heads
        self.q_norm = nn.LayerNorm(dim // heads, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads, eps=eps) if qk_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, qkv):  # [B, T, 3*D] -> [B, T, D]
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.heads)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.out_proj(rearrange(x, "b h t d -> b t (h d)"))


class SequentialBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm(x)), then x + mlp(norm(x)), each under its LayerScale."""
    def __init__(self, dim, heads, mlp_dim, qk_norm=False, qkv_bias=True, layerscale_init=0.0,
                 drop_path=0.0, eps=1e-6, act="gelu"):
        super().__init__()
        self.drop_path = drop_path
        self.act = ACTIVATIONS[act]
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn = Attention(dim, heads, qk_norm, eps)
        self.ls1 = layerscale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.ls2 = layerscale(dim, layerscale_init)

    def forward(self, x):  # [B, T, D], the residual stream in fp32 (see ParallelBlock.forward)
        h = self.ls1(self.attn(self.qkv(self.norm1(x.to(self.norm1.weight.dtype)))))
        x = x + drop_path(h, self.drop_path, self.training).to(x.dtype)
        h = self.ls2(self.fc2(self.act(self.fc1(self.norm2(x.to(self.norm2.weight.dtype))))))
        return x + drop_path(h, self.drop_path, self.training).to(x.dtype)


class ParallelBlock(nn.Module):
    """The released models' block: one LayerNorm, one fused projection to [MLP hidden | q | k | v],
    attention and MLP computed side by side and summed under ONE LayerScale."""
    def __init__(self, dim, heads, mlp_dim, qk_norm=True, qkv_bias=False, layerscale_init=1e-4,
                 drop_path=0.0, eps=1e-6, act="gelu"):
        super().__init__()
        self.drop_path = drop_path
        self.act = ACTIVATIONS[act]
        self.mlp_dim = mlp_dim
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.in_proj = nn.Linear(dim, mlp_dim + 3 * dim, bias=False)
        self.mlp_bias = nn.Parameter(torch.zeros(mlp_dim))
        # a qkv bias: the form OpenPhenom's released blocks need (timm 0.9 adds mlp_bias onto q, k, v)
        self.qkv_bias = nn.Parameter(torch.zeros(3 * dim)) if qkv_bias else None
        self.attn = Attention(dim, heads, qk_norm, eps)
        self.mlp_out = nn.Linear(mlp_dim, dim)
        self.ls = layerscale(dim, layerscale_init)

    def forward(self, x):  # [B, T, D]
        # The branch computes in the weights' dtype (bf16 under FSDP's mixed precision), the residual
        # sum in x's (fp32): in bf16, x + LayerScale(1e-4) * y would round most of the update away.
        hidden, qkv = self.in_proj(self.norm(x.to(self.norm.weight.dtype))).split([self.mlp_dim, 3 * x.shape[-1]], dim=-1)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        y = self.attn(qkv) + self.mlp_out(self.act(hidden + self.mlp_bias.to(hidden.dtype)))  # bf16 under autocast too
        return x + drop_path(self.ls(y), self.drop_path, self.training).to(x.dtype)


class DecoderBlock(SequentialBlock):
    """The decoder's block: a sequential block under a class of its own, so that compiled, the decoder's
    graphs (another width) are kept apart from those of an encoder made of sequential blocks."""
    def forward(self, x):
        return super().forward(x)


class MAE(nn.Module):
    def __init__(self, config: MAEConfig):
        super().__init__()
        c = self.config = config
        assert c.img_size % c.patch_size == 0, f"img_size {c.img_size} is not a multiple of patch_size {c.patch_size}"
        self.grid = c.img_size // c.patch_size
        # encoder
        self.patch_embed = nn.Conv2d(1 if c.channel_agnostic else c.in_chans, c.dim, c.patch_size, c.patch_size)
        assert c.class_token or not c.dec_depth, "the decoder expects a class token"
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.class_token else None
        self.channel_embed = nn.Parameter(torch.zeros(c.max_chans, c.dim)) if c.channel_embed else None
        Block = ParallelBlock if c.parallel_blocks else SequentialBlock
        self.blocks = nn.ModuleList(
            Block(c.dim, c.heads, c.mlp_dim, c.qk_norm, c.qkv_bias, c.layerscale_init,
                  c.drop_path * i / max(c.depth - 1, 1), c.norm_eps, c.mlp_act) for i in range(c.depth))
        self.norm_pre = nn.LayerNorm(c.dim, eps=c.norm_eps) if c.pre_norm else nn.Identity()
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)  # before the decoder only; embeddings are raw tokens
        # decoder: standard MAE blocks; in CA a learned token per channel tells it which channel to predict.
        # dec_depth 0: none at all (a trimmed encoder, for inference)
        self.register_buffer("pos_embed", torch.empty(self.grid ** 2, c.dim), persistent=False)
        if c.dec_depth:
            self.dec_embed = nn.Linear(c.dim, c.dec_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, c.dec_dim))
            self.dec_channel_embed = nn.Parameter(torch.zeros(c.max_chans, c.dec_dim)) if c.channel_agnostic else None
            self.dec_blocks = nn.ModuleList(
                DecoderBlock(c.dec_dim, c.dec_heads, c.dec_mlp_dim, eps=c.norm_eps) for _ in range(c.dec_depth))
            self.dec_norm = nn.LayerNorm(c.dec_dim, eps=c.norm_eps)
            self.dec_pred = nn.Linear(c.dec_dim, c.patch_size ** 2 * (1 if c.channel_agnostic else c.in_chans))
            self.register_buffer("dec_pos_embed", torch.empty(self.grid ** 2, c.dec_dim), persistent=False)
        # (fixed tables are non-persistent buffers: never saved, refilled by init_weights() after to_empty())
        # a learned table: the class token's row (if any), then the grid's
        self.pos_table = nn.Parameter(torch.zeros(c.class_token + self.grid ** 2, c.dim)) if c.learned_pos else None
        self.activation_checkpointing = False  # recompute each block in the backward pass to save memory
        if not self.patch_embed.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed=0):
        """MAE's initialization (xavier for matrices, N(0, 0.02) for tokens and channel tables, LayerScale
        at its init, norms 1, biases 0); fills the sin-cos tables too (call it after to_empty() from meta).
        Each parameter is drawn on the CPU from its own generator, so a model built whole, from meta, or
        sharded by FSDP over any number of ranks starts from the same weights."""
        self.pos_embed.copy_(sincos_2d(self.config.dim, self.grid))
        if self.config.dec_depth:
            self.dec_pos_embed.copy_(sincos_2d(self.config.dec_dim, self.grid))
        tables = ("cls_token", "mask_token", "channel_embed", "dec_channel_embed", "pos_table")
        for i, (name, p) in enumerate(self.named_parameters()):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
            value = torch.zeros(p.shape)
            if name in tables:
                nn.init.normal_(value, std=0.02, generator=generator)
            elif p.ndim >= 2:  # Linear weights, and the patch projection as a linear layer
                nn.init.xavier_uniform_(value.view(p.shape[0], -1), generator=generator)
            elif name.endswith("gamma"):
                value.fill_(self.config.layerscale_init)
            elif name.endswith(".weight"):  # LayerNorm
                value.fill_(1.0)
            assign(p, value)

    # ---- tokens -------------------------------------------------------------------------------

    def check_input(self, x, any_size=False):
        c = self.config
        size_ok = x.shape[-1] == x.shape[-2] and x.shape[-1] % c.patch_size == 0 if any_size else \
            x.shape[-2:] == (c.img_size, c.img_size)
        if x.ndim != 4 or not size_ok:
            raise ValueError(f"expected crops [B, C, {c.img_size}, {c.img_size}], got {list(x.shape)}")
        if c.channel_agnostic and not 1 <= x.shape[1] <= c.max_chans:
            raise ValueError(f"this model accepts 1 to {c.max_chans} channels, got {x.shape[1]}")
        if not c.channel_agnostic and x.shape[1] != c.in_chans:
            raise ValueError(f"this model was built for {c.in_chans} channels, got {x.shape[1]}")

    def channel_ids(self, x, channels):
        """Which channel-table row each input channel uses: given, or 0..C-1 in input order."""
        return torch.arange(x.shape[1], device=x.device) if channels is None else channels.to(x.device)

    def tokenize(self, x, channels=None):
        """Standardized crops [B, C, H, W] -> patch tokens with positions [B, T, D] (no class token)."""
        B, C = x.shape[:2]
        grid = x.shape[-1] // self.config.patch_size
        if self.config.channel_agnostic:  # channel-major token order: all of channel 0, then channel 1, ...
            x = x.to(self.patch_embed.weight.dtype)  # bf16 under FSDP mixed precision
            t = self.patch_embed(x.reshape(B * C, 1, *x.shape[2:]))             # [B*C, D, g, g]
            t = rearrange(t, "(b c) d h w -> b c (h w) d", b=B) + self.positions(grid)  # same positions per channel
            if self.channel_embed is not None:
                t = t + self.channel_embed[self.channel_ids(x, channels)][:, None, :]
            return t.flatten(1, 2).float()                             # [B, C*N, D], the residual stream in fp32
        t = self.patch_embed(x.to(self.patch_embed.weight.dtype))
        return (rearrange(t, "b d h w -> b (h w) d") + self.positions(grid)).float()  # [B, N, D]

    def positions(self, grid):
        """Position codes of a grid x grid patch layout [grid^2, D]: the model's own, or for crops of
        another size the sin-cos table of that grid / the learned table resampled bicubically (as timm
        resamples position embeddings)."""
        if self.pos_table is None:
            return self.pos_embed if grid == self.grid else sincos_2d(self.config.dim, grid).to(self.pos_embed)
        table = self.pos_table[int(self.config.class_token):]
        if grid == self.grid:
            return table
        table = rearrange(table, "(h w) d -> 1 d h w", h=self.grid)
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
        return rearrange(table, "1 d h w -> (h w) d")

    def patchify(self, x):
        """The reconstruction target: [B, C, H, W] -> [B, T, p*p*c], in the token order of tokenize()."""
        p = self.config.patch_size
        if self.config.channel_agnostic:
            return rearrange(x, "b c (h p) (w q) -> b (c h w) (p q)", p=p, q=p)
        return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)

    def unpatchify(self, patches, chans):
        """Inverse of patchify: [B, T, p*p*c] -> [B, C, H, W]."""
        p, g = self.config.patch_size, self.grid
        if self.config.channel_agnostic:
            return rearrange(patches, "b (c h w) (p q) -> b c (h p) (w q)", c=chans, h=g, p=p)
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=g, p=p, c=chans)

    def random_masking(self, tokens):
        """Keep a random subset of each sample's tokens; exactly round(mask_ratio * T) are masked.
        Returns visible tokens [B, T_keep, D], mask [B, T] (1 = masked) and ids_restore [B, T]."""
        B, T, D = tokens.shape
        n_keep = T - round(self.config.mask_ratio * T)
        noise = torch.rand(B, T, device=tokens.device)
        ids_shuffle = noise.argsort(dim=1)          # ascending: the first n_keep are kept
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :n_keep]
        visible = tokens.gather(1, ids_keep[..., None].expand(-1, -1, D))
        mask = torch.ones(B, T, device=tokens.device)
        mask[:, :n_keep] = 0
        return visible, mask.gather(1, ids_restore), ids_restore

    def with_cls(self, tokens):
        """The class token (with its learned position, if any) before the tokens; then the pre-norm of
        the ViTs that have one: what the first block sees."""
        if self.cls_token is not None:
            cls = self.cls_token if self.pos_table is None else self.cls_token + self.pos_table[:1]
            tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.norm_pre(tokens)

    # ---- MAE training ---------------------------------------------------------------------------

    def run_blocks(self, blocks, h):
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.activation_checkpointing else block(h)
        return h

    def forward_encoder(self, x, channels=None):
        tokens, mask, ids_restore = self.random_masking(self.tokenize(x, channels))
        h = self.run_blocks(self.blocks, self.with_cls(tokens))
        return self.norm(h.to(self.norm.weight.dtype)), mask, ids_restore

    def forward_decoder(self, h, ids_restore, x, channels=None):
        """Encoded visible tokens [B, 1+T_keep, D] -> predicted patches [B, T, p*p*c]."""
        h = self.dec_embed(h)
        B, T = ids_restore.shape
        tokens = torch.cat([h[:, 1:], self.mask_token.expand(B, T + 1 - h.shape[1], -1)], dim=1)
        tokens = tokens.gather(1, ids_restore[..., None].expand(-1, -1, h.shape[-1]))  # unshuffle: [B, T, Dd]
        if self.config.channel_agnostic:
            C = x.shape[1]
            pos = self.dec_pos_embed.repeat(C, 1)
            chan = self.dec_channel_embed[self.channel_ids(x, channels)].repeat_interleave(self.grid ** 2, dim=0)
            tokens = tokens + pos + chan
        else:
            tokens = tokens + self.dec_pos_embed
        h = self.run_blocks(self.dec_blocks, torch.cat([h[:, :1], tokens], dim=1))
        return self.dec_pred(self.dec_norm(h[:, 1:].to(self.dec_norm.weight.dtype)))  # the class token predicts nothing

    def loss(self, target, pred, mask):
        """(1 - a) * MSE + a * Fourier loss, each averaged over masked patches only.
        The Fourier term is the L1 distance between |FFT2| of each predicted and target patch."""
        c = self.config
        if c.norm_pix_loss:
            var, mean = torch.var_mean(target, dim=-1, keepdim=True)
            target = (target - mean) * torch.rsqrt(var + 1e-6)
        per_patch = ((pred - target) ** 2).mean(dim=-1)                          # [B, T]
        if c.fourier_weight > 0:
            per_patch = (1 - c.fourier_weight) * per_patch + c.fourier_weight * self.fourier_loss(target, pred)
        return (per_patch * mask).sum() / mask.sum()

    def fourier_loss(self, target, pred):
        """Per patch: mean over channels and the p x p frequencies of | |FFT2(pred)| - |FFT2(target)| |.
        The spectrum of a real patch is symmetric, so rfft2's half spectrum, with the columns that stand
        for two counted twice, gives the same mean at a third of the cost."""
        p = self.config.patch_size
        spectrum = lambda t: torch.fft.rfft2(rearrange(t, "b t (p q c) -> b t c p q", p=p, q=p)).abs()
        twice = torch.full((p // 2 + 1,), 2.0, device=pred.device)
        twice[0] = 1.0
        if p % 2 == 0:
            twice[-1] = 1.0  # the Nyquist column has no mirror image
        difference = (spectrum(pred) - spectrum(target)).abs() * twice          # [B, T, c, p, p/2+1]
        return difference.sum(dim=(-2, -1)).mean(dim=-1) / p ** 2               # [B, T]

    def forward(self, x, channels=None):
        """x: crops [B, C, H, W] (uint8, uint16 or float). Returns (loss, pred [B, T, p*p*c], mask [B, T])."""
        if not self.config.dec_depth:
            raise ValueError("this encoder was trimmed and has no decoder: use embed()")
        self.check_input(x)
        x = standardize(x)
        h, mask, ids_restore = self.forward_encoder(x, channels)
        pred = self.forward_decoder(h, ids_restore, x, channels)
        return self.loss(self.patchify(x).float(), pred.float(), mask), pred, mask

    # ---- inference ------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, x, blocks=None, channels=None):
        """Mean of the patch tokens (class token excluded, no final norm) after each requested block,
        all from ONE unmasked forward pass. blocks: 1-based block numbers, default the last.
        Returns [len(blocks), B, D]. Crops of another size than img_size are fine (positions resampled).
        A CA-MAE with channelwise_embeddings averages each channel's tokens apart and concatenates:
        [len(blocks), B, C * D] (OpenPhenom's return_channelwise_embeddings).
        A 3-channel (RGB) model given C != 3 channels embeds each channel on its own as a gray image and
        concatenates: [len(blocks), B, C * D] (how the paper ran natural-image ViTs on Cell Painting)."""
        c = self.config
        if not c.channel_agnostic and c.in_chans == 3 and x.ndim == 4 and x.shape[1] != 3:
            return torch.cat([self.embed(x[:, i:i + 1].expand(-1, 3, -1, -1), blocks) for i in range(x.shape[1])], -1)
        self.check_input(x, any_size=True)
        blocks = [len(self.blocks)] if blocks is None else list(blocks)
        if not all(1 <= b <= len(self.blocks) for b in blocks):
            raise ValueError(f"blocks must be in 1..{len(self.blocks)}, got {blocks}")
        h = self.with_cls(self.tokenize(standardize(x), channels))
        pooled = {}
        for i, block in enumerate(self.blocks[:max(blocks)], start=1):
            h = block(h)
            if i in blocks:
                tokens = h[:, int(c.class_token):]
                if c.channel_agnostic and c.channelwise_embeddings:  # tokens are channel-major
                    pooled[i] = tokens.unflatten(1, (x.shape[1], -1)).mean(dim=2).flatten(1)
                else:
                    pooled[i] = tokens.mean(dim=1)
        return torch.stack([pooled[b] for b in blocks])

    def trim(self, k):
        """Keep blocks 1..k (1-based, as the paper counts) and drop the rest and the decoder: the encoder
        for inference, whose last block is k. Its state_dict and config (depth k, dec_depth 0) rebuild it."""
        if not 1 <= k <= len(self.blocks):
            raise ValueError(f"cannot trim a {len(self.blocks)}-block encoder at block {k}")
        self.blocks = self.blocks[:k]
        for name in ("dec_embed", "mask_token", "dec_channel_embed", "dec_blocks", "dec_norm", "dec_pred", "dec_pos_embed"):
            if hasattr(self, name):
                delattr(self, name)
        self.config = replace(self.config, depth=k, dec_depth=0)
        return self

    @classmethod
    def from_pretrained(cls, path, device="cpu", **foreign):
        """MAE.from_pretrained(path): this project's checkpoints or weights made elsewhere (see the
        module function from_pretrained, which this calls)."""
        return from_pretrained(path, device, **foreign)

    # ---- accounting -----------------------------------------------------------------------------

    def num_params(self, encoder_only=True):
        is_decoder = lambda name: name.startswith(("dec_", "mask_token"))
        return sum(p.numel() for n, p in self.named_parameters() if not (encoder_only and is_decoder(n)))

    def tokens_per_crop(self, chans=None):
        return (chans or self.config.in_chans) * self.grid ** 2 if self.config.channel_agnostic else self.grid ** 2

    def flops_per_crop(self, chans=None, train=True):
        """Matmul FLOPs for one crop: 2 per weight per token in every Linear/Conv, 4*T^2*D per attention
        layer (QK^T and AV); a training step adds the backward, twice the forward (the patch projection
        only once: its input needs no gradient). LayerNorm, GELU, softmax and the FFT are not counted."""
        c = self.config
        T = self.tokens_per_crop(chans)
        linear_weights = lambda mods: sum(m.weight.numel() for mod in mods for m in mod.modules()
                                          if isinstance(m, nn.Linear))
        patch = 2 * self.patch_embed.weight.numel() * T  # per token: p*p (CA) or C*p*p (standard) inputs
        if not train:  # embed(): the whole encoder on all tokens
            Te = T + 1
            return patch + 2 * linear_weights(self.blocks) * Te + 4 * len(self.blocks) * c.dim * Te ** 2
        Te, Td = T - round(c.mask_ratio * T) + 1, T + 1  # visible + class token; all + class token
        enc = 2 * linear_weights(self.blocks) * Te + 4 * len(self.blocks) * c.dim * Te ** 2
        dec = 2 * linear_weights([self.dec_embed]) * Te + 2 * linear_weights([self.dec_blocks]) * Td \
            + 2 * linear_weights([self.dec_pred]) * T + 4 * len(self.dec_blocks) * c.dec_dim * Td ** 2
        return 2 * patch + 3 * (enc + dec)

    def memory_per_device(self, batch_size, world_size=1, activation_checkpointing=False, optimizer_states=1, chans=None,
                          micro_steps=1):
        """An estimate of one device's training memory in bytes under FSDP over world_size devices, bf16
        compute: fp32 weights, gradients and optimizer states (Lion keeps 1 per weight, AdamW 2) sharded;
        two blocks gathered in bf16 (the one computing and the one prefetched); and the activations the
        backward keeps per token and block, as counted by saved-tensor hooks (tests/test_model.py): the
        fp32 residual input and, in bf16, the norms, the fused projection, q/k norms, attention and MLP
        outputs: 20 D + 6 MLP bytes for a parallel block, 20 D + 4 MLP for a sequential one (8 D more with
        its two LayerScales), 4 D more with QK-norm. With activation checkpointing only each block's input
        is kept, plus one block's worth during its recomputation. The standardized input and the loss' tensors
        add ~22 bytes per pixel and channel (measured the same way). Accumulating micro_steps > 1, FSDP2
        holds every parameter's unsharded fp32 gradient between micro-steps (gradient sync is off until the
        last one: one reduce-scatter a step, not one a micro-step). Kernels' workspaces and the allocator's
        slack are not counted: keep ~20% free."""
        c = self.config
        T = self.tokens_per_crop(chans)
        stacks = [(self.blocks, T - round(c.mask_ratio * T) + 1)] + ([(self.dec_blocks, T + 1)] if c.dec_depth else [])
        width = lambda b: b.norm.normalized_shape[0] if isinstance(b, ParallelBlock) else b.norm1.normalized_shape[0]
        qk_norm = lambda b: 4 * width(b) * isinstance(b.attn.q_norm, nn.LayerNorm)
        sequential = lambda b: 4 * b.fc1.out_features + 8 * width(b) * isinstance(b.ls1, LayerScale)
        kept = lambda b: 20 * width(b) + qk_norm(b) + (6 * b.mlp_dim if isinstance(b, ParallelBlock) else sequential(b))
        full = [kept(b) * tokens * batch_size for blocks, tokens in stacks for b in blocks]
        inputs = sum(4 * width(b) * tokens * batch_size for blocks, tokens in stacks for b in blocks)
        loss = 22 * (chans or c.in_chans) * c.img_size ** 2 * batch_size
        block_params = max(sum(p.numel() for p in b.parameters()) for blocks, _ in stacks for b in blocks)
        n = self.num_params(encoder_only=False)
        return dict(weights=4 * n / world_size, gradients=4 * n / world_size, optimizer=4 * optimizer_states * n / world_size,
                    gathered=2 * 2 * block_params, accumulation=4 * n if micro_steps > 1 else 0,
                    activations=loss + (inputs + max(full) if activation_checkpointing else sum(full)))

    def param_groups(self, weight_decay):
        """Weight decay on matrices only: not on norms, biases, LayerScale, tokens or channel tables."""
        no_decay = {"cls_token", "mask_token", "channel_embed", "dec_channel_embed"}
        decay = lambda n, p: p.ndim >= 2 and n not in no_decay
        return [{"params": [p for n, p in self.named_parameters() if decay(n, p)], "weight_decay": weight_decay},
                {"params": [p for n, p in self.named_parameters() if not decay(n, p)], "weight_decay": 0.0}]


# bf16 dense peak FLOP/s of a GPU, for MFU; the most specific name first: an H100 NVL's name contains "H100" too
PEAK_FLOPS = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
              ("A100", 312e12))


def peak_flops_of(device_name):
    """This GPU's bf16 dense peak from its name (torch.cuda.get_device_name()); None if not in PEAK_FLOPS."""
    name = device_name.replace(" ", "")
    return next((peak for key, peak in PEAK_FLOPS if key.replace(" ", "") in name), None)


def save_consolidated(path, config, state_dict, **extra):
    """One file for inference: {"config", "model", ...extra}, plain tensors and builtins (loads with
    weights_only=True), written under a temporary name and renamed when complete."""
    tmp = Path(f"{path}.tmp")
    torch.save({"config": asdict(config), "model": state_dict, **extra}, tmp)
    os.replace(tmp, path)


def from_pretrained(path, device="cpu", heads=None, arch=None, parallel_bias=None):
    """Load weights into an MAE, the config read from the weights themselves:
    - this project's checkpoints: model.pt (end of training), trimmed.pt (probe.py --trim), or a
      training checkpoint folder (torch.distributed.checkpoint, any number of ranks, consolidated here);
      any other folder is read through the weights file in it (a hub download's model.safetensors);
    - weights made elsewhere, translated by weights.py: the OpenPhenom release (CA-MAE-S/16,
      model.safetensors or a torch file in maes_microscopy's layout; its encoder, not its decoders), and
      timm VisionTransformer state dicts (DINOv2, ImageNet MAE ViTs, ...; the encoder).
    For weights made elsewhere (see weights.translate): heads / arch (a timm name) for a ViT whose
    tensors do not tell its heads, when no config.json beside it names the architecture; parallel_bias
    "timm0.9" or "timm1.0", which timm's ParallelScalingBlock the weights were trained with."""
    path = Path(path)
    if (path / "train.json").is_file():  # a training checkpoint folder
        problem = checkpoint_problem(path)
        if problem:
            raise SystemExit(f"{path}: not a complete checkpoint ({problem})")
        model = build(checked_config(lambda: json.loads((path / "train.json").read_text())["model_config"], path / "train.json"),
                      device, verbose=False)
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
        model.load_state_dict(state["model"])
        return model
    state = weights.read_weights(path)
    if "config" in state and "model" in state:
        config, tensors = checked_config(lambda: state["config"], path), state["model"]
    else:
        fields, tensors = weights.translate(state, path, sincos_2d, heads, arch, parallel_bias)
        config = MAEConfig(**fields)
    model = build(config, device, verbose=False)
    expected = model.state_dict()
    for problem in ([f"no tensor {k!r}, which its config's model has" for k in expected if k not in tensors]
                    + [f"a tensor {k!r} its config's model does not have" for k in tensors if k not in expected]
                    + [f"{k!r} is {list(tensors[k].shape)} where its config makes {list(v.shape)}" for k, v in expected.items()
                       if k in tensors and tensors[k].shape != v.shape]):
        raise SystemExit(f"{path}: {problem}")
    model.load_state_dict(tensors)
    return model


def checkpoint_problem(path):
    """Why the checkpoint folder `path` cannot be resumed from, or None when it is complete: train.json
    names its step, torch.distributed.checkpoint's .metadata reads, and every file it indexes is there
    and long enough. A folder half-written or half-deleted by a killed run fails one of these."""
    try:
        info = json.loads((path / "train.json").read_text())
        if path.name.startswith("ckpt_") and info["step"] != int(path.name.split("_")[1]):
            return f"train.json says step {info['step']}"
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # a damaged file fails in many ways; any of them means not resumable
        return f"{type(e).__name__}: {e}".splitlines()[0]
    ends = {}
    for stored in metadata.storage_data.values():
        ends[stored.relative_path] = max(ends.get(stored.relative_path, 0), stored.offset + stored.length)
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).exists() else None
        if size is None or size < end:
            return f"{name} {'is missing' if size is None else f'holds {size} of {end} bytes'}"
    return None


def checked_config(read, path):
    """MAEConfig from read() (a dict): one line naming the file when it cannot be read or names a field
    this MAEConfig does not have."""
    try:
        fields = read()
        known = MAEConfig.__dataclass_fields__
        unknown = [k for k in fields if k not in known]
        if unknown:
            raise SystemExit(f"{path}: a config field this version does not know: {', '.join(unknown)}")
        return MAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SystemExit(f"{path}: not a readable model config ({type(e).__name__}: {e})") from None


def build(config: MAEConfig, device="cpu", verbose=True):
    """Build on the meta device, then materialize: no time or memory spent on a throwaway init."""
    with torch.device("meta"):
        model = MAE(config)
    model.to_empty(device=device)
    model.init_weights()
    if verbose:
        print(f"MAE: encoder {model.num_params() / 1e6:.1f}M params, total {model.num_params(False) / 1e6:.1f}M")
    return model


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Every preset's size and cost, or one preset's training memory per device "
                                     "(python model.py --memory vitg8 --batch_size 32 --world_size 8). Built on the meta device: instant.")
    parser.add_argument("--memory", metavar="PRESET", choices=sorted(PRESETS), help="print this preset's memory per device")
    parser.add_argument("--batch_size", type=int, default=32, help="crops per device per micro-step")
    parser.add_argument("--world_size", type=int, default=8, help="devices the FSDP shards are spread over")
    parser.add_argument("--micro_steps", type=int, default=1, help="micro-batches accumulated per optimizer step")
    parser.add_argument("--activation_checkpointing", action="store_true", help="recompute each block in the backward")
    parser.add_argument("--optimizer", choices=["lion", "adamw"], default="lion", help="lion keeps 1 state per weight, adamw 2")
    parser.add_argument("--channel_agnostic", action="store_true", help="CA tokenization of 6 channels (--memory)")
    args = parser.parse_args()
    if args.memory:
        with torch.device("meta"):
            m = MAE(MAEConfig.from_preset(args.memory, channel_agnostic=args.channel_agnostic))
        parts = m.memory_per_device(args.batch_size, args.world_size, args.activation_checkpointing,
                                    1 if args.optimizer == "lion" else 2, micro_steps=args.micro_steps)
        print(f"{args.memory}: {args.batch_size} crops per device x {args.micro_steps} micro-steps, FSDP over {args.world_size}, {args.optimizer}, "
              f"activation checkpointing {'on' if args.activation_checkpointing else 'off'} (an estimate: see memory_per_device)")
        for name, value in parts.items():
            print(f"  {name:12} {value / 2 ** 30:7.1f} GiB")
        print(f"  {'total':12} {sum(parts.values()) / 2 ** 30:7.1f} GiB per device")
        raise SystemExit
    print(f"{'preset':8} {'tokens':>7} {'encoder':>9} {'total':>9} {'train GFLOP/crop':>17} {'embed GFLOP/crop':>17}")
    for name in PRESETS:
        for ca in (False, True):
            if ca and PRESETS[name]["patch_size"] == 8:
                continue  # CA-MAE at patch 8 is 6144 tokens per crop: not a configuration anyone trains
            with torch.device("meta"):
                m = MAE(MAEConfig.from_preset(name, channel_agnostic=ca))
            label = name + ("-ca" if ca else "")
            print(f"{label:8} {m.tokens_per_crop():7d} {m.num_params() / 1e6:8.1f}M {m.num_params(False) / 1e6:8.1f}M "
                  f"{m.flops_per_crop() / 1e9:17.1f} {m.flops_per_crop(train=False) / 1e9:17.1f}")
