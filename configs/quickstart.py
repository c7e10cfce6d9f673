"""A CPU-sized run on the bundled sample corpus: the README's first command trains it in minutes."""
out_dir = "out/quickstart"
dataset = "sample"
n_layers = 4
d_model = 128
n_heads = 4
n_kv_heads = 2
n_ctx = 256
d_vocab = 4096
tokens_per_step = 4096
batch_size = 16
max_iters = 300
learning_rate = 3e-3
warmup_iters = 30
eval_interval = 100
eval_seqs = 64
log_interval = 20
compile = False
