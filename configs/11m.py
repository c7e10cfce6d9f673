"""The 11M model of the suite: 6 layers, d_model 384, 6 heads, 11,015,040 parameters with d_vocab 4096."""
out_dir = "out/11m"
dataset = "simplestories"
n_layers = 6
d_model = 384
n_heads = 6
n_kv_heads = 2
n_ctx = 512
d_vocab = 4096
tokens_per_step = 32768
batch_size = 64
max_iters = 20000
learning_rate = 1.5e-3
warmup_iters = 500
eval_interval = 1000
