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
import math
import os
import re
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
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt or ckpt.dcp), a GPT-2 hub name ('gpt2', ...) or 'gpt2:PATH' (local dir)
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


def print_routing(tokens, routing_LK, moe_blocks, model, decode):
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


def fail(msg):
    """Bad input (docs/reliability.md): one line, exit 2, before any sampling."""
    msg = ' '.join(str(msg).split('\n'))
    print(f'sample.py: error: {msg}', file=sys.stderr)
    sys.exit(2)


def parse(argv):
    """The config of these arguments with every check that needs no model passed (types, ranges, device,
    dtype, the checkpoint's presence, the prompt file); start is the prompt's text. Bad input: fail()."""
    if '--help' in argv or '-h' in argv:
        print(configurator.usage(DEFAULTS, prog='sample.py'))
        sys.exit(0)
    try:
        c, _ = configurator.load(DEFAULTS, argv, types={'top_p': (float,), 'temperature': (float,)})
    except configurator.ConfigError as e:
        fail(e)
    if not (math.isfinite(c['temperature']) and c['temperature'] >= 0) or not 0 < c['top_p'] <= 1 \
            or c['top_k'] < 0 or c['num_samples'] < 1 or c['max_new_tokens'] < 0:
        fail('need a finite temperature >= 0, 0 < top_p <= 1, top_k >= 0, num_samples >= 1, max_new_tokens >= 0')
    if not 0 <= c['seed'] < 2**64:  # torch.manual_seed's range
        fail(f"seed={c['seed']} must be in 0 .. 2**64-1")
    if c['compile']:
        fail('--compile=True is not offered: compiled sampling recompiles for every layer and every KV-cache '
             'length and breaks the graph in attention, so it is slower than eager; sample without it')
    if not re.fullmatch(r'auto|cpu|mps|cuda(:\d+)?', c['device']):
        fail(f"device={c['device']!r} must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    try:  # device and dtype: resolved as train.py does (hardware.py)
        c['device'], c['device_type'], c['dtype'], _ = hardware.resolve_device(c['device'], c['dtype'])
    except hardware.DeviceError as e:
        fail(e)
    if c['init_from'] == 'resume':
        ckpt_path = checkpoint.latest(c['out_dir'])  # ckpt.pt or ckpt.dcp, the newer
        if not os.path.isdir(c['out_dir']) or not os.path.exists(ckpt_path):
            fail(f"no checkpoint at {ckpt_path}. Train one first, e.g. "
                 f"python train.py config/moe_8e.py --out_dir={c['out_dir']}")
    if c['start'].startswith('FILE:'):
        try:
            with open(c['start'][5:], encoding='utf-8') as f:
                c['start'] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f'cannot read the prompt file: {e}')
    return c


def main(argv=None):
    c = parse(sys.argv[1:] if argv is None else argv)
    init_from, out_dir, start, num_samples, max_new_tokens = (c[k] for k in (
        'init_from', 'out_dir', 'start', 'num_samples', 'max_new_tokens'))
    temperature, top_k, top_p, seed, device, device_type, dtype = (c[k] for k in (
        'temperature', 'top_k', 'top_p', 'seed', 'device', 'device_type', 'dtype'))
    use_cache, show_routing, data_dir = c['use_cache'], c['show_routing'], c['data_dir']
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

    # model and tokenizer
    if init_from == 'resume':
        ckpt_path = checkpoint.latest(out_dir)  # parse() saw it there
        try:
            ckpt = checkpoint.load(ckpt_path, map_location=device, tensors='model')
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
    try:
        start_ids = encode(start)
    except DataError as e:
        fail(f'the prompt cannot be encoded: {e}')
    if not start_ids:
        fail('the prompt is empty: give --start with at least one token')
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]

    moe_blocks = [i for i, b in enumerate(model.transformer.h) if b.is_moe]
    # a router that ranks tokens across the sequence (expert choice): generate reruns the context every step
    # (no KV cache) and a token has no top-k experts of its own
    causal = all(m.router.spec.causal for m in model.moe_layers())
    if show_routing and not moe_blocks:
        print('(--show_routing: this model has no MoE layers)')
    elif show_routing:
        if not causal:
            fail(f'--show_routing: router={model.config.router!r} lets experts choose tokens across the sequence, '
                 f'so a generated token has no top-k experts of its own to show; sample without --show_routing')
        with torch.no_grad(), ctx:  # one forward of the prompt: does every MoE layer give per-token top-k?
            _, _, stats = model(x[:, -model.config.block_size:], return_intermediate=True)
        if any('topk_ids' not in r for r in stats['routing']):
            fail(f'--show_routing: router={model.config.router!r} gives tokens a varying number of experts, so '
                 f'there is no per-token top-k to show; sample without --show_routing')
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
                print_routing(new_tokens, routing[:, :, 0], moe_blocks, model, decode)
            print('---------------')
    sys.stdout.flush()
    cache = 'on' if use_cache and causal else 'off' if not use_cache else \
        f'off: router={model.config.router!r} is not causal, every step reruns the context'  # generate's rule
    print(f'{total_tokens} tokens in {total_time:.2f}s ({total_tokens / max(total_time, 1e-9):.1f} tokens/s, '
          f'kv cache {cache})', file=sys.stderr)


if __name__ == '__main__':
    main()
