"""Run one of the repo's scripts on a CPU that poses as one CUDA GPU, an "NVIDIA H100", so that the
branches only a GPU takes (device selection, bf16 autocast, fused AdamW, pinned copies, CUDA RNG
state, the MFU table) run in the tests:

    python tests/fake_cuda.py train.py configs/5m.py --max_iters=2

torch.cuda says a GPU is there, and the calls that would reach the driver are stubbed. The checks
torch makes in Python before them stay real: torch.cuda.set_device("cuda") is refused as it is on
a GPU, for want of an index. Tensors asked for on "cuda" are made on the CPU (a TorchFunctionMode
rewrites the device of every torch call, in the main thread), pin_memory() returns its tensor in any
thread, and autocast for "cuda" is autocast for the CPU, in the same bfloat16. Calls are counted and written
at exit, as JSON, to the file named by the environment variable FAKE_CUDA_COUNTS, if set: pin_memory() in the
main thread ("pinned main") and in others ("pinned other"), and torch.compiler.cudagraph_mark_step_begin()
("cuda graph steps"). NCCL cannot be faked: DDP is not covered here.
"""

import atexit
import json
import os
import runpy
import sys
import threading

import torch
from torch.overrides import TorchFunctionMode

GPU_NAME = "NVIDIA H100 80GB HBM3"


def on_cpu(device):
    """A device argument with 'cuda' made 'cpu'; anything else as it was."""
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


class CudaOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.device:  # torch.device("cuda:0") itself stays what it is
            args = tuple(on_cpu(a) for a in args)
            kwargs = {k: on_cpu(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def install():
    """Make torch.cuda report one bf16-capable GPU whose memory is the CPU's."""
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch._C._cuda_setDevice = lambda index: None  # what torch.cuda.set_device calls once it has an index
    torch.cuda.is_bf16_supported = lambda including_emulation=True: True
    torch.cuda.get_device_name = lambda device=None: GPU_NAME
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": None
    torch.cuda.max_memory_allocated = lambda device=None: 3 * 2**29  # 1.5 GB
    torch.cuda.synchronize = lambda device=None: None
    torch._C._cuda_cudaCachingAllocator_is_enabled = lambda: True  # asked by compile's mode reduce-overhead (CUDA graphs)
    cpu_autocast = torch.autocast
    torch.autocast = lambda device_type, **kwargs: cpu_autocast(on_cpu(device_type), **kwargs)
    cpu_generator = torch.Generator

    class Generator(cpu_generator):  # a class, not a function: torch's own annotations write `torch.Generator | None`
        def __new__(cls, device="cpu"):
            return cpu_generator(device=on_cpu(device))

    torch.Generator = Generator
    counts = {"pinned main": 0, "pinned other": 0, "cuda graph steps": 0}

    def pin_memory(tensor, *args, **kwargs):
        counts["pinned main" if threading.current_thread() is threading.main_thread() else "pinned other"] += 1
        return tensor

    torch.Tensor.pin_memory = pin_memory
    mark_step_begin = torch.compiler.cudagraph_mark_step_begin

    def cudagraph_mark_step_begin():
        counts["cuda graph steps"] += 1
        mark_step_begin()

    torch.compiler.cudagraph_mark_step_begin = cudagraph_mark_step_begin
    if os.environ.get("FAKE_CUDA_COUNTS"):
        atexit.register(lambda: json.dump(counts, open(os.environ["FAKE_CUDA_COUNTS"], "w")))


if __name__ == "__main__":
    import fake_cuda  # this file as a module: torch.compile looks up the mode's globals by module name

    fake_cuda.install()
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    with fake_cuda.CudaOnCpu():
        runpy.run_path(script, run_name="__main__")
