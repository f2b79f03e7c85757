"""
Pretrain the MAE. Settings are the globals below; a config file and --key=value override them
(any MAEConfig field of model.py may be set too, on top of the chosen preset):

    python train.py config/demo.py
    python train.py config/vitg8.py --data=/data/phenoprints --batch_size=16
"""

import math
import sys
import time
from dataclasses import fields

import torch

from configurator import configure
from data import CropDataset, Loader
from model import MAEConfig, build

# model
preset = "vits16"           # a key of model.PRESETS; MAEConfig fields set here override it
# data
data = "data/demo"          # prepared dataset(s) (data.py prepare), comma-separated to mix channel counts
data_weights = ""           # comma-separated sampling weights, one per dataset; "" = by size
augment = True              # the 8 flips/rotations of the square
# optimization
optimizer = "lion"          # "lion" (the paper's) or "adamw"
lr = 1e-4                   # peak learning rate
betas = (0.9, 0.95)
weight_decay = 0.05
warmup_frac = 0.1           # one-cycle cosine: linear warmup over this fraction of max_steps
min_lr_frac = 0.0           # lr at the end of the cosine, as a fraction of lr
max_steps = 100
batch_size = 8              # crops per micro-step
global_batch = 8            # crops per optimizer step; gradient accumulation makes up the difference
grad_clip = 1.0             # max global grad norm; 0 disables
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16"          # autocast dtype on GPU; CPU runs in float32
compile = False
seed = 1337
log_interval = 10
peak_flops = 989e12         # per device, for MFU: H100 SXM bf16 dense

model_fields = {f.name: f.default for f in fields(MAEConfig)}
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))}
changed = configure({**settings, **model_fields}, sys.argv[1:])
globals().update({k: v for k, v in changed.items() if k not in model_fields})
model_config = MAEConfig.from_preset(preset, **{k: v for k, v in changed.items() if k in model_fields})


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): the update is the sign of an interpolation of the momentum and the
    gradient, so every weight moves by exactly lr; decoupled weight decay as in AdamW."""
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("momentum", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(momentum.lerp(p.grad, 1 - beta1)), alpha=-group["lr"])
                momentum.lerp_(p.grad, 1 - beta2)


def lr_at(step):
    """One-cycle cosine: linear warmup to lr, then cosine down to min_lr_frac * lr at max_steps."""
    warmup = max(1, round(warmup_frac * max_steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model):
    groups = model.param_groups(weight_decay)
    if optimizer == "lion":
        return Lion(groups, lr=lr, betas=betas)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.startswith("cuda"))
    raise SystemExit(f"optimizer must be 'lion' or 'adamw', got {optimizer!r}")


def open_datasets():
    """The prepared datasets, checked against the model: crop size, and channels for standard tokenization."""
    datasets = [CropDataset(path) for path in data.split(",")]
    for d in datasets:
        if d.meta["crop_size"] != model_config.img_size:
            raise SystemExit(f"{d.root}: crops are {d.meta['crop_size']} px, the model takes img_size={model_config.img_size}")
        if not model_config.channel_agnostic and d.channels != model_config.in_chans:
            raise SystemExit(f"{d.root}: {d.channels} channels, the model takes in_chans={model_config.in_chans}")
    return datasets


if __name__ == "__main__":
    if global_batch % batch_size:
        raise SystemExit(f"global_batch {global_batch} is not a multiple of batch_size {batch_size}")
    accum_steps = global_batch // batch_size
    torch.manual_seed(seed)
    datasets = open_datasets()
    weights = [float(w) for w in data_weights.split(",")] if data_weights else None
    loader = Loader(datasets, batch_size, weights=weights, seed=seed, augment=augment, device=device)
    crop_chans = datasets[0].channels  # for the FLOPs count
    model = build(model_config, device)
    opt = make_optimizer(model)
    step_model = torch.compile(model) if compile else model
    autocast = torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=device.startswith("cuda"))
    flops_per_step = model.flops_per_crop(crop_chans) * global_batch
    for step in range(max_steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        for _ in range(accum_steps):
            x = next(loader)
            with autocast:
                loss, _, _ = step_model(x)
            (loss / accum_steps).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_interval == 0 or step == max_steps - 1:
            loss_value = loss.item()  # the one sync point, only when logging
            dt = time.perf_counter() - t0
            tokens = global_batch * model.tokens_per_crop(crop_chans)
            print(f"step {step:5d} | loss {loss_value:.4f} | lr {lr_at(step):.2e} | grad norm {grad_norm:.3f} | "
                  f"{dt * 1000:.0f} ms | {global_batch / dt:.1f} crops/s | {tokens / dt:.0f} tokens/s | "
                  f"MFU {flops_per_step / dt / peak_flops * 100:.2f}%")
