# Noisy top-k gating (Shazeer et al. 2017): router logits + N(0,1) * softplus(x W_noise), the noise
# weights learned (starting at zero, i.e. noise std 0.69) and switched off in eval. 8 experts, top-2.
#   python train.py config/noisy_topk.py
out_dir = 'out-noisy-topk'
router = 'noisy_topk'
n_experts = 8
top_k = 2
