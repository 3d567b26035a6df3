"""
What the machine can do, in one place for train.py, sample.py and bench.py: the device and dtype 'auto'
pick, the peak FLOP/s that MFU is measured against, and the CPU allocator setting of a training run.
"""
import ctypes
import ctypes.util
import platform

import torch

# Dense (no sparsity) tensor-core peaks in bf16/fp16, from the vendors' datasheets. Keys are whole words
# of torch.cuda.get_device_name(), so 'L4' never matches 'L40S' and 'A10' never matches 'A100'/'A10G'.
# H100/H200 come in SXM, PCIe and NVL parts with different clocks; the variant word decides.
GPU_PEAK_BF16 = {
    ('B200',): 2250e12,
    ('H200', 'NVL'): 835e12,
    ('H200',): 989e12,
    ('H100', 'PCIe'): 756e12,
    ('H100', 'NVL'): 835e12,
    ('H100',): 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    ('A100',): 312e12,
    ('L40S',): 362e12,
    ('L4',): 121e12,
    ('A10',): 125e12,
    ('RTX', '4090'): 165e12,
    ('V100',): 125e12,  # fp16 only (no bf16)
    ('T4',): 65e12,  # fp16 only (no bf16)
}


def bf16_supported():
    """Native bf16 on this CUDA device. torch.cuda.is_bf16_supported() also says True for GPUs that
    only emulate it (V100, T4: slow, and inductor won't compile it); including_emulation=False asks
    for the real thing (the argument is new in torch 2.3; older torch did not count emulation)."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.is_bf16_supported()


def auto_dtype(device_type):
    """dtype='auto': bfloat16 on a GPU that has it natively, float16 (with a GradScaler) on older
    GPUs, float32 on CPU / MPS."""
    if device_type != 'cuda':
        return 'float32'
    return 'bfloat16' if bf16_supported() else 'float16'


# train.py's "this will be slow" note on the CPU: a rough fp32 training rate of one CPU thread (a recent
# x86 core, MoE routing and AdamW included), good for an order of magnitude only, and the estimated
# seconds per iteration above which train.py suggests the CPU recipe instead.
CPU_FLOPS_PER_THREAD = 50e9
CPU_HINT_SECONDS = 2.0


class DeviceError(ValueError):
    """A device or dtype this machine cannot run. The message is one line for the user."""


def mps_available():
    return getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()


def resolve_device(device='auto', dtype='auto', local_rank=None, absent_ok=False):
    """The device and dtype a run uses: (device, device_type, dtype, here). device 'auto' = cuda, else
    mps, else cpu; dtype 'auto' = auto_dtype. local_rank: a torchrun process's GPU ('cuda' -> 'cuda:N').
    absent_ok: a device this machine lacks is no error (a dry run of a GPU job, from a laptop); it is
    resolved as that device with native bf16 and here=False, and nothing may touch it.
    Raises DeviceError."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if mps_available() else 'cpu'
    device_type = 'cuda' if device.startswith('cuda') else device
    here = {'cuda': torch.cuda.is_available, 'mps': mps_available}.get(device_type, lambda: True)()
    if not here and not absent_ok:
        raise DeviceError(f"device={device!r} but CUDA is not available: this torch sees no CUDA GPU (use "
                          f"--device=cpu)" if device_type == 'cuda' else
                          f"device={device!r} but MPS is not available (use --device=cpu)")
    if local_rank is not None and device_type == 'cuda':
        device = f'cuda:{local_rank}'
    if dtype == 'auto':
        dtype = 'bfloat16' if device_type == 'cuda' and not here else auto_dtype(device_type)
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise DeviceError(f"dtype={dtype!r} must be 'auto', 'float32', 'bfloat16' or 'float16'")
    if dtype == 'bfloat16' and device_type == 'cuda' and here and not bf16_supported():
        raise DeviceError("dtype='bfloat16' is not supported natively by this GPU (emulated bf16 is slow and "
                          "is not compiled); use 'float16' (or 'auto')")
    return device, device_type, dtype, here


def gpu_peak_flops(name, dtype):
    """Datasheet peak FLOP/s of the GPU called `name` for matmuls in `dtype` ('bfloat16', 'float16',
    'float32' = TF32, half the tensor-core rate), or None for a GPU not in the table."""
    words = set(name.replace('-', ' ').split())
    for key, peak in GPU_PEAK_BF16.items():
        if all(k in words for k in key):
            return peak if str(dtype).replace('torch.', '') in ('bfloat16', 'float16') else peak / 2
    return None


def peak_flops(device, dtype):
    """The peak MFU is measured against on `device`, or None where no datasheet number means
    anything (CPU, MPS, an unknown GPU): then no MFU is printed."""
    device = torch.device(device)
    if device.type != 'cuda':
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)


def keep_freed_memory():
    """CPU training: keep the memory a step frees in the process instead of giving it back to the OS.
    By default glibc serves big blocks with their own mmap (128 KiB at first, then up to the largest
    block freed) and hands the top of the heap back once more than twice that is free, so a step can
    free its activations and page-fault fresh zeroed pages for the next one. At nanoGPT's CPU recipe
    the dense model's step took 1,500 to 6,000 page faults and 3 to 10 ms of kernel time out of ~50 ms
    (none with this; the MoE's step had 330 to 950, under 2 ms: docs/performance.md 2b). Sets
    M_MMAP_THRESHOLD to glibc's maximum, 32 MiB (bigger tensors still get their own mmap: no
    fragmentation of the heap by them), and M_TRIM_THRESHOLD to 1 GiB. Returns False, changing
    nothing, where the C library is not glibc (macOS, musl)."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
