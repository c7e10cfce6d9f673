"""The 5M model (configs/5m.py) with context 64 instead of 512; the same 32,768 tokens per step, in 512 sequences,
and the same 512 x 64 = 32,768 tokens per micro-step. The README's "Context length" says what each context sees."""
out_dir = "out/5m_ctx64"
dataset = "simplestories"
n_layers = 6
d_model = 256
n_heads = 4
n_ctx = 64
learning_rate = 2e-3
batch_size = 512  # per device per micro-step, at most
