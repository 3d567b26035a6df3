# Fair MoE-vs-dense family, 4 of 6: fine-grained experts (DeepSeekMoE) at EQUAL ACTIVE FLOPs to
# config/fair_dense.py and EQUAL TOTAL parameters to config/fair_moe_8e_top2.py: 32 experts of
# n_embd/2 (granularity 8), top-8, so 8 x n_embd/2 = 4*n_embd active hidden units, 32 x n_embd/2 =
# 16*n_embd in all. Only the router grows (32 x n_embd per layer).
#   python train.py config/moe_8e_cpu.py config/fair_fine_32e_top8.py
out_dir = 'out-fair-fine-32e-top8'
n_experts = 32
top_k = 8
granularity = 8  # expert_hidden = 4*n_embd // 8
