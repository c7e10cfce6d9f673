"""The 5M model (configs/5m.py) with context 256 instead of 512; the same 32,768 tokens per step, in 128 sequences,
and the same 128 x 256 = 32,768 tokens per micro-step. The README's "Context length" says what each context sees."""
out_dir = "out/5m_ctx256"
dataset = "simplestories"
n_layers = 6
d_model = 256
n_heads = 4
n_ctx = 256
learning_rate = 2e-3
batch_size = 128  # per device per micro-step, at most
