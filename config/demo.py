# A tiny channel-agnostic MAE that trains on a 2-core CPU in a few minutes on the synthetic screen
# (python data.py synth --size demo; prepared into 64x64 crops): the main job's model.
# Not from the paper: the same architecture as CA-MAE-S/16 (parallel blocks, QK-norm, no qkv bias,
# LayerScale 1e-4, Lion, one-cycle cosine, mask 0.75, Fourier 0.01) shrunk to 64x64 crops.
preset = "vits16"
data = "data/demo"
channel_agnostic = True
img_size = 64
patch_size = 8
dim = 128
depth = 6
heads = 4
mlp_dim = 512
drop_path = 0.0      # too few steps for stochastic depth to pay off
dec_dim = 128
dec_depth = 2
dec_heads = 4
dec_mlp_dim = 256
optimizer = "lion"
lr = 3e-4            # Lion wants ~3-10x less than AdamW; 1e-4 (the paper's S/16 value) is slow for 300 steps
betas = (0.9, 0.95)
weight_decay = 0.05
warmup_frac = 0.1
max_steps = 300
batch_size = 32
global_batch = 32
log_interval = 25
