# DeepSeekMoE's fine-grained experts: split each expert into m = 4 narrower ones (expert_hidden =
# 4*n_embd/4), with 4x the experts and 4x the top_k: 32 experts, top-8. Active FLOPs equal 8 experts
# top-2; there are many more ways to combine experts. granularity follows --n_embd overrides.
#   python train.py config/fine_grained.py
out_dir = 'out-fine-grained'
n_experts = 32
top_k = 8
granularity = 4
