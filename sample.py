"""
Sample from a trained moe-gpt checkpoint (or from pretrained GPT-2), nanoGPT style.

$ python sample.py --out_dir=out-moe-8e
$ python sample.py --out_dir=out-moe-8e --start="ROMEO:" --temperature=0 --show_routing
$ python sample.py --start=FILE:prompt.txt --num_samples=2 --max_new_tokens=200
$ python sample.py --init_from=gpt2 --start="Hello, I'm a language model,"   (needs transformers + network)

No --compile: compiled sampling recompiles for every layer and every KV-cache length and breaks the graph
in attention, so it is not faster than eager; the KV cache is what makes sampling fast.
"""
import inspect
import os
import sys
import time
from contextlib import nullcontext

import torch

import checkpoint
import configurator
import hardware
import hf
from model import MoEGPT, MoEGPTConfig
from prepare import DataError, get_codec, load_meta

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), a GPT-2 hub name ('gpt2', ...) or 'gpt2:PATH' (local dir)
out_dir = 'out-moe-8e'
start = '\n'  # the prompt, or "FILE:prompt.txt" to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8  # 0 = greedy
top_k = 200  # keep the top_k most likely tokens; 0 = off
top_p = 1.0  # nucleus sampling; 1.0 = off
seed = 1337
device = 'auto'  # 'auto' = cuda, else mps, else cpu
dtype = 'auto'  # 'auto' = bfloat16 on a GPU that has it natively, else float16; float32 elsewhere
compile = False  # not offered (True is refused): compiled sampling is not faster, see the docstring
use_cache = True  # KV cache: the prompt once, then one token per step
show_routing = False  # print which experts every generated token went to, per MoE layer
data_dir = ''  # where the dataset's meta.json is; '' = the data_dir the checkpoint was trained with
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def fail(msg):
    print(f'sample.py: error: {msg}', file=sys.stderr)
    sys.exit(1)


if '--help' in sys.argv[1:] or '-h' in sys.argv[1:]:
    print(configurator.usage(DEFAULTS, prog='sample.py'))
    sys.exit(0)
try:
    _config, _ = configurator.load(DEFAULTS, sys.argv[1:], types={'top_p': (float,), 'temperature': (float,)})
except configurator.ConfigError as e:
    fail(e)
globals().update(_config)
if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or num_samples < 1 or max_new_tokens < 0:
    fail('need temperature >= 0, 0 < top_p <= 1, top_k >= 0, num_samples >= 1, max_new_tokens >= 0')
if compile:
    fail('--compile=True is not offered: compiled sampling recompiles for every layer and every KV-cache '
         'length and breaks the graph in attention, so it is slower than eager; sample without it')

# device and dtype: resolved as train.py does (hardware.py)
try:
    device, device_type, dtype, _ = hardware.resolve_device(device, dtype)
except hardware.DeviceError as e:
    fail(e)
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

# model and tokenizer
if init_from == 'resume':
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isdir(out_dir) or not os.path.exists(ckpt_path):
        fail(f'no checkpoint at {ckpt_path}. Train one first, e.g. '
             f'python train.py config/moe_8e.py --out_dir={out_dir}')
    try:
        ckpt = checkpoint.load(ckpt_path, map_location=device)
    except checkpoint.CheckpointError as e:
        fail(e)
    unknown = set(ckpt['model_args']) - set(inspect.signature(MoEGPTConfig).parameters)  # fields, old names
    if unknown:
        fail(f'{ckpt_path} was written by a different version of model.py (unknown model fields '
             f'{sorted(unknown)}); sample it with that version')
    try:
        model = MoEGPT(MoEGPTConfig(**ckpt['model_args']))
        model.load_state_dict(checkpoint.strip_compile_prefix(ckpt['model']))
    except (ValueError, RuntimeError) as e:
        fail(f'{ckpt_path} does not fit this model.py: {str(e).splitlines()[0]}')
    train_config = ckpt.get('config', {})
    try:
        meta = load_meta(data_dir or train_config.get('data_dir', 'data'), train_config.get('dataset', ''))
        encode, decode = get_codec(meta)
    except DataError as e:
        fail(f'the checkpoint was trained on {train_config.get("dataset")!r}, whose tokenizer is needed '
             f'to sample: {e}')
else:  # pretrained GPT-2: 'gpt2', 'gpt2-medium', ... or 'gpt2:PATH' for a save_pretrained directory
    name = init_from.split(':', 1)[1] if init_from.startswith('gpt2:') else init_from
    try:
        model = hf.load(name)
        encode, decode = get_codec({'tokenizer': 'gpt2'})
    except (ImportError, OSError, ValueError, DataError) as e:  # ValueError: a bad or unsupported checkpoint
        fail(f'cannot load {init_from!r}: {str(e).splitlines()[0]}')
model.eval().to(device)

# prompt
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f'cannot read the prompt file: {e}')
try:
    start_ids = encode(start)
except DataError as e:
    fail(f'the prompt cannot be encoded: {e}')
if not start_ids:
    fail('the prompt is empty: give --start with at least one token')
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]


def print_routing(tokens, routing_LK, moe_blocks):
    """One row per generated token: its text and, per MoE layer, its top-k experts (best first);
    then per layer how many generated tokens each expert took (its first choice or any of k)."""
    names = [f'h{i}' for i in moe_blocks]
    print('routing: one row per generated token; per MoE layer its top-k experts, best first')
    print(f"{'pos':>5}  {'token':<10}" + ''.join(f'{n:>{3 * routing_LK.shape[-1] + 2}}' for n in names))
    for pos, (tok, ids_LK) in enumerate(zip(tokens, routing_LK)):
        cells = ''.join(f"{','.join(str(e) for e in ids_K):>{3 * routing_LK.shape[-1] + 2}}" for ids_K in ids_LK.tolist())
        print(f'{pos:>5}  {repr(decode([tok]))[:10]:<10}' + cells)
    n_experts = model.config.n_experts
    print(f'expert use over the sample (assignments per expert, {len(tokens)} tokens x top-{routing_LK.shape[-1]}):')
    for layer, name in enumerate(names):
        counts = torch.bincount(routing_LK[:, layer].reshape(-1), minlength=n_experts).tolist()
        print(f'  {name}: ' + ' '.join(f'{e}:{c}' for e, c in enumerate(counts)))


moe_blocks = [i for i, b in enumerate(model.transformer.h) if b.is_moe]
if show_routing and not moe_blocks:
    print('(--show_routing: this model has no MoE layers)')
total_tokens, total_time = 0, 0.0
with torch.no_grad(), ctx:
    for k in range(num_samples):
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                             top_p=top_p, use_cache=use_cache, return_routing=show_routing and bool(moe_blocks))
        if isinstance(out, tuple):
            out, routing = out  # (new tokens, n_moe_layers, B, top_k)
        total_time += time.perf_counter() - t0
        total_tokens += max_new_tokens
        new_tokens = out[0, x.size(1):].tolist()
        print(decode(out[0].tolist()))
        if show_routing and moe_blocks:
            print_routing(new_tokens, routing[:, :, 0], moe_blocks)
        print('---------------')
sys.stdout.flush()
print(f'{total_tokens} tokens in {total_time:.2f}s ({total_tokens / max(total_time, 1e-9):.1f} tokens/s, '
      f'kv cache {"on" if use_cache else "off"})', file=sys.stderr)
