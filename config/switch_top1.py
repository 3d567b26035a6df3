# Switch Transformer routing on the baby GPT: 8 experts, top-1, with a capacity limit.
# Each expert takes at most capacity_factor * tokens / n_experts tokens per batch; the overflow is
# dropped (its MoE output is zero, the residual carries it) -- the console's "drop" column shows how much.
#   python train.py config/switch_top1.py

out_dir = 'out-switch-top1'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

wandb_log = False
wandb_project = 'moe-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

n_experts = 8
top_k = 1
capacity_factor = 1.25  # Switch's training capacity
eval_capacity_factor = 2.0  # Switch evaluates with more headroom
norm_topk_prob = False  # the gate is the router probability itself: with top-1, renormalising would
                        # make it 1.0 and cut the router off from the LM loss's gradient

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
