# Soft MoE as seed 000 defines it for a decoder: every token gets the softmax-weighted mixture of
# all experts (dense, causal). Experts 1/4 as wide (granularity 4) so 8 of them cost what 2 full
# experts cost: the same active FLOPs as top-2. (Slot-based Soft MoE, Puigcerver et al. 2023, mixes
# tokens across positions and is not offered for a causal LM.)
#   python train.py config/soft_moe.py
out_dir = 'out-soft-moe'
router = 'soft'
n_experts = 8
granularity = 4
