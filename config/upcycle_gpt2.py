# Sparse upcycling (Komatsuzaki et al. 2022): start from pretrained GPT-2 small, turn every MLP into
# 8 experts that all begin as copies of it (top-2, gates renormalised, so step 0 computes exactly
# GPT-2's function), and finetune on shakespeare (GPT-2 BPE). Needs `pip install transformers` and
# the hub, or a local copy: init_from = 'gpt2:/path/to/save_pretrained_dir'.
#   python prepare.py shakespeare && python train.py config/upcycle_gpt2.py
# Dense finetune instead: --n_experts=1
out_dir = 'out-upcycle-gpt2'
init_from = 'gpt2'
dataset = 'shakespeare'
n_experts = 8
top_k = 2
norm_topk_prob = True
upcycle_noise = 0.0
dropout = 0.0
block_size = 256
batch_size = 8
gradient_accumulation_steps = 4
learning_rate = 3e-5  # finetuning: small and constant
decay_lr = False
warmup_iters = 0
max_iters = 200
eval_interval = 50
eval_iters = 40
always_save_checkpoint = False
