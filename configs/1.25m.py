"""The 1.25M model of the suite: 4 layers, d_model 128, 4 heads, 1,245,824 parameters with d_vocab 4096."""
out_dir = "out/1.25m"
dataset = "simplestories"
n_layers = 4
d_model = 128
n_heads = 4
n_kv_heads = 2
n_ctx = 512
d_vocab = 4096
tokens_per_step = 32768
batch_size = 64
max_iters = 20000
learning_rate = 3e-3
warmup_iters = 500
eval_interval = 1000
