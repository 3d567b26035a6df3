# Fair MoE-vs-dense family, 2 of 6: 8 experts, top-2, at EQUAL ACTIVE FLOPs to config/fair_dense.py.
# Each expert is 2*n_embd wide (granularity 2), so a token's two experts hold top_k x expert_hidden =
# 4*n_embd hidden units: the dense MLP's matmul work. Total expert parameters are 4x dense's FFN.
# granularity follows a later --n_embd, so this stays equal-FLOPs at any width.
#   python train.py config/moe_8e_cpu.py config/fair_moe_8e_top2.py
out_dir = 'out-fair-moe-8e-top2'
n_experts = 8
top_k = 2
granularity = 2  # expert_hidden = 4*n_embd // 2
