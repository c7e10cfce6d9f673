"""The suite configs: each loads, and the context-length variants of the 5M model keep its shape and batch."""

import ast
import glob
import os

import pytest

from conftest import REPO
from configurator import read_config
from model import GPT, GPTConfig

CONTEXTS = (64, 128, 256, 1024, 2048)


def train_defaults():
    """train.py's settings and their defaults: its module-level `name = literal` lines, read without running it."""
    tree = ast.parse(open(os.path.join(REPO, "train.py")).read())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return defaults


def settings(name):
    """What `python train.py configs/<name>.py` runs with: train.py's defaults, then the config file."""
    return {**train_defaults(), **{k: v for k, v, _ in read_config(os.path.join(REPO, "configs", f"{name}.py"))}}


def parameters(s):
    keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp", "n_ctx", "d_vocab", "rope_base", "norm_eps")
    return GPT(GPTConfig(**{k: s[k] for k in keys})).num_params()


def test_every_config_loads_with_known_settings():
    defaults = train_defaults()
    paths = glob.glob(os.path.join(REPO, "configs", "*.py"))
    assert len(paths) >= 11
    for path in paths:
        for key, value, where in read_config(path):
            assert key in defaults and type(value) is type(defaults[key]), where


@pytest.mark.parametrize("n_ctx", CONTEXTS)
def test_context_variant_is_the_5m_model_with_another_context(n_ctx):
    base, variant = settings("5m"), settings(f"5m_ctx{n_ctx}")
    assert variant["n_ctx"] == n_ctx
    assert parameters(variant) == parameters(base) == 5_374_208
    assert variant["tokens_per_step"] == base["tokens_per_step"] == 32768
    assert variant["tokens_per_step"] % (n_ctx * 8) == 0  # one to eight devices
    # a micro-step holds as many tokens as the 5M model's: short contexts take more sequences
    assert variant["batch_size"] * n_ctx == base["batch_size"] * base["n_ctx"]
    assert variant["out_dir"] == f"out/5m_ctx{n_ctx}"
    same = {k for k in base if k not in ("n_ctx", "batch_size", "out_dir")}
    assert {k: variant[k] for k in same} == {k: base[k] for k in same}
