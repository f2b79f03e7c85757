# MAE-L/8 (Phenom-1; arXiv 2404.10242 and 2411.02572, Table 4): standard tokenization (6 channels stacked per 8x8 patch),
# width 1024, depth 24, 16 heads, MLP 4096, parallel blocks with QK-norm, stochastic depth 0.3;
# Lion lr 3e-5 betas (0.9, 0.95) wd 0.05, global batch 16,384, 500 epochs one-cycle cosine with
# 10% warmup; mask 0.75; Fourier loss 0.01.
preset = "vitl8"
channel_agnostic = False
img_size = 256
drop_path = 0.3
mask_ratio = 0.75
fourier_weight = 0.01
optimizer = "lion"
lr = 3e-5
betas = (0.9, 0.95)
weight_decay = 0.05
warmup_frac = 0.1
global_batch = 16384
batch_size = 64
max_steps = 488_281   # 500 epochs of Phenoprints-16M at 16,384 crops a step; set from your dataset
