# Expert-choice routing (Zhou et al. 2022): every expert takes its top C = capacity_factor*T/E
# tokens of the batch; capacity_factor 2 gives the compute of top-2. CAVEAT: an expert compares
# tokens across the batch, later positions included, so this causal LM sees the future: its val
# loss is optimistic and not comparable (docs/routing_zoo.md). Generation reruns the whole context.
#   python train.py config/expert_choice.py
out_dir = 'out-expert-choice'
router = 'expert_choice'
n_experts = 8
capacity_factor = 2.0
