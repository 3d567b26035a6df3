# OLMoE's architecture at the CPU recipe's size (config/moe_8e_cpu.py's training settings): RMSNorm,
# rotary positions, QK-norm over the whole q and k projections, SwiGLU experts, no biases, untied
# embeddings; fine-grained experts (16 half-width experts, top-4: OLMoE-1B-7B has 64, top-8) with
# the top-k gates left as softmax probabilities (norm_topk_prob=False, as OLMoE).
# export.py writes it as an OlmoeForCausalLM directory.
# Only the architecture is set here; the sizes and the recipe come first:
#   python prepare.py shakespeare_char && python train.py config/moe_8e_cpu.py config/olmoe_tiny.py
#   python export.py --out_dir=out-olmoe-tiny --to=hf-olmoe-tiny
out_dir = 'out-olmoe-tiny'
norm = 'rmsnorm'
position = 'rope'
activation = 'swiglu'
bias = False
tie_embeddings = False
qk_norm = 'proj'
n_experts = 16
top_k = 4
expert_hidden = 168  # half of mixtral_tiny's 336: the same active parameters with 2x the experts
norm_topk_prob = False
