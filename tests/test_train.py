"""Training promises, each checked with real processes: python train.py, and torchrun with the gloo backend."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import synth
from model import from_pretrained

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(preset="vits16", channel_agnostic=True, img_size=32, patch_size=8, dim=64, depth=2, heads=4,
            mlp_dim=128, dec_dim=32, dec_depth=1, dec_heads=4, dec_mlp_dim=64, drop_path=0.1,
            batch_size=4, global_batch=8, lr=1e-3, warmup_frac=0.2, log_interval=1, log_file="log.jsonl")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    screen = synth.synth(root / "screen", size="tests", seed=0)
    return data.prepare(screen / "images", screen / "metadata.csv", root / "crops", crop_size=32, workers=2,
                        channels=list(synth.CHANNELS))


@pytest.fixture(scope="module")
def jump_dataset(tmp_path_factory):
    """The same screen as a 5-stain JUMP plate (DNA, ER, RNA, AGP with Golgi, Mito), read from its LoadData CSV."""
    root = tmp_path_factory.mktemp("jump")
    screen = synth.synth(root / "screen", size="tests", seed=0, channels=5)
    return data.prepare(None, screen / "metadata.csv", root / "crops", crop_size=32, load_data=screen / "load_data.csv", workers=2)


def command(dataset, out_dir, nproc=1, restarts=0, **overrides):
    settings = {**TINY, "data": str(dataset), "out_dir": str(out_dir), **overrides}
    args = [f"--{k}={v}" for k, v in settings.items()]
    if nproc == 1:
        return [sys.executable, str(ROOT / "train.py")] + args
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", str(ROOT / "train.py")] + args


def train(dataset, out_dir, nproc=1, **overrides):
    run = subprocess.run(command(dataset, out_dir, nproc, **overrides), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return losses(out_dir, overrides.get("log_file", "log.jsonl"))


def losses(out_dir, log="log.jsonl"):
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out_dir) / log))}


def wait_for(path, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory):
    """The reference: one process, 12 steps, global batch 8 as 2 accumulated micro-batches of 4."""
    out = tmp_path_factory.mktemp("single")
    return out, train(dataset, out, max_steps=12, ckpt_interval=3)


@pytest.fixture(scope="module")
def fsdp(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out, train(dataset, out, nproc=2, parallel="fsdp", max_steps=12, ckpt_interval=3)


def test_the_loss_falls(single):
    out, reference = single
    assert len(reference) == 12 and reference[11] < 0.8 * reference[0]
    png = (out / "loss.png").read_bytes()  # the loss curve, drawn from log.jsonl at the end
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (480, 200)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_of_one(dataset, tmp_path, single, fsdp, parallel):
    """Same global batch and same randomness per crop: only the order of float sums differs, so the
    losses agree to 1e-4 relative over 12 steps (Lion's sign() would amplify a real difference)."""
    _, reference = single
    other = fsdp[1] if parallel == "fsdp" else train(dataset, tmp_path, nproc=2, parallel="ddp", max_steps=12)
    assert sorted(other) == sorted(reference)
    for step in reference:
        assert other[step] == pytest.approx(reference[step], rel=1e-4), step


def test_single_process_resume_is_exact(dataset, tmp_path, single):
    _, reference = single
    run = subprocess.Popen(command(dataset, tmp_path, max_steps=12, ckpt_interval=3, log_file="first.jsonl"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(tmp_path / "ckpt_0000006")
    run.kill()  # SIGKILL: no chance to clean up
    run.wait()
    assert not (tmp_path / "model.pt").exists()
    resumed = train(dataset, tmp_path, max_steps=12, ckpt_interval=3, log_file="second.jsonl")
    first_resumed = min(resumed)
    assert 6 <= first_resumed < 12 and sorted(resumed) == list(range(first_resumed, 12))
    for step, loss in resumed.items():
        assert loss == reference[step], step  # bit for bit


def test_fused_adamw_on_fsdp_shards_gives_the_losses_of_one_process(dataset, tmp_path):
    """AdamW is fused on every device (it reads the skip flag on the device); on FSDP's DTensor shards
    it gives the 1-process losses."""
    one = train(dataset, tmp_path / "one", max_steps=6, ckpt_interval=6, optimizer="adamw")
    two = train(dataset, tmp_path / "two", nproc=2, parallel="fsdp", max_steps=6, ckpt_interval=6, optimizer="adamw")
    assert sorted(two) == sorted(one) and all(two[s] == pytest.approx(one[s], rel=1e-4) for s in one)


def test_fsdp_job_survives_a_killed_worker_and_resumes_exactly(dataset, tmp_path, fsdp):
    """torchrun restarts the workers after one is killed; they resume from the last checkpoint by
    themselves and reproduce the uninterrupted FSDP run. One restart allowed: the job must exit cleanly
    after it (train.py skips the interpreter teardown that used to abort now and then on gloo)."""
    _, reference = fsdp
    job = subprocess.Popen(command(dataset, tmp_path, nproc=2, restarts=1, parallel="fsdp", max_steps=12, ckpt_interval=3),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # see the README
    wait_for(tmp_path / "ckpt_0000006")
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[0]), signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    resumed = re.search(r"resumed from \S+ckpt_(\d+) at step (\d+)", stdout)
    assert resumed and int(resumed[2]) >= 6
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert {r["step"] for r in log} == set(range(12))
    for record in log:  # before the kill, and again after the restart
        assert record["loss"] == reference[record["step"]], record["step"]


def test_sharded_checkpoint_loads_into_one_process_for_inference(fsdp):
    out, _ = fsdp
    from_shards = from_pretrained(out / "ckpt_0000012")
    consolidated = from_pretrained(out / "model.pt")
    assert from_shards.state_dict().keys() == consolidated.state_dict().keys()
    for name, tensor in consolidated.state_dict().items():
        assert torch.equal(from_shards.state_dict()[name], tensor), name
    x = torch.randint(0, 256, (2, 5, 32, 32), dtype=torch.uint8)  # a 5-channel crop: CA takes any count
    assert torch.isfinite(from_shards.eval().embed(x)).all()
    assert json.loads((out / "ckpt_0000012" / "train.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("recipe,tolerance", [
    (dict(dtype="bfloat16", activation_checkpointing=True), 0.05),
    (dict(compile="blocks", activation_checkpointing=True), 1e-3),
])
def test_fsdp_with_mixed_precision_recomputation_and_compiled_blocks(dataset, tmp_path, fsdp, recipe, tolerance):
    """The pieces of the GPU recipe, on CPU: bf16 compute with fp32 gradient reduction, blocks recomputed
    in the backward pass, each block compiled. Each trains like the plain fp32 run. (bf16 and compile
    are tested apart: Inductor's CPU code generation fails on this model's bf16 backward kernels.)"""
    _, reference = fsdp
    other = train(dataset, tmp_path, nproc=2, parallel="fsdp", max_steps=12, ckpt_interval=12, **recipe)
    for step in (0, 5, 11):
        assert other[step] == pytest.approx(reference[step], rel=tolerance), step


def test_non_finite_steps_are_skipped_then_the_run_stops_with_its_checkpoint_intact(dataset, tmp_path, single,
                                                                                   log_interval=4, in_a_row=3):
    """Resumed from a good checkpoint with an absurd learning rate, the weights overflow: the steps
    with non-finite gradients are skipped, and after max_bad_steps of them the run stops, at the first
    log line or checkpoint that reads the count (the host reads the device there only): the first
    step from the checkpoint trains, the next ones do not; with a line every 4 steps the stop comes
    at step 12, three in a row. (With a line every step it comes at step 11: the tests below.)"""
    out, _ = single
    shutil.copytree(out / "ckpt_0000009", tmp_path / "ckpt_0000009")
    (tmp_path / "latest").write_text("ckpt_0000009")
    run = subprocess.run(command(dataset, tmp_path, max_steps=16, ckpt_interval=100, lr=1e30, max_bad_steps=2,
                                 log_interval=log_interval), capture_output=True, text=True)
    assert run.returncode != 0
    assert f"{in_a_row} steps in a row with a non-finite loss or gradient; the last good checkpoint is {tmp_path / 'ckpt_0000009'}" in run.stderr, run.stderr[-1000:]
    assert sum(int(n) for n in re.findall(r"(\d+) step\(s\) skipped", run.stdout)) == in_a_row
    assert (tmp_path / "latest").read_text() == "ckpt_0000009" and not (tmp_path / "model.pt").exists()
    weights = from_pretrained(tmp_path / "ckpt_0000009").state_dict()
    for name, tensor in from_pretrained(out / "ckpt_0000009").state_dict().items():
        assert torch.equal(weights[name], tensor), name


@pytest.mark.parametrize("kind", ["lion loop", "lion foreach", "adamw fused"])
def test_a_skipped_step_leaves_weights_and_optimizer_state_exactly(kind):
    """found_inf = 1 (set on the device, read by the optimizer): NaN and inf gradients change nothing,
    not the weights, not the moments, not AdamW's step count; found_inf = 0 is the plain step, bit for bit."""
    sys.argv = ["train.py"]
    from train import Lion
    make = {"lion loop": lambda ps: Lion(ps, lr=0.01, weight_decay=0.1, foreach=False),
            "lion foreach": lambda ps: Lion(ps, lr=0.01, weight_decay=0.1, foreach=True),
            "adamw fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True)}[kind]
    g = torch.Generator().manual_seed(0)
    plain = [torch.nn.Parameter(torch.randn(5, 7, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]
    gated = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    a, b = make(plain), make(gated)
    state = lambda opt, ps: [v.clone() for p in ps for v in opt.state[p].values()]
    for _ in range(3):
        for p, q in zip(plain, gated):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step()
        b.found_inf = torch.zeros(())
        b.step()
        assert all(torch.equal(p, q) for p, q in zip(plain, gated))
        assert all(torch.equal(x, y) for x, y in zip(state(a, plain), state(b, gated)))
    weights, moments = [q.detach().clone() for q in gated], state(b, gated)
    for q in gated:
        q.grad = torch.full_like(q, float("nan"))
        q.grad[0] = float("inf")
    b.found_inf = torch.ones(())
    b.step()
    assert all(torch.equal(w, q) for w, q in zip(weights, gated))
    assert all(torch.equal(x, y) for x, y in zip(moments, state(b, gated)))


def test_the_host_reads_the_device_only_when_it_logs_or_checkpoints(dataset, tmp_path):
    """Every read of a tensor's value by train.py (item, tolist, bool, int, float) is a host sync on a
    GPU. Counted in the real run, by the step it happens in: with a log line every 5 steps of 10 and
    no checkpoint before the end, only steps 0, 5 and 9 read (it used to be every step: the
    finite-gradient check)."""
    counter = tmp_path / "count_reads.py"
    counter.write_text(f"""
import runpy, sys, torch
steps = set()
def counted(name):
    original = getattr(torch.Tensor, name)
    def read(self, *args, **kwargs):
        frame = sys._getframe(1)
        if frame.f_code.co_filename == {str(ROOT / "train.py")!r}:
            while frame is not None and frame.f_code.co_name != "main":
                frame = frame.f_back
            if frame is not None and "step" in frame.f_locals:
                steps.add(frame.f_locals["step"])
        return original(self, *args, **kwargs)
    setattr(torch.Tensor, name, read)
for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
    counted(name)
sys.argv = sys.argv[1:]
sys.path.insert(0, {str(ROOT)!r})
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("steps that read:", sorted(steps))
""")
    args = command(dataset, tmp_path / "run", max_steps=10, ckpt_interval=100, log_interval=5)
    run = subprocess.run([sys.executable, str(counter), *args[1:]], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "steps that read: [0, 5, 9]" in run.stdout, run.stdout[-500:]


def test_lion_matches_a_step_computed_by_hand():
    sys.argv = ["train.py"]
    from train import Lion
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.3, -0.2, 0.0])
    opt.step()
    # momentum 0: update = sign(0.1 * g); p = p * (1 - lr * wd) - lr * update
    expected = torch.tensor([1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1, 0.5 * 0.95 - 0.0])
    torch.testing.assert_close(p.data, expected)
    torch.testing.assert_close(opt.state[p]["momentum"], 0.01 * torch.tensor([0.3, -0.2, 0.0]))
    p.grad = torch.tensor([-1.0, -1.0, 1.0])
    before = p.data.clone()
    opt.step()
    # momentum m = 0.01 g1: c = 0.9 m + 0.1 g2 = [0.0027 - 0.1, -0.0018 - 0.1, 0.1]
    torch.testing.assert_close(p.data, before * 0.95 - 0.1 * torch.tensor([-1.0, -1.0, 1.0]))


def test_lion_moves_by_the_sign_of_momentum_and_gradient_together():
    """A gradient that reverses against its momentum: Lion follows sign(0.9 m + 0.1 g), not sign(g)."""
    sys.argv = ["train.py"]
    from train import Lion
    p = torch.nn.Parameter(torch.tensor([0.0]))
    opt = Lion([p], lr=1.0, betas=(0.9, 0.95), weight_decay=0.0)
    p.grad = torch.tensor([1.0])
    opt.step()                                   # m = 0.05 after the step; p = -1
    p.grad = torch.tensor([-0.05])
    opt.step()                                   # 0.9 * 0.05 + 0.1 * (-0.05) = 0.04 > 0: p = -2
    assert p.item() == -2.0
    torch.testing.assert_close(opt.state[p]["momentum"], torch.tensor([0.95 * 0.05 + 0.05 * -0.05]))


@pytest.fixture
def train_module(monkeypatch):
    sys.argv = ["train.py"]
    import train
    return train


def test_learning_rate_is_one_cycle_cosine(train_module, monkeypatch):
    for key, value in dict(lr=1.0, max_steps=100, warmup_frac=0.1, min_lr_frac=0.1).items():
        monkeypatch.setattr(train_module, key, value)
    lr_at = train_module.lr_at
    assert [lr_at(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])         # linear warmup over 10 steps
    assert lr_at(10) == pytest.approx(1.0)                                            # the cosine starts at the peak
    assert lr_at(55) == pytest.approx(0.1 + 0.9 * 0.5)                               # half way down the cosine
    assert lr_at(100) == pytest.approx(0.1) and 0.1 < lr_at(99) < 0.101              # ends at min_lr_frac * lr
    assert all(lr_at(s) > lr_at(s + 1) for s in range(10, 99))


def test_adamw_takes_the_settings_and_the_decay_groups(train_module, monkeypatch):
    for key, value in dict(optimizer="adamw", lr=0.01, betas=(0.8, 0.9), weight_decay=0.3).items():
        monkeypatch.setattr(train_module, key, value)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.param_groups = lambda wd: [{"params": [model[0].weight], "weight_decay": wd},
                                     {"params": [model[0].bias, *model[1].parameters()], "weight_decay": 0.0}]
    opt = train_module.make_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["lr"] == 0.01


def test_old_checkpoints_are_deleted_keeping_the_newest(single):
    out, _ = single  # 12 steps, a checkpoint every 3, keep_ckpts 2
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_0000009", "ckpt_0000012"]
    assert (out / "latest").read_text() == "ckpt_0000012"


def test_grad_clip_bounds_the_update(dataset, tmp_path, single):
    """AdamW with the gradient clipped to a norm of 1e-12: its steps shrink to lr * g / eps, nothing,
    and the loss stays where it started, while the unclipped run's falls by a fifth."""
    _, reference = single
    clipped = train(dataset, tmp_path, max_steps=12, optimizer="adamw", grad_clip=1e-12, ckpt_interval=12)
    assert clipped[0] == pytest.approx(reference[0], rel=1e-6)   # the same first step, before any update
    assert clipped[11] > 0.97 * clipped[0] and reference[11] < 0.8 * reference[0]


def tiny_model():
    from model import MAE, MAEConfig
    settings = {k: v for k, v in TINY.items() if k in MAEConfig.__dataclass_fields__}
    with torch.device("meta"):
        return MAE(MAEConfig(**settings))


def test_the_fsdp_recipe_is_in_effect(train_module, monkeypatch):
    """parallelize() with FSDP2, bf16 and activation checkpointing, on one gloo process: each block's
    matrices compute in bf16, the residual stream between blocks stays fp32, and each block runs its
    forward twice a step (again in the backward)."""
    import torch.distributed as dist
    for key, value in dict(parallel="fsdp", dtype="bfloat16", activation_checkpointing=True, compile="none").items():
        monkeypatch.setattr(train_module, key, value)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = train_module.parallelize(tiny_model())
        model.to_empty(device="cpu")
        model.init_weights()
        starts, outputs, matmuls = [], [], []  # recomputation may stop early, past the last tensor the backward needs
        model.blocks[0].register_forward_pre_hook(lambda module, args: starts.append(1))
        model.blocks[0].register_forward_hook(lambda module, args, output: outputs.append(output.dtype))
        model.blocks[0].in_proj.register_forward_hook(lambda module, args, output: matmuls.append(output.dtype))
        model(torch.randint(0, 256, (4, 6, 32, 32), dtype=torch.uint8))[0].backward()
        assert len(starts) == 2 and outputs[0] == torch.float32 and matmuls[0] == torch.bfloat16
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_compiled_blocks_are_compiled(train_module, monkeypatch):
    """compile='blocks': every block is a compiled graph once it has run."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(train_module, "parallel", "none")
    monkeypatch.setattr(train_module, "compile", "blocks")
    torch._dynamo.reset()
    counters.clear()
    model = train_module.parallelize(tiny_model())
    model.to_empty(device="cpu")
    model.init_weights()
    model(torch.randint(0, 256, (4, 6, 32, 32), dtype=torch.uint8))[0].backward()
    assert counters["stats"]["unique_graphs"] >= 2  # an encoder block and a decoder block (same-shaped ones share one)


def test_data_weights_choose_the_datasets(dataset, tmp_path, single):
    """data_weights '1,0' over two datasets trains on the first alone: the losses of the one-dataset run."""
    _, reference = single
    screen = dataset.parent / "screen"
    other = data.prepare(screen / "images", screen / "metadata.csv", tmp_path / "shifted", crop_size=32, convert="shift", workers=2,
                         channels=list(synth.CHANNELS))
    mixed = train(dataset, tmp_path / "run", max_steps=12, ckpt_interval=12, data=f"{dataset},{other}", data_weights="1,0")
    assert mixed == reference


# ---- faults: each of these once hung, crashed at every restart, or went on silently -----------------

def copy_dataset(dataset, tmp_path):
    copy = tmp_path / "crops"
    shutil.copytree(dataset, copy)
    return copy


@pytest.mark.parametrize("damage", ["truncated", "deleted", "offset past the end"])
def test_a_damaged_shard_stops_the_run_at_once_naming_it(dataset, tmp_path, damage):
    crops = copy_dataset(dataset, tmp_path)
    shard = crops / "shard_00000.npy"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:5000])
    elif damage == "deleted":
        shard.unlink()
    else:
        lines = (crops / "index.csv").read_text().splitlines()
        row = lines[1].split(",")
        row[1] = "100000"
        (crops / "index.csv").write_text("\n".join([lines[0], ",".join(row)] + lines[2:]) + "\n")
    run = subprocess.run(command(crops, tmp_path / "run", max_steps=5), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    message = run.stderr.strip().splitlines()
    assert len(message) == 1 and "shard_0000" in message[0], run.stderr[-2000:]


def delete_shards_once_training(job, crops, out_dir):
    """Once the run has logged a step, delete every shard: those already mapped stay readable, the rest fail."""
    wait_for(out_dir / "log.jsonl", timeout=120)
    for shard in crops.glob("shard_*.npy"):
        shard.unlink()
    return job.communicate(timeout=120)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_shard_lost_mid_run_stops_every_rank_within_seconds(dataset, tmp_path, nproc):
    """The loader's thread used to die on it and leave next(loader) waiting forever; now the error
    reaches the loop, and under torchrun the other rank is stopped with it (not after the collective
    timeout)."""
    screen = dataset.parent / "screen"
    crops = data.prepare(screen / "images", screen / "metadata.csv", tmp_path / "crops", crop_size=32, shard_size=4, workers=2)
    extra = dict(parallel="ddp") if nproc == 2 else {}
    job = subprocess.Popen(command(crops, tmp_path / "run", nproc=nproc, max_steps=10_000, ckpt_interval=10_000, **extra),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.time()
    _, stderr = delete_shards_once_training(job, crops, tmp_path / "run")
    assert job.returncode != 0 and time.time() - started < 120
    assert re.search(r"shard_\d{5}\.npy: read failed", stderr), stderr[-2000:]


@pytest.mark.parametrize("backend", ["math", "flash", "efficient", "cudnn"])
def test_every_sdpa_backend_is_understood(dataset, tmp_path, backend):
    """math and flash have CPU kernels: 2 steps of 2 micro-steps each (the context was once re-entered
    and crashed on the second); efficient and cudnn have none on a CPU: one line that says so."""
    run = subprocess.run(command(dataset, tmp_path, max_steps=2, sdpa_backend=backend), capture_output=True, text=True, timeout=300)
    if backend in ("math", "flash"):
        assert run.returncode == 0, run.stderr[-2000:]
        assert len(losses(tmp_path)) == 2
    else:
        assert run.returncode != 0 and run.stderr.strip() == f"sdpa_backend {backend!r} has no kernel on cpu: use flash or math there"


def final_weights(out_dir):
    return torch.load(Path(out_dir) / "model.pt", weights_only=True)["model"]


def test_killed_at_random_moments_while_checkpointing_it_resumes_to_the_same_weights(dataset, tmp_path):
    """A checkpoint every step, and SIGKILLs at random moments (most land in a checkpoint write: the
    .tmp folder, the rename, `latest`, the deletion of old ones). Every restart resumes, and the last
    one ends with the weights of a run never killed."""
    settings = dict(max_steps=10, ckpt_interval=1)
    train(dataset, tmp_path / "whole", **settings)
    rng = np.random.default_rng(0)
    out = tmp_path / "killed"
    for delay in rng.uniform(4, 9, 4):  # start-up takes ~3 s, the run ~4 s more
        job = subprocess.Popen(command(dataset, out, **settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        job.kill()
        job.wait()
    train(dataset, out, **settings)
    expected = final_weights(tmp_path / "whole")
    for name, tensor in final_weights(out).items():
        assert torch.equal(tensor, expected[name]), name
    assert [r["step"] for r in map(json.loads, open(out / "log.jsonl"))] == list(range(10))  # no step twice


def test_a_crash_between_the_rename_and_latest_resumes(dataset, tmp_path, single):
    """ckpt_12 complete but `latest` still naming ckpt_9 (the state in which every restart used to fail
    on 'Directory not empty'): the run resumes from ckpt_12 and writes model.pt."""
    out, _ = single
    shutil.copytree(out, tmp_path / "run", ignore=shutil.ignore_patterns("model.pt"))
    (tmp_path / "run" / "latest").write_text("ckpt_0000009")
    run = subprocess.run(command(dataset, tmp_path / "run", max_steps=12, ckpt_interval=3), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resumed from" in run.stdout and "ckpt_0000012 at step 12" in run.stdout
    expected = final_weights(out)
    for name, tensor in final_weights(tmp_path / "run").items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("damage", ["truncated shard", "deleted folder", "empty latest", "no train.json"])
def test_a_damaged_newest_checkpoint_falls_back_and_says_so(dataset, tmp_path, single, damage):
    out, reference = single
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    newest = run_dir / "ckpt_0000012"
    if damage == "truncated shard":
        shard = next(newest.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "deleted folder":
        shutil.rmtree(newest)
    elif damage == "empty latest":
        (run_dir / "latest").write_text("")
    else:
        (newest / "train.json").unlink()
    (run_dir / "log.jsonl").unlink()
    run = subprocess.run(command(dataset, run_dir, max_steps=12, ckpt_interval=3), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    if damage == "empty latest":  # `latest` is for people: the newest complete checkpoint is found on disk
        assert "ckpt_0000012 at step 12" in run.stdout
        return
    assert "ckpt_0000009 at step 9" in run.stdout
    if damage != "deleted folder":
        assert f"warning: {newest} cannot be resumed from" in run.stdout
    resumed = losses(run_dir)
    assert sorted(resumed) == [9, 10, 11] and all(resumed[s] == reference[s] for s in resumed)


def test_a_blown_up_run_names_a_checkpoint_whose_weights_trained(dataset, tmp_path):
    """lr 1e9, a checkpoint every step: the weights after the first step are astronomically large, their
    loss NaN. The run stops after max_bad_steps and says that no checkpoint of it is good (before, it
    named the checkpoint of those weights, or None), and no checkpoint holds non-finite weights."""
    run = subprocess.run(command(dataset, tmp_path, max_steps=12, ckpt_interval=1, lr=1e9, max_bad_steps=2),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].endswith("no checkpoint of this run is good")
    for ckpt in tmp_path.glob("ckpt_???????"):
        weights = from_pretrained(ckpt).state_dict()
        assert all(torch.isfinite(v).all() for v in weights.values()), ckpt


def test_keeping_one_checkpoint_never_deletes_the_last_good_one(dataset, tmp_path):
    """keep_ckpts=1, a checkpoint every step, a learning rate that blows up in its warmup: the newest
    checkpoint is not known to train when it is written, so the good one before it must stay (it
    used to be deleted, and the stop named a checkpoint that was gone)."""
    run = subprocess.run(command(dataset, tmp_path, max_steps=12, ckpt_interval=1, keep_ckpts=1, lr=100,
                                 warmup_frac=0.5, max_bad_steps=2), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    good = re.search(r"the last good checkpoint is (\S+)$", run.stderr.strip().splitlines()[-1])
    assert good and Path(good[1]).is_dir(), run.stderr[-2000:]
    assert all(torch.isfinite(v).all() for v in from_pretrained(good[1]).state_dict().values())


def test_resuming_another_model_is_refused_and_changed_settings_are_recorded(dataset, tmp_path, single):
    out, _ = single
    shutil.copytree(out, tmp_path / "run")
    refused = {"dim": dict(dim=128), "optimizer": dict(optimizer="adamw"), "patch_size": dict(patch_size=4)}
    for field, override in refused.items():
        run = subprocess.run(command(dataset, tmp_path / "run", max_steps=14, **override), capture_output=True, text=True)
        assert run.returncode != 0 and f"{field}: checkpoint" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    run = subprocess.run(command(dataset, tmp_path / "run", max_steps=13, ckpt_interval=13, lr=2e-3, seed=7), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "warning: lr was 0.001" in run.stdout and "warning: seed was 1337" in run.stdout
    history = json.loads((tmp_path / "run" / "ckpt_0000013" / "train.json").read_text())["history"]
    assert history == [dict(step=12, changed=dict(lr=[1e-3, 2e-3], seed=[1337, 7]))]
    below = subprocess.run(command(dataset, tmp_path / "run", max_steps=5), capture_output=True, text=True)
    assert below.returncode != 0 and "past max_steps=5" in below.stderr


def test_resuming_onto_crops_of_another_channel_count_is_refused(dataset, tmp_path, single):
    out, _ = single
    shutil.copytree(out, tmp_path / "run")
    crops = copy_dataset(dataset, tmp_path)
    meta = json.loads((crops / "meta.json").read_text())
    for k in sorted(crops.glob("shard_*.npy")):
        np.save(k, np.load(k)[:, :4])  # the same crops, 4 of their 6 channels
    (crops / "meta.json").write_text(json.dumps(dict(meta, channels=meta["channels"][:4])))
    run = subprocess.run(command(crops, tmp_path / "run", max_steps=14), capture_output=True, text=True)
    assert run.returncode != 0 and "data channels: checkpoint [6], this run [4]" in run.stderr


@pytest.mark.parametrize("argv,message", [
    (["--batch_size=0"], "batch_size must be 1 or more, got 0"),
    (["--heads=3"], "heads must divide the width: dim 64 / heads 3"),
    (["--keep_ckpts=0"], "keep_ckpts must be 1 or more, got 0"),
    (["--sdpa_backend=fast"], "sdpa_backend must be one of flash, efficient, cudnn, math"),
])
def test_settings_that_cannot_train_are_one_line_errors(dataset, tmp_path, argv, message):
    run = subprocess.run(command(dataset, tmp_path) + argv, capture_output=True, text=True)
    assert run.returncode != 0 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("lr = 1e-4\nbatch_size = = 8\n")
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), str(tmp_path / "broken.py")], capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.strip() == f"{tmp_path / 'broken.py'}, line 2: invalid syntax"


def test_a_resumed_run_logs_each_step_once(dataset, tmp_path, single):
    _, reference = single
    out = tmp_path / "run"
    job = subprocess.Popen(command(dataset, out, max_steps=12, ckpt_interval=3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out / "ckpt_0000006")
    job.kill()
    job.wait()
    train(dataset, out, max_steps=12, ckpt_interval=3)
    steps = [r["step"] for r in map(json.loads, open(out / "log.jsonl"))]
    assert steps == list(range(12))


def test_hsdp_on_a_2_by_2_mesh_gives_the_losses_of_one_process(dataset, tmp_path):
    """HSDP: 4 processes as 2 replica groups of 2 shards (as 2 nodes of 2 GPUs would be), global batch 16
    as 4 x 4; the same 16 crops in one process as 4 accumulated micro-batches of 4."""
    settings = dict(max_steps=6, global_batch=16, ckpt_interval=6)
    reference = train(dataset, tmp_path / "one", **settings)
    hsdp = train(dataset, tmp_path / "hsdp", nproc=4, parallel="hsdp", dp_replicate=2, **settings)
    assert sorted(hsdp) == sorted(reference)
    for step in reference:
        assert hsdp[step] == pytest.approx(reference[step], rel=1e-4), step
    saved = json.loads((tmp_path / "hsdp" / "ckpt_0000006" / "train.json").read_text())
    assert saved["world_size"] == 4 and saved["settings"]["parallel"] == "hsdp"


@pytest.mark.parametrize("foreach", [True, False])
def test_lion_on_local_shards_equals_the_update_written_out(train_module, foreach):
    """The update written as a loop over parameters (the definition), and Lion with foreach calls (its
    GPU path) or its loop (its CPU path): equal bit for bit over 5 steps of random gradients."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = train_module.Lion(params, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)
    momenta = [torch.zeros_like(p) for p in copies]
    for _ in range(5):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        with torch.no_grad():
            for p, m, grad in zip(copies, momenta, grads):
                p.mul_(1 - 0.01 * 0.1)
                p.add_(torch.sign(m.lerp(grad, 0.1)), alpha=-0.01)
                m.lerp_(grad, 0.01)
    for p, q, m in zip(params, copies, momenta):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["momentum"], m)


def test_the_whole_gpu_recipe_trains_like_fp32_on_two_processes(dataset, tmp_path):
    """FSDP2 + bf16 parameters with fp32 reduction + blocks compiled with fullgraph + activation
    checkpointing + gradient accumulation (2 processes x 2 micro-batches of 2), all at once, against
    the same run in fp32 eager. Compiled with the aot_eager backend: Inductor's CPU code generation
    fails on this model's bf16 backward kernels (it is the GPU's default)."""
    common = dict(nproc=2, parallel="fsdp", batch_size=2, max_steps=8, ckpt_interval=8)
    plain = train(dataset, tmp_path / "plain", **common)
    recipe = train(dataset, tmp_path / "recipe", dtype="bfloat16", compile="blocks", compile_backend="aot_eager",
                   activation_checkpointing=True, **common)
    for step in (0, 4, 7):
        assert recipe[step] == pytest.approx(plain[step], rel=0.05), step


def test_a_bf16_block_under_fsdp_keeps_its_layerscale_update(train_module, monkeypatch):
    """A vitg8-like parallel block (LayerScale 1e-4) sharded with train.py's policy: its update to the
    residual stream, out - x, matches the fp32 block's within bf16 matmul error. When the stream was
    bf16, x + 1e-4 * y rounded most of the update away."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from model import ParallelBlock
    monkeypatch.setattr(train_module, "dtype", "bfloat16")
    torch.manual_seed(0)
    reference = ParallelBlock(256, 4, 1024, layerscale_init=1e-4)
    sharded = ParallelBlock(256, 4, 1024, layerscale_init=1e-4)
    sharded.load_state_dict(reference.state_dict())
    x = torch.randn(2, 64, 256)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(sharded, mp_policy=train_module.block_precision())
        with torch.no_grad():
            expected, got = reference(x) - x, sharded(x) - x
    finally:
        dist.destroy_process_group()
    assert got.dtype == torch.float32
    assert (got - expected).norm() / expected.norm() < 0.02  # bf16 keeps 8 bits: ~0.4% per product


def test_channel_sampling_draws_valid_subsets_of_every_size(train_module, monkeypatch):
    monkeypatch.setattr(train_module, "min_channels", 2)
    drawn = [train_module.sampled_channels(step, 6) for step in range(400)]
    assert all(2 <= len(c) <= 6 and c.tolist() == sorted(set(c.tolist())) and 0 <= c.min() and c.max() < 6 for c in drawn)
    assert {len(c) for c in drawn} == {2, 3, 4, 5, 6}
    assert {tuple(c.tolist()) for c in drawn if len(c) == 2} >= {(0, 1), (4, 5)}  # different subsets, not a fixed one
    assert torch.equal(train_module.sampled_channels(7, 6), train_module.sampled_channels(7, 6))  # a function of the step


def test_channel_sampling_trains_and_two_processes_agree(dataset, tmp_path):
    """A CA-MAE on random channel subsets: the loss falls, and 2 DDP processes give the 1-process losses
    (every rank of a step keeps the same channels)."""
    settings = dict(max_steps=12, ckpt_interval=12, channel_sampling=True, min_channels=2)
    one = train(dataset, tmp_path / "one", **settings)
    assert np.mean([one[s] for s in (9, 10, 11)]) < 0.85 * np.mean([one[s] for s in (0, 1, 2)])
    two = train(dataset, tmp_path / "two", nproc=2, parallel="ddp", **settings)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


def test_mixed_channel_counts_train_one_ca_mae_and_two_processes_agree(dataset, jump_dataset, tmp_path):
    """A 6-stain screen and a 5-stain JUMP plate train one CA-MAE, drawn by weight: the loss falls, 2 DDP
    processes give the 1-process losses (a step's ranks read one dataset, so shapes agree), and the model
    records the stains of its channel tables by name."""
    settings = dict(max_steps=12, ckpt_interval=12, data=f"{dataset},{jump_dataset}", data_weights="1,1")
    one = train(dataset, tmp_path / "one", **settings)
    assert np.mean([one[s] for s in (9, 10, 11)]) < 0.85 * np.mean([one[s] for s in (0, 1, 2)])
    two = train(dataset, tmp_path / "two", nproc=2, parallel="ddp", **settings)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert from_pretrained(tmp_path / "one" / "model.pt").config.channel_names == synth.CHANNELS


def test_a_stain_takes_its_own_channel_row_wherever_a_screen_stores_it(dataset, jump_dataset, tmp_path):
    """Trained on the JUMP plate alone (weight 0 for the 6-stain screen listed first), the decoder's channel
    table moves in the rows of DNA, RNA, ER, AGP and Mito of the 6-stain order, and the Golgi row, which the
    JUMP plate lacks, stays as initialized (by position, ER would have trained RNA's row and Golgi's would move)."""
    settings = dict(data=f"{dataset},{jump_dataset}", data_weights="0,1", lr=1e-2)
    train(dataset, tmp_path / "init", max_steps=0, **settings)
    train(dataset, tmp_path / "trained", max_steps=6, ckpt_interval=6, **settings)
    table = lambda run: from_pretrained(tmp_path / run / "model.pt").dec_channel_embed.detach()
    moved = (table("trained") - table("init")).abs().amax(dim=1)
    golgi = synth.CHANNELS.index("Golgi")
    assert moved[golgi] < 1e-3 and all(moved[i] > 1e-2 for i in range(6) if i != golgi), moved


# ---- the GPU path's findings, shown on a CPU ------------------------------------------------------

def test_every_rank_resumes_from_the_checkpoint_rank_zero_chose(dataset, tmp_path, single):
    """On a shared filesystem after a crash, nodes can list out_dir differently; each rank choosing for
    itself would mix shards. Two gloo ranks whose out_dir listings differ (rank 1's has a newer
    checkpoint than rank 0's): both resume from rank 0's choice."""
    out, _ = single
    for rank, steps in ((0, ["ckpt_0000009"]), (1, ["ckpt_0000009", "ckpt_0000012"])):
        for name in steps:
            shutil.copytree(out / name, tmp_path / f"view{rank}" / name)
    script = tmp_path / "resume.py"
    script.write_text("\n".join([
        "import os, sys, torch.distributed as dist",
        "rank = int(os.environ['RANK'])",
        f"sys.argv = ['train.py', '--out_dir={tmp_path}/view' + str(rank)]",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "import train",
        "dist.init_process_group('gloo')",
        "open(f'{train.out_dir}/chosen', 'w').write(train.resume_point(rank).name)",
        "dist.destroy_process_group()",
        "os._exit(0)",  # as train.py ends: gloo's teardown at exit aborts now and then
    ]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [(tmp_path / f"view{r}" / "chosen").read_text() for r in (0, 1)] == ["ckpt_0000009"] * 2


def test_compiled_blocks_stay_few_and_static_under_channel_sampling_snapshots_and_sequential_blocks(train_module, monkeypatch):
    """compile='blocks' with fullgraph: a block class past dynamo's limit of 8 graphs is a hard error.
    Every channel count from 1 to 6 (channel_sampling), reconstruction snapshots (eval, no_grad, 4 crops)
    and an encoder of sequential blocks (the decoder's class otherwise): at most 4 graphs a block class
    (first block without stochastic depth; the token count dynamic after its first), and the width is
    never dynamic (the encoder's and decoder's sequential blocks once shared one cache, and their widths
    turned it dynamic: slower kernels)."""
    from model import MAE, MAEConfig
    graphs = []

    def recording(gm, example_inputs):  # a backend that runs the graph as traced, noting its inputs' shapes
        graphs.append([tuple(node.meta["example_value"].shape) for node in gm.graph.nodes  # fake tensors: SymInt if dynamic
                       if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.Tensor)])
        return gm.forward

    settings = {k: v for k, v in TINY.items() if k in MAEConfig.__dataclass_fields__}
    config = MAEConfig(**{**settings, "parallel_blocks": False, "depth": 4})
    for key, value in dict(parallel="none", compile="blocks", compile_backend=recording, channel_sampling=True,
                           min_channels=1, model_config=config, out_dir="unused").items():
        monkeypatch.setattr(train_module, key, value)
    torch._dynamo.reset()
    with torch.device("meta"):
        model = train_module.parallelize(MAE(config))
    model.to_empty(device="cpu")
    model.init_weights()
    x = torch.randint(0, 256, (4, 6, 32, 32), dtype=torch.uint8)
    for k in (6, 1, 2, 3, 4, 5, 6, 3):
        model(x[:, :k], torch.arange(k))[0].backward()
        train_module.snapshot(model, x[:, :k], torch.arange(k), 0, write=False)
    widths = [shape[2] for shapes in graphs for shape in shapes if len(shape) == 3]
    assert not [w for w in widths if isinstance(w, torch.SymInt)], graphs  # a dynamic width is a SymInt
    assert 0 < len(graphs) <= 2 * 4, graphs  # two block classes (encoder, decoder), 4 graphs at most each
    torch._dynamo.reset()


def test_lion_on_many_tensors_launches_one_kernel_per_operation(train_module):
    """The foreach path (a GPU's) with the skip flag: every multi-tensor call in an overload CUDA fuses
    into one kernel for all tensors (a lerp with a tensor weight has none: it ran one lerp_ per tensor,
    732 for vitg8), and the skip mask computed once, not once per gradient. Recorded as dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(f"{func.__name__}")  # e.g. _foreach_lerp_.Scalar; what it calls inside is not seen
            return func(*args, **(kwargs or {}))

    params = [torch.nn.Parameter(torch.randn(3, 5)) for _ in range(40)]
    for p in params:
        p.grad = torch.randn(3, 5)
    opt = train_module.Lion(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, foreach=True)
    opt.found_inf = torch.zeros(())
    with Calls() as calls:
        opt.step()
    foreach = [n for n in calls.names if n.startswith("_foreach")]
    assert not [n for n in foreach if n.startswith("_foreach_lerp") and not n.endswith(".Scalar")], foreach  # tensor weights
    assert "_foreach_lerp_.Scalar" in foreach and not [n for n in calls.names if n.startswith("lerp")], calls.names
    assert sum(n.startswith("where") for n in calls.names) == len(params)  # NaN gradients replaced: no foreach op does it
    assert not [n for n in calls.names if n.startswith(("eq.", "ne."))], calls.names  # the mask is not recomputed


def test_data_parallel_does_not_broadcast_buffers_every_step(train_module, monkeypatch):
    """DDP's default broadcasts every buffer before every forward; the only buffers are the fixed sin-cos
    tables, the same on every rank. Counted from the profiler on a one-rank gloo group."""
    import torch.distributed as dist
    monkeypatch.setattr(train_module, "parallel", "ddp")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_model()
        model.to_empty(device="cpu")
        model.init_weights()
        step_model = train_module.step_module(model)
        with torch.profiler.profile() as profile:
            step_model(torch.randint(0, 256, (2, 6, 32, 32), dtype=torch.uint8))[0].backward()
        assert not [e.name for e in profile.events() if "broadcast" in e.name]
    finally:
        dist.destroy_process_group()


def test_tokens_and_flops_follow_the_channels_each_step_kept_and_a_benchmark_writes_no_weights(dataset, tmp_path, train_module):
    """channel_sampling: each step's tokens are its kept channels' (the log's tokens/s x dt), not the
    dataset's 6; MFU against a given peak counts the same step's FLOPs. ckpt_interval=0 (the GPU bench):
    no checkpoint and no model.pt, only the log."""
    from model import MAE, MAEConfig
    settings = {k: v for k, v in TINY.items() if k in MAEConfig.__dataclass_fields__}
    run = train(dataset, tmp_path, max_steps=6, ckpt_interval=0, channel_sampling=True, peak_flops=1e9, global_batch=8)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "loss.png"], list(tmp_path.iterdir())
    with torch.device("meta"):
        model = MAE(MAEConfig(**settings))
    train_module.channel_sampling, train_module.seed, train_module.min_channels = True, 1337, 1
    kept = {r["step"]: len(train_module.sampled_channels(r["step"], 6)) for r in log}
    assert len(set(kept.values())) > 1 and len(run) == 6
    for r in log:
        assert r["tokens_per_s"] * r["dt"] == pytest.approx(8 * model.tokens_per_crop(kept[r["step"]]), rel=1e-6)
        assert r["mfu"] * 1e9 * r["dt"] == pytest.approx(8 * model.flops_per_crop(kept[r["step"]]), rel=1e-6)
