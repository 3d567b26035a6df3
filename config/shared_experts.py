# DeepSeekMoE's shared expert: one always-on expert plus top-1 of 8 routed experts. Every token
# passes through 2 expert MLPs, the same active FLOPs as top-2 routing.
#   python train.py config/shared_experts.py
out_dir = 'out-shared-experts'
n_experts = 8
top_k = 1
n_shared_experts = 1
norm_topk_prob = False  # with top-1, renormalising makes the gate 1.0 and cuts the router off from the LM loss
