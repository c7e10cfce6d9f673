"""The 30M model of the suite: 10 layers, d_model 512, 8 heads, 29,627,904 parameters with d_vocab 4096."""
out_dir = "out/30m"
dataset = "simplestories"
n_layers = 10
d_model = 512
n_heads = 8
n_kv_heads = 2
n_ctx = 512
d_vocab = 4096
tokens_per_step = 32768
batch_size = 32
max_iters = 20000
learning_rate = 1e-3
warmup_iters = 500
eval_interval = 1000
