# Mixtral-style routing on the baby GPT (train.py's defaults = config/moe_8e.py): 8 experts, top-2,
# the two gate weights renormalised to sum to 1, dropless. Same as moe_8e; here for the comparison.
#   python train.py config/mixtral_top2.py
out_dir = 'out-mixtral-top2'
n_experts = 8
top_k = 2
norm_topk_prob = True
capacity_factor = 0.0
