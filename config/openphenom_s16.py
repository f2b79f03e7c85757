# CA-MAE-S/16 as released (OpenPhenom; arXiv 2411.02572, Table 4 and its training setup; arXiv 2404.10242):
# channel-agnostic tokenization of 256x256x6 crops, no channel embedding, ViT-S/16 encoder with
# parallel blocks, QK-norm, no qkv bias, LayerScale 1e-4, stochastic depth 0.1; decoder 8 x 512
# (the paper's (?) default); Lion lr 1e-4 betas (0.9, 0.95) wd 0.05, global batch 2,048, 100 epochs
# one-cycle cosine with 10% warmup; mask 0.75; Fourier loss weight 0.01; norm_pix_loss off.
preset = "vits16"
channel_agnostic = True
channel_embed = False
img_size = 256
drop_path = 0.1
mask_ratio = 0.75
fourier_weight = 0.01
optimizer = "lion"
lr = 1e-4
betas = (0.9, 0.95)
weight_decay = 0.05
warmup_frac = 0.1
global_batch = 2048
batch_size = 64
max_steps = 781_250   # 100 epochs of Phenoprints-16M at 2,048 crops a step; set from your dataset
