"""What the scripts share: settings (config files, --key=value flags and their checks), the device to run
on and its precision, and how they write files and end with an error.

A config file holds plain `name = value` lines (values are Python literals, read with ast, never run);
--key=value flags come after config files and override them. A script's settings are its globals with
their defaults, each with a trailing comment that --help prints:

    DEFAULTS = {"n_layers": 6, ...}
    given = configurator.parse(sys.argv[1:], DEFAULTS, __doc__, __file__)   # what the command line sets
    configurator.check({**DEFAULTS, **given}, CHECKS)          # the range of each setting
    device = configurator.pick_device("auto")                  # 'cuda:0' on a GPU machine, else 'cpu'

Every problem ends the script with one `error: ...` line (die) that names the setting and where it was
given; code meant to be imported (the Tokenizer, prepare.open_bins, model.py, ...) raises ValueError instead, which a
script's main turns into that line.
A file is written whole or not at all (atomic_write), so a crash never leaves a half-written one.
"""

import argparse
import ast
import math
import os
import re
import sys
from contextlib import contextmanager, nullcontext


def die(message):
    """End the script with one line naming the problem (and what to do), exit status 1."""
    sys.exit(f"error: {message}")


class Parser(argparse.ArgumentParser):
    """argparse for the scripts that take flags only, not config files (sample.py, evaluate.py, export.py, ...): a bad
    flag ends in one line, as every error here does; --help shows the script's docstring as written and each flag's
    default."""

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):  # a help that tells its default already is not given a second one
            return action.help if "default" in (action.help or "") else super()._get_help_string(action)

    def __init__(self, doc, script):
        super().__init__(prog=script, description=doc, formatter_class=self.Formatter, allow_abbrev=False)

    def error(self, message):
        die(f"{message}; `python {self.prog} --help` lists the flags")


def boolean(s):
    """A flag's True or False (also 1 or 0), for argparse's type=."""
    if s.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")
    return s.lower() in ("true", "1")


def run_folder(s):
    """A training run's folder (--out_dir), for argparse's type=: not a file given in its place, such as its ckpt.pt."""
    if os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"{s} is a file, not a folder; give the run's folder, the one that holds ckpt.pt")
    return s


@contextmanager
def atomic_write(path, mode="wb"):
    """A file to write path through: a temporary file beside it, flushed to disk and renamed over path when
    the block ends, removed if it fails. Readers see the old file or the new one, never a part."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_config(path):
    """[(key, value, where)] for each `name = value` line of a config file."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except OSError as e:
        die(f"cannot read config file {path}: {e.strerror}")
    except UnicodeDecodeError:
        die(f"config file {path} is not UTF-8 text; save it as UTF-8")
    except SyntaxError as e:
        die(f"{path} line {e.lineno}: not valid Python ({e.msg})")
    settings = []
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            die(f"{path} line {node.lineno}: a config file holds only `name = value` lines")
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, MemoryError, RecursionError):
            die(f"{path} line {node.lineno}: the value of {node.targets[0].id} must be a literal (a number, string or bool)")
        settings.append((node.targets[0].id, value, f"{path} line {node.lineno}"))
    return settings


def parse(argv, defaults, doc, script):
    """{key: value} of the settings that config files and --key=value flags in argv give, in order, later ones
    winning. Each key must be in defaults and each value of its default's type (an int is taken for a float).
    -h or --help prints the script's doc and its settings (help_text) and ends it; so does no argument at all,
    as an error: a run of nothing but defaults is rarely what was meant."""
    if "-h" in argv or "--help" in argv:
        print(help_text(doc, defaults, script))
        sys.exit(0)
    if not argv:
        name = os.path.basename(script)
        die(f"give a config file and/or --key=value settings, e.g. `python {name} configs/quickstart.py`; "
            f"`python {name} --help` lists the settings")
    settings = []
    for arg in argv:
        if not arg.startswith("--"):
            settings += read_config(arg)
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            die(f"flag {arg} has no value; write --{key}=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = text  # a bare word: --dataset=sample
        settings.append((key, value, arg))
    given = {}
    for key, value, where in settings:
        if key not in defaults:
            die(f"unknown setting {key!r} ({where}); --help lists the settings")
        expected = type(defaults[key])
        if expected is float and type(value) is int:
            value = float(value)
        if expected is str and type(value) is not str:
            value = where.partition("=")[2] if where.startswith("--") else value  # --out_dir=1 is the folder "1"
        if type(value) is not expected:
            die(f"setting {key} must be a {expected.__name__}, got {value!r} ({where})")
        given[key] = value
    return given


def resume(defaults, given, saved, fixed, source):
    """The settings of a resumed run: those saved with it in source, and over them the ones given now (config
    files and flags alike). A given setting that would change one of fixed ends the script; one that source
    does not hold (an imported model holds its shape only) is free."""
    settings = {**defaults, **{k: v for k, v in saved.items() if k in defaults}, **given}
    changed = [f"{k} ({saved[k]!r} -> {settings[k]!r})" for k in fixed if k in saved and saved[k] != settings[k]]
    if changed:
        die(f"{source} cannot go on with another {', '.join(changed)}: that changes its batches or its shape; "
            f"drop those settings or start a new out_dir")
    return settings


def check(settings, checks):
    """End with one line if a number is not finite or a setting is out of its range. checks is a list of
    (keys, test, what the test asks for), e.g. (("beta1", "beta2"), lambda v: 0 <= v < 1, "in [0, 1)")."""
    for key, value in settings.items():
        if type(value) is float and not math.isfinite(value):
            die(f"setting {key}={value} must be a finite number")
    for keys, test, wanted in checks:
        for key in keys:
            if not test(settings[key]):
                die(f"setting {key}={settings[key]!r} must be {wanted}")


def descriptions(path):
    """{name: comment} for each `name = value  # comment` line of a script: its settings, described (one line each)."""
    pattern = re.compile(r"^(\w+) = .*?  # (.*)$")
    with open(path, encoding="utf-8") as f:
        return {m.group(1): m.group(2) for m in map(pattern.match, f) if m}


def help_text(doc, defaults, path):
    """The script's docstring, then every setting with its default and its description."""
    about = descriptions(path)
    width = max(len(f"--{k}={v!r}") for k, v in defaults.items())
    lines = [f"  {f'--{k}={v!r}':{width}}  {about.get(k, '')}".rstrip() for k, v in defaults.items()]
    return f"{doc}\nsettings, their defaults and what they do:\n" + "\n".join(lines)


def pick_device(name, local_rank=None):
    """The device to run on, as a torch device string, for a --device setting: 'auto' (a GPU if torch sees
    one, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'. A GPU is made the current one, with its index:
    'cuda' is GPU 0, or GPU local_rank in a torchrun process."""
    import torch  # here, not at the top: the scripts that only read settings start faster

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        die(f"device={name!r} is not a device here; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            die(f"device={name!r} but torch sees no GPU; use --device=cpu, or install a CUDA build of torch")
        index = local_rank if local_rank is not None else device.index or 0
        if index >= torch.cuda.device_count():
            die(f"device=cuda:{index} but torch sees {torch.cuda.device_count()} GPU(s); use another --device")
        torch.cuda.set_device(index)  # takes an index: a bare 'cuda' is refused
        return f"cuda:{index}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        die(f"device={name!r} but torch sees no Apple GPU; use --device=cpu")
    return device.type


def bf16_is_fast(device_type):
    """Whether bfloat16 autocast speeds training up on this device: a GPU with native bf16 (Ampere and newer), or a
    CPU with bf16 instructions: AMX tiles (Intel Sapphire Rapids and newer) or AVX512_BF16 (AMD Zen 4 and newer, Intel
    Cooper Lake), whose bf16 matmuls run 2-4x as fast as float32. Elsewhere bf16 is emulated, about 10x slower."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return any(check is not None and check() for check in checks)
    return False


def autocast_for(device):
    """The precision the scripts that run a trained model (sample, evaluate, judge, activations, remove_norms) use:
    bf16 autocast on a GPU with native bf16, else float32 (on a CPU, even with AMX: casting the weights at every
    decode step ate the gain at batch 1, see BENCHMARKS.md)."""
    import torch

    if device.startswith("cuda") and bf16_is_fast("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# bf16 dense tensor-core FLOP/s from the vendors' datasheets, matched against the device name in order
PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12), ("GH200", 989e12),
    ("GB200", 2500e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
]


def gpu_peak_flops(device, dtype="bfloat16"):
    """The dense FLOP/s of the GPU device (for MFU), looked up by its name in PEAK_FLOPS (bf16); 0.0 if it is not there.
    dtype float32 runs its matmuls in TF32, at half the bf16 rate on every GPU of the table."""
    import torch

    name = torch.cuda.get_device_name(device)
    flops = next((flops for key, flops in PEAK_FLOPS if key in name), 0.0)
    return flops / 2 if dtype == "float32" else flops


def folder_problem(path):
    """Why the folder path could not be made or written into, or None; checked before long work, without
    making anything (the folder is made when the first file goes in)."""
    if not path:
        return "the name is empty"
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is read-only"
    return None
