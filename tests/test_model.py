"""model.py against its contracts: exact suite sizes, causality, RoPE's formula, the KV cache, Llama."""

import copy
import dataclasses
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from configurator import read_config
from conftest import REPO
from model import GPT, GPTConfig, Muon, apply_rope, decode_attention, rope_cos_sin

MODEL_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp", "n_ctx", "d_vocab", "rope_base", "norm_eps")
SUITE = {"1.25m": 1_245_824, "5m": 5_374_208, "11m": 11_015_040, "30m": 29_627_904, "35m": 35_133_952}


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"n_layers": 2, "d_model": 64, "n_heads": 4, "n_ctx": 64, "d_vocab": 97, **overrides})).eval()


@pytest.mark.parametrize("name", SUITE)
def test_suite_parameter_counts(name):
    settings = {key: value for key, value, _ in read_config(os.path.join(REPO, "configs", f"{name}.py"))}
    model = GPT(GPTConfig(**{k: settings[k] for k in MODEL_KEYS if k in settings}))
    assert model.num_params() == SUITE[name]
    assert model.lm_head.weight is model.embed.weight
    assert model.config.n_ctx == 512 and model.config.d_vocab == 4096 and model.config.n_kv_heads == 2


def test_causality():
    model = small_model()
    idx = torch.randint(0, 97, (2, 40))
    changed = idx.clone()
    changed[:, 25] = (changed[:, 25] + 1) % 97
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :25], b[:, :25], rtol=0, atol=0)
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_rope_matches_formula():
    head_dim, base, n = 8, 10000.0, 20
    cos, sin = rope_cos_sin(n, head_dim, base)
    x = torch.randn(1, 1, n, head_dim, dtype=torch.float64)
    y = apply_rope(x, cos.double(), sin.double())
    half = head_dim // 2
    for t in range(n):
        for i in range(half):
            angle = t * base ** (-2 * i / head_dim)
            a, b = x[0, 0, t, i].item(), x[0, 0, t, i + half].item()
            assert y[0, 0, t, i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-6)
            assert y[0, 0, t, i + half].item() == pytest.approx(b * math.cos(angle) + a * math.sin(angle), abs=1e-6)


def test_rope_scores_depend_only_on_distance():
    cos, sin = rope_cos_sin(64, 16, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        qm = apply_rope(q.expand(1, 1, 64, 16), cos, sin)[0, 0, m]
        kn = apply_rope(k.expand(1, 1, 64, 16), cos, sin)[0, 0, n]
        return (qm @ kn).item()

    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-4)


def test_kv_cache_logits_match_full_forward():
    from model import KVCache

    model = small_model()
    idx = torch.randint(0, 97, (3, 30))
    full = model(idx)[0]
    cache = KVCache(model.config, 3, torch.float32, "cpu")
    parts = [model(idx[:, :12], cache=cache)[0], model(idx[:, 12:20], cache=cache)[0]]
    parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


def test_kv_cache_generation_equals_recompute():
    model = small_model(seed=1)
    idx = torch.randint(0, 97, (2, 5))
    cached = model.generate(idx, 50, temperature=0)
    naive = model.generate(idx, 50, temperature=0, use_cache=False)
    assert cached.shape == (2, 55)
    assert torch.equal(cached, naive)


def test_sampling_with_cache_equals_recompute_for_the_same_seed():
    model = small_model(seed=2)
    idx = torch.zeros(4, 1, dtype=torch.long)
    a = model.generate(idx, 30, temperature=0.9, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(idx, 30, temperature=0.9, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(a, b)


def test_generation_stops_at_eos_and_pads():
    model = small_model(seed=3)
    idx = torch.tensor([[5], [7]])

    def sample(eos_id=None):
        return model.generate(idx, 20, temperature=1.0, eos_id=eos_id, generator=torch.Generator().manual_seed(0))

    free = sample()
    row0 = free[0].tolist()
    # declare end of story the first generated token of row 0 that had not appeared before
    j = next(j for j in range(2, 21) if row0[j] not in row0[:j])
    eos = row0[j]
    out = sample(eos)
    assert out[0, :j + 1].tolist() == row0[:j + 1] and set(out[0, j + 1:].tolist()) <= {eos}
    row1 = free[1].tolist()
    end = row1.index(eos) if eos in row1[1:] else len(row1) - 1
    assert out[1, :end + 1].tolist() == row1[:end + 1]  # the other row is untouched until its own end


def naive_greedy(model, idx, n):
    """The reference generate stands for: the whole sequence through the model at every step, argmax of the last logits."""
    for _ in range(n):
        idx = torch.cat((idx, model(idx)[0][:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


def test_generation_equals_naive_greedy_and_batch_rows_equal_single_rows():
    from model import ATTEND_BUCKET

    model = small_model(seed=4, n_ctx=2 * ATTEND_BUCKET)  # the steps cross from one attended length to the next
    idx = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(0))
    out = model.generate(idx, ATTEND_BUCKET + 20, temperature=0)
    assert torch.equal(out, naive_greedy(model, idx, ATTEND_BUCKET + 20))
    for row in range(3):
        assert torch.equal(model.generate(idx[row:row + 1], ATTEND_BUCKET + 20, temperature=0), out[row:row + 1])


def test_generation_ends_where_the_last_row_finished():
    from model import FINISHED_EVERY

    model = small_model(seed=5, d_vocab=8)  # 8 tokens: every row meets the end-of-story token within a few steps
    idx = torch.tensor([[1], [2], [3]])
    free = model.generate(idx, 60, temperature=1.0, generator=torch.Generator().manual_seed(0))[:, 1:].tolist()
    # the end-of-story token that every row meets, the last row latest but before the first check for finished rows
    ends = {eos: max(row.index(eos) for row in free) for eos in range(8) if all(eos in row for row in free)}
    eos, last = max(((e, j) for e, j in ends.items() if 0 < j < FINISHED_EVERY - 1), key=lambda item: item[1])
    out = model.generate(idx, 60, temperature=1.0, eos_id=eos, generator=torch.Generator().manual_seed(0))
    assert out.size(1) == 1 + last + 1  # trimmed to the step the last row finished at, not to the next check
    for row, tokens in zip(out[:, 1:].tolist(), free):
        end = tokens.index(eos)
        assert row[:end + 1] == tokens[:end + 1] and set(row[end:]) == {eos}  # then padded with eos
    reference = model.generate(idx, 60, temperature=1.0, eos_id=eos, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(out, reference)


@pytest.mark.slow
def test_compiled_generation_equals_eager():
    # torch.compile on the CPU: C++ kernels compiled the first time (~20-60 s on two cores), from inductor's cache after
    model = small_model(seed=6, n_layers=1)
    idx = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(idx, 12, temperature=0, compile=True), model.generate(idx, 12, temperature=0))
    sampled = [model.generate(idx, 12, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(3), compile=c)
               for c in (True, False)]
    assert torch.equal(*sampled)
    # the compiled calls share one cache (a CUDA graph re-records when a static input moves); the positions an
    # earlier call filled past the new prompt are never read
    cache = model._static_caches[(2, torch.float32, idx.device)]
    shorter = torch.randint(0, 97, (2, 3), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.generate(shorter, 5, temperature=0, compile=True), model.generate(shorter, 5, temperature=0))
    assert list(model._static_caches) == [(2, torch.float32, idx.device)] and model._static_caches[(2, torch.float32, idx.device)] is cache
    assert "_static_caches" not in str(model.state_dict().keys())


@pytest.mark.slow
def test_compiled_decode_step_on_cpu_fuses_its_products():
    # compiled on a CPU, a decode step of up to FEW_ROWS rows makes no matmul: its linears and attention are
    # inductor's fused reductions; with more rows the linears stay matmuls. The logits are eager decode_step's.
    from torch.profiler import profile

    from model import FEW_ROWS, KVCache

    model = small_model(seed=7, n_layers=1)
    step = model._compiled_decode_step(torch.device("cpu"))
    with torch.inference_mode():
        for rows, matmuls in ((FEW_ROWS, set()), (2 * FEW_ROWS, {"aten::mm"})):
            token = torch.randint(0, 97, (rows, 1), generator=torch.Generator().manual_seed(rows))
            compiled_cache, eager_cache = model._static_cache(rows, torch.float32, token.device), KVCache(model.config, rows, torch.float32, token.device)
            compiled_cache.length = eager_cache.length = 16
            step(token, compiled_cache)  # compiles
            compiled_cache.pos.zero_()
            with profile() as prof:
                logits = step(token, compiled_cache)
            called = {event.key for event in prof.key_averages()} & {"aten::mm", "aten::bmm", "aten::addmm", "aten::matmul"}
            assert called == matmuls, (rows, called)
            torch.testing.assert_close(logits, model.decode_step(token, eager_cache), rtol=1e-5, atol=1e-5)


def test_top_k_and_top_p_filter():
    from model import sample_next

    logits = torch.tensor([[5.0, 4.0, 3.0, -2.0, -3.0]]).repeat(500, 1)
    picks = sample_next(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1}
    picks = sample_next(logits, 1.0, 0, 0.5, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0}  # token 0 alone holds ~0.66 of the mass
    assert sample_next(logits[:1], 0, 0, 1.0).item() == 0
    # top_p 0 keeps the most likely token only (it used to drop every token and sample from NaN)
    flat = torch.tensor([[1.0, 2.0, 3.0, 0.0]]).repeat(100, 1)
    assert set(sample_next(flat, 1.0, 0, 0.0, torch.Generator().manual_seed(0)).tolist()) == {2}


def test_sampling_follows_the_tempered_and_filtered_distribution():
    from model import sample_next

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 20_000
    for temperature, top_k, top_p in [(0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 2, 1.0), (1.5, 0, 0.8)]:
        expected = (logits / temperature).softmax(-1)
        if top_k:
            expected[top_k:] = 0
        if top_p < 1:  # keep a token while the tokens above it hold less than top_p of the mass
            expected[(expected.cumsum(-1) - expected) >= top_p] = 0
        expected /= expected.sum()
        picks = sample_next(logits.repeat(n, 1), temperature, top_k, top_p, torch.Generator().manual_seed(0))
        observed = torch.bincount(picks, minlength=4) / n
        assert (observed - expected).abs().max() < 0.015, (temperature, top_k, top_p, observed, expected)


def test_repeated_key_value_heads_equal_sdpa_reading_them_in_place(monkeypatch):
    """A GPU in float32 repeats each key/value head for its group of query heads: the same attention."""
    import model as model_module

    model = small_model(seed=1)
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, story = model(idx)[0], model.generate(idx[:, :6], 12, temperature=0)
    monkeypatch.setattr(model_module, "sdpa_reads_gqa", lambda q: False)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(idx[:, :6], 12, temperature=0), story)


def test_initial_weights_follow_gpt2():
    """std 0.02, and 0.02 / sqrt(2 n_layers) for the projections that write to the residual stream."""
    model = GPT(GPTConfig(n_layers=6, d_model=256, n_heads=4))
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            std = 0.02 / math.sqrt(12) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            assert abs(p.std().item() / std - 1) < 0.05, name


def test_model_defaults_are_train_defaults():
    from test_configs import train_defaults

    defaults = train_defaults()
    assert GPTConfig() == GPTConfig(**{f.name: defaults[f.name] for f in dataclasses.fields(GPTConfig)})


def test_loss_with_no_target_counted_is_zero_with_or_without_gradients():
    model = small_model()
    idx, ignored = torch.zeros(2, 8, dtype=torch.long), torch.full((2, 8), -1)
    assert model(idx, ignored)[1].item() == 0.0
    with torch.no_grad():
        assert model(idx, ignored)[1].item() == 0.0


def test_context_limit():
    model = small_model()
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.zeros(1, 65, dtype=torch.long))
    assert model.generate(torch.zeros(1, 60, dtype=torch.long), 100, temperature=0).size(1) == 64


@pytest.mark.parametrize("overrides, message", [({"n_heads": 5}, "does not divide d_model"),
                                                 ({"n_heads": 4, "n_kv_heads": 3}, "does not divide n_heads"),
                                                 ({"d_model": 36, "n_heads": 4}, "odd")])
def test_bad_shapes_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{"d_model": 64, **overrides})


def test_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    model = small_model(seed=4, d_vocab=300, rope_base=500.0, norm_eps=1e-3)  # not the defaults: each is passed on
    c = model.config
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.d_vocab, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.n_ctx,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, tie_word_embeddings=True)).eval()
    names = {"embed.": "model.embed_tokens.", "blocks.": "model.layers.", ".attn_norm.": ".input_layernorm.",
             ".attn.": ".self_attn.", ".mlp_norm.": ".post_attention_layernorm."}
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in names.items():
            key = key.replace(ours, theirs)
        state["model.norm.weight" if key == "norm.weight" else key] = value
    result = llama.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys  # tied: lm_head is embed_tokens
    idx = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], llama(idx).logits, rtol=1e-5, atol=1e-5)


def test_training_loss_and_gradients_equal_plain_cross_entropy():
    # with gradients on, forward(idx, targets) takes the fused, chunked lm_head + cross-entropy: the same loss and
    # gradients as cross-entropy over the whole logits, rows of -1 not scored, over several chunks
    model = small_model(seed=5, d_vocab=40000)  # 2**22 // 40000 = 104 rows a chunk on a CPU: the 256 below make 3
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)  # norm weights away from 1, so a wrong gradient shows
    idx, targets = torch.randint(0, 40000, (4, 64)), torch.randint(0, 40000, (4, 64))
    targets[1, 10:] = -1
    targets[3] = -1
    for autocast in (False, True):  # bf16 autocast on CPU stands for the GPU's
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = model(idx, targets)
            assert logits is None
            loss.backward()
            fused = {name: p.grad for name, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            logits, _ = model(idx)
            reference = torch.nn.functional.cross_entropy(logits.float().view(-1, 40000), targets.view(-1), ignore_index=-1)
            reference.backward()
        tol = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(loss, reference, **tol)
        if not autocast:
            float32_loss = loss.item()
        for name, p in model.named_parameters():
            torch.testing.assert_close(fused[name], p.grad, **tol, msg=name)
        model.zero_grad(set_to_none=True)
    with torch.no_grad():  # without gradients: the logits and the same loss
        logits, loss = model(idx, targets)
    assert logits.shape == (4, 64, 40000) and loss.item() == pytest.approx(float32_loss, rel=1e-5)
    none_scored = model(idx, torch.full_like(targets, -1))[1]
    none_scored.backward()
    assert none_scored.item() == 0 and all(p.grad.abs().max() == 0 for p in model.parameters())


def trained_optimizer_state(fused):
    """The state_dict of an optimizer after one step, as a checkpoint holds it."""
    model = small_model()
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), fused=fused)
    model(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16)))[1].backward()
    optimizer.step()
    return optimizer.state_dict()


def test_resumed_optimizer_state_lies_where_its_kernel_needs_it(monkeypatch):
    # the "meta" device stands for a GPU: parameters that are not where the checkpoint's tensors were saved
    optimizer_module = sys.modules[torch.optim.Optimizer.__module__]  # torch.optim hides its submodules' names
    monkeypatch.setattr(optimizer_module, "_get_fused_kernels_supported_devices", lambda: ["cpu", "cuda", "meta"])
    for saved_fused, fused, device in ((False, True, "meta"), (True, False, "cpu"), (False, False, "cpu")):
        with torch.device(device):  # built there: moving a module to meta would untie its embedding
            model = small_model()
        optimizer = model.configure_optimizer(2e-3, 0.3, (0.8, 0.9), fused=fused, state=trained_optimizer_state(saved_fused))
        decay, no_decay = optimizer.param_groups
        assert decay["fused"] is fused and decay["betas"] == (0.8, 0.9) and decay["weight_decay"] == 0.3
        assert no_decay["weight_decay"] == 0.0 and len(optimizer.state) == len(list(model.parameters()))
        for p, state in optimizer.state.items():
            assert state["exp_avg"].device == state["exp_avg_sq"].device == p.device
            # the fused kernel reads `step` beside the parameters; the others want it on the host
            assert state["step"].device == (p.device if fused else torch.device("cpu"))
            assert state["step"].is_meta or state["step"].item() == 1


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = small_model()
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), fused=False, optimizer="muon", muon_lr=2e-3)
    hidden, decay, no_decay = optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}  # the tied lm_head is the embedding, named once
    grouped = [names[id(p)] for group in (hidden, decay, no_decay) for p in group["params"]]
    assert sorted(grouped) == sorted(names.values())  # every parameter in exactly one group
    assert {names[id(p)] for p in hidden["params"]} == {n for n in names.values() if n.endswith("_proj.weight")}
    assert [names[id(p)] for p in decay["params"]] == ["embed.weight"]
    assert all(n.endswith("norm.weight") for n in (names[id(p)] for p in no_decay["params"]))
    assert isinstance(optimizer.muon, Muon) and optimizer.muon.param_groups[0] is hidden
    assert (hidden["peak_lr"], decay["peak_lr"], no_decay["peak_lr"]) == (2e-3, 1e-3, 1e-3)
    assert hidden["weight_decay"] == decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    default = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), fused=False, optimizer="muon")
    assert default.param_groups[0]["peak_lr"] == 1e-3  # muon_lr 0: learning_rate


def muon_steps(model, optimizer, batches):
    for x, y in batches:
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_muon_lowers_the_loss_and_its_state_resumes_exactly():
    torch.manual_seed(1)
    data = torch.randint(0, 97, (8, 2, 17))
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    settings = dict(learning_rate=3e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=False, optimizer="muon", muon_momentum=0.9)
    straight = small_model().train()
    optimizer = straight.configure_optimizer(**settings)
    before = straight(*batches[0])[1].item()
    muon_steps(straight, optimizer, batches[:4] * 5)
    assert straight(*batches[0])[1].item() < before - 1.0
    # 2 steps, the state saved and loaded into a new model and optimizer, 2 more: as 4 straight steps
    a, b = small_model().train(), small_model().train()
    muon_steps(a, a.configure_optimizer(**settings), batches[:4])
    muon_steps(b, opt_b := b.configure_optimizer(**settings), batches[:2])
    resumed = small_model().train()
    resumed.load_state_dict(b.state_dict())
    opt_r = resumed.configure_optimizer(**settings, state=opt_b.state_dict())
    assert len(opt_r.muon.state) == 14 and len(opt_r.adamw.state) == 6  # 7 matrices a layer; embedding, 5 norms
    muon_steps(resumed, opt_r, batches[2:4])
    for (name, p), q in zip(a.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def muon_reference(params, grads, bufs, lr, weight_decay, momentum):
    """Muon as written out, one matrix at a time in float64: Nesterov momentum, 5 Newton-Schulz iterations on the
    wide orientation, decoupled weight decay, a step scaled by 0.2 * sqrt(max(rows, cols))."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for p, g, buf in zip(params, grads, bufs):
        buf.mul_(momentum).add_(g, alpha=1 - momentum)
        x = (momentum * buf + (1 - momentum) * g).double()
        x = x.T if x.size(0) > x.size(1) else x
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if p.size(0) > p.size(1) else x
        p.mul_(1 - lr * weight_decay).sub_(lr * 0.2 * math.sqrt(max(p.shape)) * x.float())


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is in torch 2.9 and newer")
def test_muon_is_torch_muon_batched_and_its_float32_is_the_formula():
    # the 2-layer model's hidden matrices: 4 shapes (q and o, k and v, gate and up, down), 2 or 4 of each
    model = small_model()
    hidden = [p.detach() for block in model.blocks for p in block.parameters() if p.dim() == 2]
    runs = {name: [p.clone() for p in hidden] for name in ("torch", "bf16", "float32", "reference")}
    settings = dict(lr=1e-2, weight_decay=0.1, momentum=0.9)
    optimizers = {"torch": torch.optim.Muon(runs["torch"], adjust_lr_fn="match_rms_adamw", **settings),
                  "bf16": Muon(runs["bf16"], **settings), "float32": Muon(runs["float32"], ns_dtype=torch.float32, **settings)}
    bufs = [torch.zeros_like(p) for p in hidden]
    for step in range(4):
        grads = [torch.randn_like(p) for p in hidden]
        for name, params in runs.items():
            for p, g in zip(params, grads):
                p.grad = g.clone()
        for optimizer in optimizers.values():
            optimizer.step()
        muon_reference(runs["reference"], grads, bufs, **settings)
        moved = max((p - q).abs().max() for p, q in zip(runs["reference"], hidden))
        assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(runs["torch"], runs["bf16"]))  # batched, as torch
        assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(runs["reference"], runs["float32"]))
        bf16_error = max((p - q).abs().max() for p, q in zip(runs["reference"], runs["bf16"]))
        assert 1e-5 < bf16_error < 0.1 * moved  # bf16 iterations: near the formula, not on it
    # torch's state_dict goes on in ours: a step each, from the same momentum
    again = Muon([p.clone() for p in runs["torch"]], **settings)
    again.load_state_dict(copy.deepcopy(optimizers["torch"].state_dict()))  # as from a checkpoint: its own tensors
    for p, q in zip(again.param_groups[0]["params"], runs["torch"]):
        p.grad = q.grad = torch.randn_like(p)
    again.step()
    optimizers["torch"].step()
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(again.param_groups[0]["params"], runs["torch"]))


def test_d_mlp_multiple_rounds_the_default_width_up():
    assert GPTConfig(d_model=256).d_mlp == 682 and GPTConfig(d_model=256, d_mlp_multiple=64).d_mlp == 704
    assert GPTConfig(d_model=512, d_mlp_multiple=64).d_mlp == 1365 + 43  # 1,408 = 22 x 64
    assert GPTConfig(d_model=384, d_mlp_multiple=64).d_mlp == 1024  # already a multiple: unchanged
    assert GPTConfig(d_model=256, d_mlp=300, d_mlp_multiple=64).d_mlp == 300  # a width given is kept
    with pytest.raises(ValueError, match="d_mlp_multiple=0"):
        GPTConfig(d_mlp_multiple=0)


def test_decode_attention_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    mask = torch.arange(40)[None, :] <= 27  # the cache holds 28 positions, 40 read
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)


def test_compiled_decode_step_uses_cuda_graphs_on_a_gpu(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(kwargs) or fn)
    model = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, n_ctx=64, d_vocab=64))
    assert model._compiled_decode_step(torch.device("cuda")) == model.decode_step
    assert model._compiled_decode_step(torch.device("cuda")) == model.decode_step  # kept: compiled once
    assert compiled == [{"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}]
    model._compiled_decode_step(torch.device("cpu"))  # no CUDA graphs on a CPU
    assert compiled[-1]["mode"] is None and torch._dynamo.config.recompile_limit >= 64
