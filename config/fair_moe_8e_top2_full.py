# Fair MoE-vs-dense family, 3 of 6: 8 experts, top-2, each a FULL 4*n_embd MLP: the repo's main job
# (config/moe_8e.py). Holds the expert width equal to dense's MLP, so it does 2x dense's FFN FLOPs per
# token: a MoE win here is partly bought with compute (the compute multiplier says how much).
#   python train.py config/moe_8e_cpu.py config/fair_moe_8e_top2_full.py
out_dir = 'out-fair-moe-8e-top2-full'
n_experts = 8
top_k = 2
granularity = 1  # expert_hidden = 4*n_embd
