# The Switch load-balancing loss computed per sequence (DeepSeek's sequence-level aux) instead of
# over the micro-batch. For balancing over the global batch of all DDP ranks, use
# balance_scope = 'global' (Megatron-Core's global-batch balancing).
#   python train.py config/balance_sequence.py
out_dir = 'out-balance-sequence'
n_experts = 8
top_k = 2
balance_scope = 'sequence'
