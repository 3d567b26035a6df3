# Switch Transformer routing on the baby GPT (train.py's defaults = config/moe_8e.py): 8 experts,
# top-1, with a capacity limit. Each expert takes at most capacity_factor * tokens / n_experts tokens
# per batch; the overflow is dropped (its MoE output is zero, the residual carries it) -- the
# console's "drop" column shows how much.
#   python train.py config/switch_top1.py

out_dir = 'out-switch-top1'
n_experts = 8
top_k = 1
capacity_factor = 1.25  # Switch's training capacity
eval_capacity_factor = 2.0  # Switch evaluates with more headroom
norm_topk_prob = False  # the gate is the router probability itself: with top-1, renormalising would
                        # make it 1.0 and cut the router off from the LM loss's gradient
