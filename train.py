"""
Pretrain the MAE on one device, or on many with DDP or FSDP2 through torchrun. Settings are the
globals below; config files and --key=value override them (any MAEConfig field of model.py may be
set too, on top of the chosen preset); --help lists them all:

    python train.py config/demo.py
    torchrun --standalone --nproc_per_node=8 train.py config/vitg8.py --data=/data/phenoprints --parallel=fsdp
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=32 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 --rdzv_id=vitg8 --max-restarts=3 train.py config/vitg8.py --data=/data/phenoprints --parallel=fsdp

A run writes checkpoints to out_dir and, started again (by hand, or by torchrun after a worker
died), resumes from the latest one by itself. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 keeps torchrun's
restarted workers from reading the dead workers' addresses (pytorch/pytorch#135712, #167288).
"""

import inspect
import json
import math
import os
import shutil
import sys
import time
import warnings
import zlib
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from einops import rearrange
from tqdm import tqdm

from configurator import configure
from data import CropDataset, Loader, write_atomic
from model import MAE, MAEConfig, checkpoint_problem, peak_flops_of, save_consolidated, standardize

# model
preset = "vits16"           # a key of model.PRESETS; MAEConfig fields set here override it
# data
data = "out/demo/crops"     # prepared dataset(s) (data.py prepare), comma-separated to mix channel counts
data_weights = ""           # comma-separated sampling weights, one per dataset; "" = by size
augment = True              # the 8 flips/rotations of the square
channel_sampling = False    # CA only: each step trains on k of the crops' C channels, k uniform in [min_channels, C]
min_channels = 1            # channel_sampling: the fewest channels a step keeps
# optimization
optimizer = "lion"          # "lion" (the paper's) or "adamw"
lr = 1e-4                   # peak learning rate
betas = (0.9, 0.95)         # Lion: (update interpolation, momentum decay); AdamW: its betas
weight_decay = 0.05         # decoupled, on matrices only (model.param_groups)
warmup_frac = 0.1           # one-cycle cosine: linear warmup over this fraction of max_steps
min_lr_frac = 0.0           # lr at the end of the cosine, as a fraction of lr
max_steps = 100             # optimizer steps in all; 0 writes the initialized model (model.pt at step 0)
batch_size = 8              # crops per micro-step on each device
global_batch = 8            # crops per optimizer step over all devices; gradient accumulation makes up the rest
grad_clip = 1.0             # max global grad norm; 0 disables
max_bad_steps = 10          # consecutive steps with a non-finite loss or gradient before the run stops
# parallelism and speed
parallel = "none"           # "none", "ddp", "fsdp" (FSDP2: fully_shard per block, then the root) or "hsdp"
dp_replicate = 0            # hsdp: replica groups (shard within a group, replicate across); 0 = one per node
activation_checkpointing = False  # recompute each block in the backward pass: less memory, ~25% more compute
compile = "none"            # "none", "blocks" (each block, torchtitan-style, fullgraph) or "model"
compile_backend = "inductor"  # torch.compile's backend; "aot_eager" traces without generating kernels
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cuda" or "cpu"; torchrun ranks take cuda:LOCAL_RANK
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # compute dtype: autocast, or FSDP mixed precision
sdpa_backend = ""           # "" lets PyTorch choose; or "flash", "efficient", "cudnn", "math" (CPU: flash, math)
# checkpoints and logs
out_dir = "out/train"       # checkpoints, model.pt, logs and pictures
ckpt_interval = 100         # steps between checkpoints (and one at the end); 0 = none, and no model.pt (a benchmark)
keep_ckpts = 2              # the newest this many checkpoints are kept, older ones deleted (1 or more)
log_interval = 10           # steps between log lines
log_file = "log.jsonl"      # in out_dir: a JSON line per logged step ("" = none)
snapshot_interval = 0       # steps between reconstruction pictures (input | masked | prediction), 0 = none
seed = 1337                 # initialization, data order, masks and stochastic depth
peak_flops = 0.0            # per device, for MFU; 0 = this GPU's bf16 dense peak from model.PEAK_FLOPS

model_fields = {f.name: f.default for f in fields(MAEConfig)}
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))}
changed = configure({**settings, **model_fields}, sys.argv[1:], __doc__, (__file__, inspect.getfile(MAEConfig)))
globals().update({k: v for k, v in changed.items() if k not in model_fields})
settings.update({k: v for k, v in changed.items() if k not in model_fields})
model_config = MAEConfig.from_preset(preset, **{k: v for k, v in changed.items() if k in model_fields})


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def check_settings():
    """Settings that cannot train, refused in one line before anything is built."""
    problems = [f"{key} must be 1 or more, got {value}" for key, value in
                dict(batch_size=batch_size, global_batch=global_batch, keep_ckpts=keep_ckpts, log_interval=log_interval,
                     max_bad_steps=max_bad_steps).items() if value < 1]
    problems += [f"{key} must be 0 or more, got {value}" for key, value in
                 dict(max_steps=max_steps, ckpt_interval=ckpt_interval).items() if value < 0]
    if model_config.dim % model_config.heads or model_config.dec_dim % model_config.dec_heads:
        problems.append(f"heads must divide the width: dim {model_config.dim} / heads {model_config.heads}, "
                        f"dec_dim {model_config.dec_dim} / dec_heads {model_config.dec_heads}")
    if sdpa_backend and sdpa_backend not in SDPA_BACKENDS:
        problems.append(f"sdpa_backend must be one of {', '.join(SDPA_BACKENDS)} (or empty), got {sdpa_backend!r}")
    elif sdpa_backend in ("efficient", "cudnn") and not device.startswith("cuda"):
        problems.append(f"sdpa_backend {sdpa_backend!r} has no kernel on {device}: use flash or math there")
    if channel_sampling and not (model_config.channel_agnostic and 1 <= min_channels):
        problems.append("channel_sampling needs channel_agnostic=True and min_channels of 1 or more")
    if parallel not in ("none", "ddp", "fsdp", "hsdp"):
        problems.append(f"parallel must be none, ddp, fsdp or hsdp, got {parallel!r}")
    if data_weights:
        try:
            weights = [float(w) for w in data_weights.split(",")]
        except ValueError:
            weights = [-1.0]
        if len(weights) != len(data.split(",")) or not all(w >= 0 and math.isfinite(w) for w in weights) or not sum(weights):
            problems.append(f"data_weights must be {len(data.split(','))} numbers, 0 or more, not all 0 (one per dataset of "
                            f"data), got {data_weights!r}")
    if problems:
        raise SystemExit("; ".join(problems))


def local_shard(t):
    """A DTensor's local shard, which in-place operations change (a plain tensor is its own)."""
    return getattr(t, "_local_tensor", t)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): the update is the sign of an interpolation of the momentum and the
    gradient, so every weight moves by exactly lr; decoupled weight decay as in AdamW. It works on
    FSDP's local shards: a loop of DTensor operations over vitg8's 732 parameters spent more time in
    dispatch than in arithmetic. On a GPU one foreach call per operation covers all of them; on a CPU a
    loop is faster (python bench.py lion), which is also how torch.optim chooses (foreach=None).
    Like torch's fused optimizers it reads `found_inf` (a one-element tensor set by the caller, 1 when
    the gradients are not finite) and then leaves weights and momenta exactly as they were, decided on
    the device: the step needs no host sync. (It zeroes the gradients it skips.)"""
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.foreach = foreach  # not a group setting: checkpoints keep the optimizer state they always had
        self.found_inf = None

    @torch.no_grad()
    def step(self, closure=None):
        local = lambda tensors: [local_shard(t) for t in tensors]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            momenta = local([self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params])
            weights, grads = local(params), local([p.grad for p in params])
            lr, (beta1, beta2), decay = group["lr"], group["betas"], 1 - group["lr"] * group["weight_decay"]
            mix = 1 - beta2  # the momentum's step toward the gradient
            if self.found_inf is not None:  # a skipped step is lr 0, and each gradient is its momentum
                skip = local_shard(self.found_inf).bool()  # the mask once, not once per gradient
                for g, m in zip(grads, momenta):
                    torch.where(skip, m, g, out=g)  # NaN gone, and lerp(m, m, mix) is m: no tensor weight needed
                keep = (~skip).float()
                lr, decay = lr * keep, 1 - lr * keep * group["weight_decay"]
            if self.foreach or (self.foreach is None and weights[0].is_cuda):
                torch._foreach_mul_(weights, decay)
                update = torch._foreach_lerp(momenta, grads, 1 - beta1)
                torch._foreach_sign_(update)
                torch._foreach_mul_(update, -lr)
                torch._foreach_add_(weights, update)
                torch._foreach_lerp_(momenta, grads, mix)  # a number: the fused kernel (a tensor weight has none)
                continue
            for w, g, m in zip(weights, grads, momenta):
                w.mul_(decay)
                w.add_(torch.sign(m.lerp(g, 1 - beta1)).mul_(-lr))  # lr: a number, or a tensor with the skip flag
                m.lerp_(g, mix)


def sampled_channels(step, channels):
    """Hierarchical channel sampling (ChannelViT, Bao et al. ICLR 2024): this step's k, uniform in
    [min_channels, C], then k of the C channels at random, kept in their order. Drawn from (seed, step):
    every micro-step and rank of a step keeps the same channels, so a step has one shape everywhere and
    any world size makes the same draws. A compiled block recompiles once, at the second token count,
    with the count dynamic from then on."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    k = int(torch.randint(min(min_channels, channels), channels + 1, (1,), generator=generator))
    return torch.randperm(channels, generator=generator)[:k].sort().values


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
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)  # fused: it reads found_inf on the device
    raise SystemExit(f"optimizer must be 'lion' or 'adamw', got {optimizer!r}")


def open_datasets():
    """The prepared datasets, checked against the model: crop size, and channels for standard tokenization.
    For a CA-MAE also each dataset's channel-table rows, matched by the names in its meta.json: a JUMP
    screen stores DNA, ER, RNA, AGP, Mito and an RxRx one DNA, ER, actin, RNA, Mito, Golgi, so the same
    stain must take the same row whatever its position. model_config.channel_names (saved with the model)
    grows by the names it lacks, in the order they come; one dataset keeps rows 0..C-1."""
    global model_config
    datasets = [CropDataset(path) for path in data.split(",")]
    for d in datasets:
        if d.meta["crop_size"] != model_config.img_size:
            raise SystemExit(f"{d.root}: crops are {d.meta['crop_size']} px, the model takes img_size={model_config.img_size}")
        if not model_config.channel_agnostic and d.channels != model_config.in_chans:
            raise SystemExit(f"{d.root}: {d.channels} channels, the model takes in_chans={model_config.in_chans}")
    if not model_config.channel_agnostic:
        return datasets, [None] * len(datasets)
    names = list(model_config.channel_names)
    for d in datasets:
        names += [n for n in d.meta["channels"] if n not in names]
    if len(names) > model_config.max_chans:
        raise SystemExit(f"{data}: {len(names)} differently named channels ({', '.join(names)}), "
                         f"the model's channel tables hold max_chans={model_config.max_chans}")
    model_config = replace(model_config, channel_names=tuple(names))
    return datasets, [torch.tensor([names.index(n) for n in d.meta["channels"]], device=device) for d in datasets]


def device_mesh(world_size):
    """None for FSDP (one flat group); for HSDP a 2-D mesh: dp_replicate groups (default: one per node)
    that each shard the model over their ranks and replicate it across groups, so the all-gathers and
    reduce-scatters stay inside a node and only an all-reduce of the shards crosses the network."""
    if parallel != "hsdp":
        return None
    replicas = dp_replicate or world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % replicas:
        raise SystemExit(f"dp_replicate {replicas} does not divide the {world_size} ranks")
    return init_device_mesh(device.split(":")[0], (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))


def block_precision():
    """FSDP's mixed precision for a block: weights gathered in `dtype`, gradients reduced in fp32, and
    the block's input left as it comes (fp32), so the residual stream stays fp32 as under autocast;
    each block casts its branches' input to its weights' dtype itself."""
    return MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32, cast_forward_inputs=False)


def parallelize(model, world_size=1):
    """Activation checkpointing -> compile -> shard, in torchtitan's order; the model is still on meta.
    Compiled with fullgraph, a block class past dynamo's 8 graphs is an error: a run makes at most 4
    (the first block without stochastic depth, then the rate dynamic; the first token count, then the
    count dynamic under channel_sampling), as the snapshot runs eagerly and the decoder's blocks have
    a class of their own."""
    model.activation_checkpointing = activation_checkpointing
    blocks = list(model.blocks) + list(model.dec_blocks)
    if compile == "blocks":
        for block in blocks:
            block.compile(fullgraph=True, backend=compile_backend)  # in place: parameter names stay clean
    if parallel in ("fsdp", "hsdp"):
        mesh = device_mesh(world_size)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=block_precision())
        fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32))
        # torch 2.14 warns, once per rank, that the MAE returns a view (pred), in case a caller modifies it in
        # place; train.py never does
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if compile == "model":
        model.compile(backend=compile_backend)
    return model


def step_module(model):
    """What each micro-step calls: under DDP its wrapper, which does not broadcast the buffers before
    every forward (the only ones are the fixed sin-cos tables, the same on every rank)."""
    return DistributedDataParallel(model, forward_sync_buffers=False) if parallel == "ddp" else model


# ---- checkpoints: torch.distributed.checkpoint directories, any world size on reload --------------

RUN_SETTINGS = {"max_steps", "log_interval", "ckpt_interval", "keep_ckpts", "snapshot_interval", "log_file", "out_dir",
                "device", "compile", "activation_checkpointing", "parallel", "sdpa_backend", "peak_flops",
                "batch_size", "max_bad_steps", "dp_replicate", "compile_backend"}  # how a run goes, not what it trains: free to change on resume


def resume_point(rank):
    """The newest complete checkpoint in out_dir (None for a new run); newer damaged ones are named and
    passed over. Resuming trusts what is on disk: `latest` is written for people and tools. Rank 0
    decides and tells the others: on a shared filesystem after a crash, nodes can list out_dir
    differently (attribute caches, a rename just before the kill), and ranks resuming from different
    checkpoints would mix shards and hang."""
    choice = [None]
    if rank == 0:
        for path in sorted(Path(out_dir).glob("ckpt_???????"), reverse=True):
            problem = checkpoint_problem(path)
            if problem is None:
                choice = [str(path)]
                break
            print(f"warning: {path} cannot be resumed from ({problem}); falling back to an earlier checkpoint")
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def resume_changes(path, datasets):
    """Refuse a checkpoint of another model, optimizer or channel count in one line; return the other
    settings that differ ({name: [checkpoint's, this run's]}), which the run warns about, and the
    history of such changes train.json records (the checkpoint's, without this resume's)."""
    info = json.loads((path / "train.json").read_text())
    ours = json.loads(json.dumps(dict(model=asdict(model_config), settings=settings)))  # tuples as JSON has them
    refused = [f"{k}: checkpoint {v!r}, this run {ours['model'].get(k)!r}" for k, v in info["model_config"].items()
               if ours["model"].get(k) != v]
    if info["settings"].get("optimizer") != optimizer:
        refused.append(f"optimizer: checkpoint {info['settings'].get('optimizer')!r}, this run {optimizer!r}")
    channels = [d.channels for d in datasets]
    if info.get("data_channels", channels) != channels:
        refused.append(f"data channels: checkpoint {info['data_channels']}, this run {channels}")
    if refused:
        raise SystemExit(f"{path}: a checkpoint of another run, cannot resume: {'; '.join(refused)} (use a new out_dir)")
    changes = {k: [info["settings"][k], v] for k, v in ours["settings"].items()
               if k in info["settings"] and info["settings"][k] != v and k not in RUN_SETTINGS}
    return changes, info.get("history", [])


def save_checkpoint(model, opt, step, rank, world_size, info, good=None):
    """out_dir/ckpt_STEP/: sharded model + optimizer (each rank writes its part) and train.json (step,
    configs, `info`). Written as ckpt_STEP.tmp/ and renamed when complete; then `latest` names it and
    checkpoints beyond the newest keep_ckpts are deleted, except `good`, the newest whose weights are
    known to train (the new one is not known yet). Killed at any moment, the run resumes from the
    newest complete folder (resume_point)."""
    name = f"ckpt_{step:07d}"
    final, tmp = Path(out_dir) / name, Path(out_dir) / f"{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    if rank == 0:
        info = dict(step=step, model_config=asdict(model_config), settings=settings, world_size=world_size, **info)
        write_atomic(tmp / "train.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
        shutil.rmtree(final, ignore_errors=True)  # this step, written before a crash that came before `latest`
        os.replace(tmp, final)
        write_atomic(Path(out_dir) / "latest", lambda f: f.write(name.encode()))
        for old in sorted(Path(out_dir).glob("ckpt_???????"))[:-keep_ckpts]:
            if not (good and old.name == Path(good).name):
                shutil.rmtree(old)
    barrier()
    return final


def load_checkpoint(model, opt, path):
    """Load model and optimizer state in place (resharded to this run's world size); returns the step."""
    model_state, optim_state = get_state_dict(model, opt)  # also creates the optimizer state to fill
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return json.loads((path / "train.json").read_text())["step"]


def all_finite(model):
    """Are all weights finite, on every rank (one collective)?"""
    local = torch.stack([torch.isfinite(local_shard(p)).all() for p in model.parameters()]).all()
    flag = local.to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def export(model, step, rank):
    """out_dir/model.pt: the whole model in one file for inference (gathered from the shards)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_consolidated(Path(out_dir) / "model.pt", model_config, state, step=step)


# ---- logs -----------------------------------------------------------------------------------------

def barrier():
    if dist.is_initialized():
        dist.barrier()


def set_threads(local_world_size):
    """CPU threads of this process: OMP_NUM_THREADS when set (torchrun sets 1 for several workers), else
    the cores this process may use, split among this node's processes so they do not oversubscribe
    them. On a machine others are busy on, fewer threads than cores is faster: set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size))


def trim_log(path, start):
    """A resumed run rewrites its JSONL log without the steps it will redo: one line per step."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < start:
                kept.append(line + "\n")
        except (ValueError, KeyError):
            pass  # a line cut short by the kill
    write_atomic(path, lambda f: f.write("".join(kept).encode()))


def write_png(path, image):
    """A grayscale uint8 [H, W] as PNG, with zlib alone (no imaging library needed)."""
    def chunk(kind, payload):
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
    rows = b"".join(b"\x00" + row.tobytes() for row in image)
    header = image.shape[1].to_bytes(4, "big") + image.shape[0].to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    write_atomic(path, lambda f: f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                         + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")))


def write_loss_curve(path, log_path, width=480, height=200, margin=8):
    """out_dir/loss.png from the JSONL log: the loss (log scale, black) against the step, on white; the
    y range is the loss's own, printed in the log line that announces the picture."""
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    if len(records) < 2:
        return None
    steps = np.array([r["step"] for r in records], float)
    loss = np.log(np.clip([r["loss"] for r in records], 1e-12, None))
    image = np.full((height, width), 255, np.uint8)
    x = margin + (steps - steps.min()) / max(np.ptp(steps), 1) * (width - 2 * margin)
    y = height - margin - (loss - loss.min()) / max(np.ptp(loss), 1e-12) * (height - 2 * margin)
    for (x0, y0), (x1, y1) in zip(zip(x, y), zip(x[1:], y[1:])):  # segments, drawn point by point
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
        image[np.linspace(y0, y1, n).round().astype(int), np.linspace(x0, x1, n).round().astype(int)] = 0
    write_png(path, image)
    return float(np.exp(loss.min())), float(np.exp(loss.max()))


@torch.no_grad()
def snapshot(model, x, rows, step, write, crops=4):
    """out_dir/recon_STEP.png: a row per channel; for each of the first `crops` crops of the batch three
    panels: input | masked input (masked patches black) | the masked patches predicted, pasted between the
    visible ones (as the MAE paper shows them). Small crops are enlarged."""
    model.eval()
    x = x[:crops]
    with torch.compiler.set_stance("force_eager"):  # compiled blocks would compile again for eval, no_grad and 4 crops
        _, pred, mask = model(x, rows)
    target = standardize(x)
    recon = model.unpatchify(pred.float(), x.shape[1])
    patch_mask = model.unpatchify(mask[..., None].expand_as(pred).float(), x.shape[1])
    model.train()
    to_uint8 = lambda t: ((t.clamp(-3, 3) + 3) / 6 * 255).round().to(torch.uint8)
    pasted = target * (1 - patch_mask) + recon * patch_mask  # visible patches as given, masked ones predicted
    panels = torch.stack([target, target * (1 - patch_mask) - 3 * patch_mask, pasted], dim=1)  # [B, 3, C, H, W]
    panels = F.pad(to_uint8(panels), (1, 1, 1, 1), value=255)                                  # white frames
    grid = rearrange(panels, "b k c h w -> (c h) (b k w)")
    scale = max(1, 128 // x.shape[-1])
    if write:
        image = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        write_png(Path(out_dir) / f"recon_{step:07d}.png", image.cpu().numpy())


def main():
    check_settings()
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed and parallel == "none":
        raise SystemExit("started by torchrun with several processes: set --parallel=ddp, fsdp or hsdp")
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        print("warning: restarted workers may hang; start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    if parallel in ("fsdp", "hsdp") and compile == "model":
        raise SystemExit("compile='model' breaks the graph on FSDP's hooks: use compile='blocks' with FSDP")
    set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    global device
    if distributed:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if global_batch % (batch_size * world_size):
        raise SystemExit(f"global_batch {global_batch} is not a multiple of batch_size {batch_size} x {world_size} devices")
    accum_steps = global_batch // (batch_size * world_size)
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    datasets, channel_rows = open_datasets()
    resume_from = resume_point(rank)
    changes, history = resume_changes(resume_from, datasets) if resume_from else ({}, [])
    with torch.device("meta"):  # build on meta, parallelize, then materialize: no throwaway full-size init
        model = MAE(model_config)
    model = parallelize(model, world_size)
    model.to_empty(device=device)
    model.init_weights(seed)  # identical weights whatever the sharding: each parameter has its own generator
    if rank == 0:
        print(f"MAE: encoder {model.num_params() / 1e6:.2f}M params, total {model.num_params(False) / 1e6:.2f}M | "
              f"{parallel} on {world_size} x {device} | micro-batch {batch_size} x {accum_steps} accumulation")
    step_model = step_module(model)
    opt = make_optimizer(model)
    start = 0
    if resume_from:
        start = load_checkpoint(model, opt, resume_from)
        if start > max_steps:
            raise SystemExit(f"{resume_from}: the run is at step {start}, past max_steps={max_steps} "
                             f"(raise max_steps to continue it, or use a new out_dir)")
        if rank == 0:
            print(f"resumed from {resume_from} at step {start}")
            for key, (before, now) in changes.items():
                print(f"warning: {key} was {before!r} in {resume_from}, is {now!r} now (recorded in train.json)")
    history += [dict(step=start, changed=changes)] if changes else []
    weights = [float(w) for w in data_weights.split(",")] if data_weights else None
    loader = Loader(datasets, batch_size, accum_steps, weights=weights, rank=rank, world_size=world_size,
                    seed=seed, start_step=start, augment=augment, device=device)
    autocast = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype),
                              enabled=dtype != "float32" and parallel in ("none", "ddp"))  # FSDP casts by its policy
    attention = lambda: sdpa_kernel(SDPA_BACKENDS[sdpa_backend]) if sdpa_backend else nullcontext()  # one per use
    peak = peak_flops or (peak_flops_of(torch.cuda.get_device_name(device)) if device.startswith("cuda") else None)
    costs = {}  # (matmul FLOPs, tokens) of a crop by its channel count: channel_sampling and mixed screens vary it
    work = dict(flops=0.0, tokens=0)  # this rank's since the last log line
    log_path = Path(out_dir) / log_file if log_file and rank == 0 else None
    if log_path:
        trim_log(log_path, start)
    log = open(log_path, "a") if log_path else None
    progress = tqdm(total=max_steps, initial=start, unit="step", disable=rank != 0, dynamic_ncols=True)
    # a checkpoint is good once a step from its weights had a finite loss and gradient. The device keeps
    # count of skipped steps; the host reads the counts when it logs or checkpoints, never in between.
    pending, good = resume_from, None
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # skipped in a row, skipped since the last read, trained
    info = dict(data_channels=[d.channels for d in datasets], history=history)
    last_log = (start, time.perf_counter())

    def gradients(step):
        """This rank's micro-batches of the step, forward and backward, gradients reduced and clipped.
        Returns the summed loss and the gradient norm (on the device) and the last micro-batch with its
        channel-table rows."""
        loss_sum = torch.zeros((), device=device)
        for m in range(accum_steps):
            # masks and drop-path draw from (seed, step, slice of the global batch): a resumed run, or
            # one with another world size, makes the same draws for the same crops
            torch.manual_seed(seed + 1_000_003 * step + m * world_size + rank)
            x, d = next(loader)
            rows = channel_rows[d]  # which channel-table rows the decoder (and a channel_embed) uses
            if channel_sampling:  # the tokens, masking and loss of the kept channels only
                kept = sampled_channels(step, x.shape[1])
                kept = kept.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else kept  # no host sync
                x, rows = x[:, kept], rows[kept]
            if x.shape[1] not in costs:
                costs[x.shape[1]] = model.flops_per_crop(x.shape[1]), model.tokens_per_crop(x.shape[1])
            work["flops"] += costs[x.shape[1]][0] * len(x)
            work["tokens"] += costs[x.shape[1]][1] * len(x)
            last = m == accum_steps - 1
            if parallel in ("fsdp", "hsdp"):
                model.set_requires_gradient_sync(last)
            with autocast, attention(), (step_model.no_sync() if parallel == "ddp" and not last else nullcontext()):
                loss = step_model(x, rows)[0]
            (loss / accum_steps).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        return loss_sum, grad_norm, x, rows

    try:
        for step in range(start, max_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss_sum, grad_norm, x, rows = gradients(step)
            # A non-finite loss or gradient skips the step on the device (the optimizer reads found_inf):
            # the host does not wait for the step to decide. Gradients are reduced: every rank decides alike.
            finite = torch.isfinite(grad_norm)
            opt.found_inf = (~finite).float()
            opt.step()
            opt.zero_grad(set_to_none=True)
            counts.copy_(torch.stack([(counts[0] + 1) * ~finite, counts[1] + ~finite, counts[2] + finite]))
            done = step + 1
            progress.update()
            checkpoint_due = ckpt_interval > 0 and (done % ckpt_interval == 0 or done == max_steps)
            if step % log_interval == 0 or checkpoint_due:
                in_a_row, skipped, trained = counts.tolist()  # the host reads the device here only
                counts[1:] = 0
                if trained and pending:
                    good, pending = pending, None
                if skipped and rank == 0:
                    tqdm.write(f"step {step}: {skipped} step(s) skipped since the last line (non-finite loss or gradient), "
                               f"{in_a_row} in a row")
                if in_a_row >= max_bad_steps:
                    last_good = f"the last good checkpoint is {good}" if good else "no checkpoint of this run is good"
                    raise SystemExit(f"stopping: {in_a_row} steps in a row with a non-finite loss or gradient; {last_good}")
            if step % log_interval == 0 or done == max_steps:
                if distributed:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                loss_value = loss_sum.item() / accum_steps
                elapsed = time.perf_counter() - last_log[1]
                dt = elapsed / (done - last_log[0])  # seconds per step since the last log
                memory = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else 0.0
                record = dict(step=step, loss=loss_value, lr=lr_at(step), grad_norm=grad_norm.item(), dt=dt,
                              crops_per_s=global_batch / dt, tokens_per_s=work["tokens"] * world_size / elapsed,
                              mfu=work["flops"] / elapsed / peak if peak else None, memory_gib=memory)
                work.update(flops=0.0, tokens=0)
                if rank == 0:
                    mfu = f"{record['mfu'] * 100:.2f}%" if peak else "-"
                    tqdm.write(f"step {step:6d} | loss {loss_value:.4f} | lr {record['lr']:.2e} | grad norm {record['grad_norm']:.3f} | "
                               f"{dt * 1000:.0f} ms | {record['crops_per_s']:.1f} crops/s | {record['tokens_per_s']:.0f} tokens/s | "
                               f"MFU {mfu} | {memory:.1f} GiB")
                    if log:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                last_log = (done, time.perf_counter())
            if snapshot_interval and done % snapshot_interval == 0:
                snapshot(model, x, rows, done, write=rank == 0)  # every rank computes: FSDP gathers weights collectively
                if log:
                    write_loss_curve(Path(out_dir) / "loss.png", log_path)
            if checkpoint_due:
                if all_finite(model):
                    pending = save_checkpoint(model, opt, done, rank, world_size, info, good)
                elif rank == 0:
                    tqdm.write(f"step {done}: non-finite weights, no checkpoint written")
    finally:  # also on an error: the bar ends its line, the loader's thread stops before the process does
        progress.close()
        loader.close()
    if log and (span := write_loss_curve(Path(out_dir) / "loss.png", log_path)):
        print(f"{Path(out_dir) / 'loss.png'}: the loss from {span[1]:.3g} to {span[0]:.3g} (log scale)")
    if ckpt_interval:
        export(model, max_steps, rank)
    if distributed:
        dist.destroy_process_group()
        # Everything is written (checkpoints and model.pt by rename, the log flushed). Skip the
        # interpreter's teardown: on CPU/gloo it aborts now and then after all the work is done
        # ("terminate called without an active exception"), which torchrun reports as a failed job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
