# Fair MoE-vs-dense family, 5 of 6: shared + routed (DeepSeekMoE) at EQUAL ACTIVE FLOPs to
# config/fair_dense.py: 1 always-on expert + top-1 of 8 routed experts, every expert 2*n_embd wide,
# so each token passes 2 x 2*n_embd = 4*n_embd hidden units. Why this split: it keeps the expert
# shape of config/fair_moe_8e_top2.py (one of its two routed choices becomes the shared expert), so
# the two differ only in shared-vs-routed; total = 9 experts (one more than 8e top-2).
#   python train.py config/moe_8e_cpu.py config/fair_shared_8e_top1.py
out_dir = 'out-fair-shared-8e-top1'
n_experts = 8
top_k = 1
n_shared_experts = 1
granularity = 2  # expert_hidden = 4*n_embd // 2, shared expert included
norm_topk_prob = False  # with top-1, renormalising makes the gate 1.0 and cuts the router off from the LM loss
