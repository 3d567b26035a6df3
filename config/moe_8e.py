# The repo's main job: nanoGPT's shakespeare_char "baby GPT" (6 layers, 6 heads, 384 wide, block 256)
# with every feed-forward block an 8-expert, top-2 Mixture of Experts. A few minutes on one GPU:
#   python prepare.py shakespeare_char && python train.py config/moe_8e.py
# These are also train.py's defaults, so `python train.py` alone runs this job.
#
# On a CPU (nanoGPT's recipe: a smaller model, no compile) -- or use config/moe_8e_cpu.py:
#   python train.py config/moe_8e.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 \
#       --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 \
#       --lr_decay_iters=2000 --dropout=0.0

out_dir = 'out-moe-8e'
eval_interval = 250  # small data: evaluate often, it overfits
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # save only when val improves

wandb_log = False
wandb_project = 'moe-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 characters

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

n_experts = 8
top_k = 2  # each token runs through 2 of the 8 experts (active FFN = 2x the dense baseline's)

learning_rate = 1e-3  # a baby network can take a high learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually = max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a bit bigger because the number of tokens per iter is small
warmup_iters = 100
