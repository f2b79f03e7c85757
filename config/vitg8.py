# MAE-G/8 (Phenom-2; arXiv 2411.02572, Table 4 and its training setup): standard tokenization, width 1664, depth 48,
# 16 heads and MLP 8192 (neither pinned down by the paper) -> 1.84B encoder parameters; parallel blocks, QK-norm, no qkv bias, LayerScale 1e-4,
# stochastic depth 0.6; Lion lr 3e-5 betas (0.9, 0.95) wd 0.05, global batch 8,192, 500 epochs of
# Phenoprints-16M (~8B crops) one-cycle cosine with 10% warmup; mask 0.75; Fourier loss 0.01.
preset = "vitg8"
channel_agnostic = False
img_size = 256
drop_path = 0.6
mask_ratio = 0.75
fourier_weight = 0.01
optimizer = "lion"
lr = 3e-5
betas = (0.9, 0.95)
weight_decay = 0.05
warmup_frac = 0.1
global_batch = 8192
batch_size = 32
max_steps = 976_562   # 500 epochs x 16M images / 8,192; set from your dataset
# Memory per GPU at batch 32 over 8 GPUs, 32 micro-steps (python model.py --memory vitg8 --batch_size 32
# --world_size 8 --micro_steps 32): ~47 GiB without recomputation (~14 GiB with; 7 GiB of either is the
# unsharded gradients accumulated between micro-steps), so on 80 GB GPUs the blocks are not recomputed:
# recomputation costs ~25% of the step. Turn it on (--activation_checkpointing=True) below 64 GB or for a larger batch.
activation_checkpointing = False
