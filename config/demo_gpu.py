# The demo at a real model's size, for one GPU in about 30 minutes: CA-MAE-S/16 (the released
# OpenPhenom architecture, config/openphenom_s16.py) on the `large` synthetic screen (1,214 genes,
# 18,216 sites of 256 px), cut into 128 px crops (72,864 crops; 8x8 patches x 6 stains = 384 tokens):
#
#     python demo.py --size large --config config/demo_gpu.py
#
# The question it answers: does an MAE of the paper's smallest size, trained for GPU minutes, pass the
# hand-crafted baseline on this screen (CPU minutes on the tiny demo model do not: 0.43 vs 0.63 CORUM
# recall)? NOT YET RUN: no GPU was available. The step count is an estimate (a step of 256 crops is 20
# TFLOP by model.flops_per_crop; at 25% of an H100/H200's bf16 peak, 0.08 s, so 20,000 steps are ~27
# minutes, 70 epochs of the crops); check the first log lines' ms per step and adjust max_steps.
preset = "vits16"
data = "out/demo_large/crops"
out_dir = "out/demo_large/train"
channel_agnostic = True
channelwise_embeddings = True  # as the demo: each stain's mean token, concatenated
img_size = 128
drop_path = 0.1
layerscale_init = 0.1  # the demo's finding: 1e-4 is for 48 blocks and slows a short run's start
optimizer = "lion"
lr = 1e-4
betas = (0.9, 0.95)
weight_decay = 0.05
warmup_frac = 0.05
max_steps = 20_000
batch_size = 256
global_batch = 256
log_interval = 200
ckpt_interval = 2_000
snapshot_interval = 5_000
