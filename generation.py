"""
Generation for MoEGPT (model.generate): sampling with a KV cache. The model's attention fills the
cache; this file decides what to feed it, token by token, and how to pick the next token.
"""
import torch


class KVCache:
    """Keys and values of the tokens seen so far, one entry per layer (generation only).
    Passed into forward and filled in place: it belongs to the caller, not to the model.
    With rope the keys are cached rotated: a new token's position is the cache length."""

    def __init__(self, n_layer):
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    def __len__(self):
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i, k, v):
        """Append layer i's keys and values of S new positions, (B, heads, S, Q). Returns all of them and
        the attention mask of the S queries (None: is_causal does it, or one query sees everything)."""
        S = k.size(2)
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        P = k.size(2) - S  # cached positions before these S queries
        if P == 0 or S == 1:
            return k, v, None
        # the queries see all of the past and the causal part of the present
        return k, v, torch.arange(S, device=k.device)[:, None] + P >= torch.arange(P + S, device=k.device)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
             return_routing=False):
    """Sample max_new_tokens after idx (B, S). temperature=0 is greedy. top_k / top_p filter the
    distribution. use_cache: a KV cache, so the prompt is processed once and then one token per
    step. Past block_size, learned absolute positions can't slide in place: the uncached path
    recomputes the last block_size tokens every step (nanoGPT); the cached path refills the cache
    with the last block_size//2 tokens and goes on from there (each token then sees between
    block_size//2 and block_size tokens; rope models too, their positions restarting at 0).
    Both agree token for token while the sequence fits.
    return_routing: also return the top-k expert ids of every generated token in every MoE layer,
    a LongTensor (max_new_tokens, n_moe_layers, B, top_k)."""
    bs = model.config.block_size
    routing = []
    if any(not m.router.spec.causal for m in model.moe_layers()):
        # A router that ranks tokens across the sequence (expert choice): one cached token at a time
        # can't reproduce that, so rerun the context every step, the same batch-level rule as training.
        if return_routing:
            raise ValueError(f'return_routing: expert-choice style routing (router={model.config.router}) has no '
                             'per-token top-k experts')
        use_cache = False

    def step(tokens, cache):
        logits, _, stats = model(tokens, kv_cache=cache, return_intermediate=return_routing)
        if return_routing and 'topk_ids' not in stats['routing'][0]:
            raise ValueError(f'return_routing: router={model.config.router} gives tokens a varying number of '
                             'experts; it has no per-token top-k to report')
        if return_routing:  # routing of the last input position, i.e. the newest token
            routing.append(torch.stack([r['topk_ids'][:, -1] for r in stats['routing']]))
        return logits[:, -1, :]

    cache = KVCache(model.config.n_layer) if use_cache else None
    logits = step(idx[:, -bs:], cache)
    routing.clear()  # the prompt's routing is not asked for
    for i in range(max_new_tokens):
        idx_next = sample_next(logits, temperature, top_k, top_p)
        idx = torch.cat((idx, idx_next), dim=1)
        if i == max_new_tokens - 1 and not return_routing:
            break  # the last token needs a forward only to report its routing
        if not use_cache:
            logits = step(idx[:, -bs:], None)
        elif len(cache) + 1 > bs:  # cache full: refill with the last half block
            cache = KVCache(model.config.n_layer)
            logits = step(idx[:, -(bs // 2):], cache)
        else:
            logits = step(idx_next, cache)
    if return_routing:
        return idx, torch.stack(routing) if routing else idx.new_zeros(0, len(model.moe_layers()), idx.size(0), model.config.top_k)
    return idx


def sample_next(logits_BV, temperature=1.0, top_k=None, top_p=None):
    """One token per row from logits: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits_BV, min(top_k, logits_BV.size(-1)))
        logits_BV[logits_BV < v[:, [-1]]] = -float('Inf')
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits_BV, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits[remove] = -float('Inf')
        logits_BV = torch.full_like(logits_BV, -float('Inf')).scatter(1, sorted_idx, sorted_logits)
    return torch.multinomial(torch.softmax(logits_BV, dim=-1), num_samples=1)
