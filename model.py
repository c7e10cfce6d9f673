"""The SimpleStories model: a small Llama-style GPT in one file, importing nothing from this repo.

RoPE (real cos/sin, rotate-half layout as in Llama), RMSNorm (or none: norm='none', FixedNorm), SwiGLU MLP, grouped-query attention
through F.scaled_dot_product_attention, no biases, input and output embedding tied.
Field names follow TransformerLens (n_layers, d_model, n_heads, ...), module names follow Llama
(q_proj, gate_proj, ...), so the weights map one to one onto transformers' LlamaForCausalLM.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layers=6, d_model=256, n_heads=4))
    logits, _ = model(idx)                # (B, T, d_vocab)
    _, loss = model(idx, targets)         # training: the loss without materialising the logits
    out = model.generate(idx, max_new_tokens=256, temperature=0.8, top_k=50, eos_id=2)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    n_layers: int = 6
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 0  # 0: int(8 * d_model / 3), the SwiGLU width that keeps the MLP at ~8 d_model^2, rounded up to d_mlp_multiple
    n_ctx: int = 512
    d_vocab: int = 4096
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    norm: str = "rms"  # 'rms': RMSNorm; 'none': no normalization, each norm a FixedNorm (a frozen scale, see below)
    d_mlp_multiple: int = 1  # the default d_mlp rounded up to a multiple of this (64: whole tile widths for tensor cores); 1: the suite's exact shapes

    def __post_init__(self):
        if self.norm not in ("rms", "none"):
            raise ValueError(f"norm={self.norm!r} must be 'rms' (RMSNorm) or 'none' (a fixed scale per norm, FixedNorm)")
        if self.d_mlp_multiple < 1:
            raise ValueError(f"d_mlp_multiple={self.d_mlp_multiple} must be a positive integer")
        if self.d_mlp == 0:
            self.d_mlp = -(-int(8 * self.d_model / 3) // self.d_mlp_multiple) * self.d_mlp_multiple
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp", "n_ctx", "d_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}; pick n_heads so that d_model / n_heads is a whole number")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; grouped-query attention needs n_heads to be a multiple of n_kv_heads")
        if self.head_dim % 2:
            raise ValueError(f"head size d_model / n_heads = {self.head_dim} is odd; RoPE rotates pairs of dimensions, so it must be even")

    @property
    def head_dim(self):
        return self.d_model // self.n_heads


def rope_cos_sin(n_ctx, head_dim, base):
    """cos and sin tables of shape (n_ctx, head_dim): angle(t, i) = t * base^(-2i / head_dim), i < head_dim / 2, repeated for both halves."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(n_ctx, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x[i], x[i + head_dim/2]) pair of x (B, H, T, head_dim) by the angle for its position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class RMSNorm(nn.Module):
    """nn.RMSNorm's result, computed in float32 whatever the input's dtype, as Llama's is. nn.RMSNorm itself,
    given bf16 activations (autocast) and its float32 weight, leaves its fused kernel, warning at every call."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32 (as Llama does) so bf16 activations do not lose the scale
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


class FixedNorm(nn.Module):
    """The norm of a model without normalization: x * weight / scale, with scale a fixed number, not the RMS of x.
    A linear map, so the residual stream's contributions add up exactly at every layer. scale is a buffer, saved
    with the weights but never trained: remove_norms.py sets it to the mean RMS the RMSNorm it replaces saw on data
    (so the model computes what it did for a token of average RMS); a model trained with norm='none' from scratch
    keeps INIT_SCALE. Computed in float32 as RMSNorm is."""

    def __init__(self, dim, scale):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x):
        return (x.float() * (self.weight.float() / self.scale)).type_as(x)


INIT_SCALE = 0.02  # a FixedNorm's scale in a new model: the residual stream's RMS at init (the embedding's std). With 1.0
# the norms pass the residual on 50 times too small, and the quickstart model (lr 1e-3) was still at 6.2 nats of train loss
# after 160 steps; with 0.02 it starts as the RMSNorm model does, and was at 5.1 after 60 (BENCHMARKS.md)


def make_norm(config):
    """The norm a block (or the final layer) has under config.norm."""
    return RMSNorm(config.d_model, config.norm_eps) if config.norm == "rms" else FixedNorm(config.d_model, INIT_SCALE)


def compiled_on_cpu(x):
    """Whether x is on a CPU inside torch.compile, where a multiply-and-sum becomes one fused reduction instead of a
    temporary as large as the weight or cache it reads."""
    return torch.compiler.is_compiling() and x.device.type == "cpu"


FEW_ROWS = 8  # measured on the Zen 4 CPU, the 5M's 43 products of a step: 4.8x as fast at 1 row, 2.0x at 8, 1.26x at 16, 0.93x at 32


class Linear(nn.Linear):
    """nn.Linear without a bias. Inside torch.compile on a CPU, a product of at most FEW_ROWS rows (the decode step of
    up to FEW_ROWS stories) is a multiply-and-sum, which inductor fuses into one pass over the weight: MKL's
    matrix-vector product read weights that were no longer in cache at 9 GB/s on an AMD EPYC (Zen 4), the fused
    reductions at 36 GB/s, and the 5M model's compiled decoding at batch 1 ran 3.3-4.3x as fast (BENCHMARKS.md).
    Elsewhere (eager, a GPU, training, more rows) it is F.linear."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        few_rows = x.numel() <= FEW_ROWS * x.size(-1)
        if compiled_on_cpu(x) and few_rows and x.dtype == self.weight.dtype and not torch.is_grad_enabled():
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight)


class KVCache:
    """Keys and values of every layer for all n_ctx positions, allocated once and written in place, so that a
    decode step has the same shapes at every position (what torch.compile and CUDA graphs need). pos: a
    one-element tensor, the number of positions already stored; forward moves it on."""

    def __init__(self, config, batch_size, dtype, device):
        # one tensor a layer: a write into a slice of one big tensor is compiled as a copy of all of it
        shape = (batch_size, config.n_kv_heads, config.n_ctx, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.length = config.n_ctx  # the positions attention reads: generate keeps it a bucket above those filled

    def update(self, layer, k, v, positions):
        """Store k, v (B, n_kv_heads, T, head_dim) at positions (T,); return the layer's keys and values at the first
        self.length positions (the attention masks out those not written yet)."""
        self.k[layer][:, :, positions] = k
        self.v[layer][:, :, positions] = v
        return self.k[layer][:, :, :self.length], self.v[layer][:, :, :self.length]


def decode_attention(q, k, v, mask):
    """Attention of one query position, q (B, n_heads, 1, head_dim), over the cache's k, v (B, n_kv_heads, L,
    head_dim) where mask (1, L) is True: what scaled_dot_product_attention computes, as two products and a softmax
    with each group of query heads reading its key/value head in place. For a single query SDPA's CPU flash kernel
    spends most of its time on set-up: this took a compiled batch-32 decode step of the 5M model on a CPU from 4.5 to
    4.0 ms. Compiled on a CPU the products are multiplies-and-sums, which inductor fuses into reductions over the
    cache, 1.3x as fast as the batched matmuls at batch 32 on a Zen 4 CPU (BENCHMARKS.md)."""
    B, n_heads, _, head_dim = q.shape
    n_kv_heads = k.size(1)
    q = q.view(B, n_kv_heads, n_heads // n_kv_heads, head_dim)
    fused = compiled_on_cpu(q)
    scores = (q.unsqueeze(3) * k.unsqueeze(2)).sum(-1) if fused else q @ k.transpose(-1, -2)  # (B, n_kv_heads, group, L)
    weights = (scores * head_dim ** -0.5).masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    y = (weights.unsqueeze(-1) * v.unsqueeze(2)).sum(-2) if fused else weights @ v
    return y.view(B, n_heads, 1, head_dim)


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = Linear(config.d_model, config.n_heads * config.head_dim)
        self.k_proj = Linear(config.d_model, config.n_kv_heads * config.head_dim)
        self.v_proj = Linear(config.d_model, config.n_kv_heads * config.head_dim)
        self.o_proj = Linear(config.n_heads * config.head_dim, config.d_model)

    def forward(self, x, cos, sin, cache=None, positions=None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, positions)
        gqa = sdpa_reads_gqa(q)
        if not gqa:
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif T == 1 and gqa:  # one new token: plain matmuls, which a CPU runs (and inductor fuses) faster than SDPA's
            y = decode_attention(q, k, v, mask)
        else:  # the cache's first cache.length positions, masked to those at or before each token's own
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def sdpa_reads_gqa(q):
    """Whether SDPA reads the shared key/value heads in place (enable_gqa), or they are repeated first.

    Each group of n_heads / n_kv_heads query heads shares one key/value head. SDPA's enable_gqa reads them
    in place, but only its flash kernels (on CPU, and on CUDA in 16-bit) honour it; for float32 on a GPU
    the heads are repeated, which keeps the memory-efficient kernel."""
    return q.device.type == "cpu" or q.dtype != torch.float32


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.d_model, config.d_mlp)
        self.up_proj = Linear(config.d_model, config.d_mlp)
        self.down_proj = Linear(config.d_mlp, config.d_model)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = h @ weight.T against targets (-1: not scored; none scored: 0), with its
    gradients, computed a chunk of rows at a time: the (N, d_vocab) float32 logits, their log-softmax and its backward never exist whole.
    The gradients are made in the forward pass, where the softmax is at hand (as Liger's fused linear
    cross-entropy does): the same three matmuls as lm_head's forward and backward, one softmax instead of a
    log-softmax and its backward, and 16 MB of logits at a time instead of 64 MB for 4,096 tokens."""

    @staticmethod
    def forward(ctx, h, weight, targets):
        # rows per chunk, with d_vocab 4096: on a CPU 1,024 (16 MB of float32 logits, mostly still in cache when
        # the softmax and the gradient matmuls read them again), on a GPU 8,192 (matmuls large enough to fill it)
        chunk = (2**22 if h.device.type == "cpu" else 2**25) // weight.size(0)
        grad_h, grad_weight = torch.empty_like(h), torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.size(0), chunk):
            hc, tc = h[i:i + chunk], targets[i:i + chunk]
            logits = (hc @ weight.t()).float()  # under autocast the matmul runs in bf16, the softmax in float32
            scored = (tc != -1)[:, None]
            tc = tc.clamp(min=0)[:, None]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += ((lse - logits.gather(1, tc)) * scored).sum()
            # d(loss)/d(logits) = softmax - one_hot(target), zero on rows not scored; the mean's 1/n comes in backward
            grad = (logits - lse).exp_().scatter_add_(1, tc, -scored.float()).mul_(scored)
            grad_h[i:i + chunk] = grad.to(weight.dtype) @ weight
            grad_weight += grad.t().to(hc.dtype) @ hc
        n = (targets != -1).sum().clamp(min=1)
        ctx.save_for_backward(grad_h, grad_weight, n)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight, n = ctx.saved_tensors
        scale = grad_loss / n
        return grad_h * scale.to(grad_h.dtype), (grad_weight * scale).to(ctx.weight_dtype), None


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, positions=None, mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, positions, mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.d_vocab, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.d_model, config.d_vocab)
        self.lm_head.weight = self.embed.weight  # tied: one matrix, counted once
        cos, sin = rope_cos_sin(config.n_ctx, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # residual projections scaled by 1/sqrt(2 n_layers) so the residual stream's variance does
        # not grow with depth (GPT-2 paper, section 2.3)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, d_vocab) and, with targets (B, T; -1 ignored), the mean cross-entropy.
        With targets and gradients on (training), the logits are None: LinearCrossEntropy never makes them whole.
        With a KVCache, idx continues the positions stored in it (the caller keeps them within n_ctx)."""
        B, T = idx.shape
        x = self.hidden_states(idx, cache)
        if targets is not None and torch.is_grad_enabled():  # training: the loss without the (B, T, d_vocab) logits
            return None, LinearCrossEntropy.apply(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # the sum over the counted targets, as LinearCrossEntropy does: 0, not NaN, when none is counted
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction="sum") / (targets != -1).sum().clamp(min=1)
        return logits, loss

    def hidden_states(self, idx, cache=None):
        """The final-normed residual stream (B, T, d_model) of idx (B, T), continuing the positions in cache if any."""
        T = idx.size(1)
        positions = mask = None
        if cache is None:
            if T > self.config.n_ctx:
                raise ValueError(f"sequence of {T} tokens is longer than the context n_ctx={self.config.n_ctx}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:  # positions as a tensor, not a Python number: one compiled decode step serves every position
            positions = cache.pos + torch.arange(T, device=idx.device)
            mask = torch.arange(cache.length, device=idx.device) <= positions[:, None]
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, cache, positions, mask)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter plus attention's 12 * n_layers * d_model * n_ctx (PaLM paper, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layers * c.d_model * c.n_ctx

    def configure_optimizer(self, learning_rate, weight_decay, betas, fused, state=None, optimizer="adamw", muon_lr=0.0,
                            muon_momentum=0.95, muon_dtype=torch.bfloat16):
        """The optimizer train.py steps. optimizer="adamw": AdamW on every parameter, with weight decay on the
        matrices only, not on the norm weights. optimizer="muon": Muon (torch.optim.Muon's update, batched by shape) on
        the hidden matrices (the attention and MLP projections) at muon_lr (0: learning_rate) with Nesterov momentum
        muon_momentum and its Newton-Schulz iterations in muon_dtype, and AdamW as above on the rest (the tied
        embedding and the norm weights). Muon scales its orthogonalized update to AdamW's size, so its learning
        rate and weight decay are on AdamW's scale.
        Every group has "peak_lr", the learning rate the schedule scales. fused: AdamW's one-kernel update (for
        parameters on a GPU). state: an optimizer state_dict to go on from, perhaps saved on another machine or
        with other settings."""
        if optimizer == "adamw":
            matrices, hidden = [p for p in self.parameters() if p.dim() >= 2], []
        else:
            hidden = [p for block in self.blocks for p in block.parameters() if p.dim() == 2]
            hidden_ids = {id(p) for p in hidden}
            matrices = [p for p in self.parameters() if p.dim() >= 2 and id(p) not in hidden_ids]
        adamw = torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay, "peak_lr": learning_rate},
                                   {"params": [p for p in self.parameters() if p.dim() < 2], "weight_decay": 0.0,
                                    "peak_lr": learning_rate}],
                                  lr=learning_rate, betas=betas, fused=fused)
        if optimizer == "adamw":
            if state is not None:
                load_optimizer_state(adamw, state)
            return adamw
        muon_lr = muon_lr or learning_rate
        muon = Muon([{"params": hidden, "peak_lr": muon_lr}], lr=muon_lr, weight_decay=weight_decay, momentum=muon_momentum,
                    ns_dtype=muon_dtype)
        combined = MuonAdamW(muon, adamw)
        if state is not None:
            combined.load_state_dict(state)
        return combined

    def decode_step(self, token, cache):
        """float32 logits (B, d_vocab) of the token after token (B, 1), which goes at cache.pos; the cache is updated
        in place. Its shapes do not depend on the position: generate(compile=True) compiles it once."""
        return self.lm_head(self.hidden_states(token, cache)[:, -1]).float()

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None,
                 generator=None, use_cache=True, compile=False):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens; returns (B, T + n).

        temperature 0 (or under GREEDY_BELOW) is greedy; top_k 0 and top_p 1.0 switch those filters
        off. A row that has produced eos_id is finished: it is padded with eos_id until every row is
        done (n is then the step at which the last row finished) or the context (n_ctx) is full.

        The prompt goes through the model once (lm_head on its last position only), then one token at a
        time against a KVCache preallocated for n_ctx positions, the tokens written into a preallocated
        output; the device is asked whether every row has finished only every FINISHED_EVERY tokens.
        compile=True runs the decode step through torch.compile (CUDA graphs on a GPU): it pays once the
        compilation (seconds to tens of seconds, once per batch size and ATTEND_BUCKET of positions) is spread over enough tokens; see README.
        use_cache=False recomputes the whole sequence at each step (the reference the cache is tested against).
        """
        B, T = idx.shape
        max_new_tokens = min(max_new_tokens, self.config.n_ctx - T)
        if not use_cache:
            return self._generate_recomputing(idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator)
        if max_new_tokens <= 0:
            return idx
        device = idx.device
        # the layers compute in the autocast dtype when autocast is on (bf16 on a GPU), the weights' dtype otherwise
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.embed.weight.dtype
        step = self.decode_step
        if compile:
            step = self._compiled_decode_step(device)
            cache = self._static_cache(B, dtype, device)
        else:
            cache = KVCache(self.config, B, dtype, device)
        out = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=device)
        out[:, :T] = idx
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        cache.length = attended(T, self.config.n_ctx)
        logits = self.lm_head(self.hidden_states(idx, cache)[:, -1]).float()
        n = max_new_tokens
        for i in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_token = torch.where(finished, eos_id, next_token)
                finished |= next_token == eos_id
            out[:, T + i] = next_token
            if i + 1 == max_new_tokens or (eos_id is not None and (i + 1) % FINISHED_EVERY == 0 and finished.all()):
                n = i + 1
                break
            cache.length = attended(T + i + 1, self.config.n_ctx)
            logits = step(next_token[:, None], cache)
        if eos_id is not None and finished.all():  # end where the last row finished, as a check after every token would
            every_row_done = (out[:, T:T + n] == eos_id).cummax(dim=1).values.all(dim=0)
            n = int(every_row_done.int().argmax()) + 1
        return out[:, :T + n]

    def _compiled_decode_step(self, device):
        """decode_step through torch.compile with fixed shapes: CUDA graphs on a GPU (mode reduce-overhead, the
        step's ~100 kernel launches replayed as one), fused C++ kernels on a CPU. Kept on the model: compiled
        once per batch size, dtype and attended length, reused by later calls."""
        mode = "reduce-overhead" if device.type == "cuda" else None
        # each batch size compiles n_ctx / ATTEND_BUCKET steps; dynamo's default limit of 8 would fall back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if getattr(self, "_compiled_step_mode", "unset") != mode:
            self._compiled_step = torch.compile(self.decode_step, mode=mode, fullgraph=True, dynamic=False)
            self._compiled_step_mode = mode
        return self._compiled_step

    def _static_cache(self, batch_size, dtype, device):
        """The KVCache of the compiled decode step, one per batch size, dtype and device, kept on the model and reused
        by later calls: its tensors are marked as static addresses (written in place by the CUDA graphs, not copied in
        and out), and a CUDA graph re-records when a static input moves, so a new cache per call would re-record every
        graph at every call. Positions left from an earlier call are never read: the mask stops at the new ones."""
        caches = self.__dict__.setdefault("_static_caches", {})  # not a buffer: not in the state_dict
        key = (batch_size, dtype, device)
        if key not in caches:
            caches[key] = KVCache(self.config, batch_size, dtype, device)
            for t in (*caches[key].k, *caches[key].v, caches[key].pos):
                torch._dynamo.mark_static_address(t)
        caches[key].pos.zero_()
        return caches[key]

    def _generate_recomputing(self, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator):
        """generate without a cache: the whole sequence through the model at every step, the plain loop it stands for."""
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        out = idx
        for _ in range(max(max_new_tokens, 0)):
            logits, _ = self(out)
            next_token = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
                finished |= next_token == eos_id
            out = torch.cat((out, next_token[:, None]), dim=1)
            if eos_id is not None and finished.all():
                break
        return out


def load_optimizer_state(optimizer, state):
    """Load a torch optimizer's state_dict into optimizer, keeping the settings optimizer was made with: the saved
    groups keep only their parameters and take every setting of this run before loading, because torch places
    each state tensor by the group's flags (the fused AdamW kernel needs `step` beside the parameters on the GPU,
    the others keep it on the CPU)."""
    groups = [{**now, "params": saved["params"]} for saved, now in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state["state"], "param_groups": groups})


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update with the matrices of one shape orthogonalized together. For each hidden matrix:
    Nesterov momentum (buf = lerp(buf, grad, 1 - momentum), update = lerp(grad, buf, momentum)), 5 Newton-Schulz
    iterations that take the update to about its nearest orthogonal matrix, decoupled weight decay, then a step of
    lr * 0.2 * sqrt(max(rows, cols)), the size of AdamW's (torch's adjust_lr_fn="match_rms_adamw"). torch runs the
    iterations matrix by matrix, 15 matmuls each, 630 a step for the 5M's 42 matrices (on an H100 its step was
    2.7x AdamW's); here each shape's matrices go through one batched matmul per product, 60 a step. ns_dtype: the
    dtype of the iterations, torch's bfloat16, or float32 where bfloat16 matmuls are slow (a CPU without AMX or
    AVX512_BF16). The state_dict is torch.optim.Muon's: a checkpoint saved with it goes on here."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, ns_dtype=torch.bfloat16):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": True,
                                  "ns_coefficients": (3.4445, -4.7750, 2.0315), "eps": 1e-7, "ns_steps": 5,
                                  "adjust_lr_fn": "match_rms_adamw"})
        self.ns_dtype = ns_dtype
        if any(p.dim() != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon takes 2-D matrices only")

    @staticmethod
    def orthogonalize(updates, coefficients, steps, eps, dtype):
        """Newton-Schulz on a (n, rows, cols) stack, in dtype, each matrix scaled to Frobenius norm 1 first; wide
        as they are or transposed, so that X @ X^T is the smaller product."""
        a, b, c = coefficients
        tall = updates.size(-2) > updates.size(-1)
        x = updates.to(dtype).mT if tall else updates.to(dtype)
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.mT if tall else x

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - momentum)
                updates = torch.stack(grads).lerp_(torch.stack(bufs), momentum) if group["nesterov"] else torch.stack(bufs)
                ortho = self.orthogonalize(updates, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                torch._foreach_add_(params, list(ortho.to(params[0].dtype).unbind(0)), alpha=-lr * 0.2 * math.sqrt(max(shape)))


class MuonAdamW:
    """Muon on the hidden matrices and AdamW on the rest, stepped as one optimizer: param_groups (Muon's, then
    AdamW's), step, zero_grad, and a state_dict {"muon": ..., "adamw": ...} that load_state_dict takes back."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):  # looked up each time: load_state_dict gives each optimizer new group dicts
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        load_optimizer_state(self.muon, state["muon"])
        load_optimizer_state(self.adamw, state["adamw"])


def attended(filled, n_ctx):
    """How many cache positions a step reads once `filled` are written: the next multiple of ATTEND_BUCKET. Reading
    all n_ctx doubled a batch-32 step of the 5M model on a CPU; one length per bucket keeps the compiled steps few."""
    return min(n_ctx, -(-filled // ATTEND_BUCKET) * ATTEND_BUCKET)


ATTEND_BUCKET = 64  # compile=True compiles one decode step per bucket: 8 for a context of 512
FINISHED_EVERY = 32  # generate asks whether every row has finished once per this many tokens: each question
# waits for the device (a GPU's queued work, a CPU's threads) and costs as much as a decode step at batch 1

GREEDY_BELOW = 1e-5  # a temperature under this samples greedily: the distribution is the argmax already, and
# dividing the logits by it could overflow to inf


def sample_next(logits, temperature, top_k, top_p, generator=None):
    """One token id per row of logits (B, V)."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop[:, 0] = False  # the most likely token always stays, so top_p 0 is greedy, not all -inf
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
