"""The 5M model of the suite: 6 layers, d_model 256, 4 heads, 5,374,208 parameters with d_vocab 4096."""
out_dir = "out/5m"
dataset = "simplestories"
n_layers = 6
d_model = 256
n_heads = 4
n_kv_heads = 2
n_ctx = 512
d_vocab = 4096
tokens_per_step = 32768
batch_size = 64
max_iters = 20000
learning_rate = 2e-3
warmup_iters = 500
eval_interval = 1000
