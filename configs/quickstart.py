"""A CPU-sized run on the bundled sample corpus: the 1.25M shape with context 256, trained in minutes by quickstart.sh."""
out_dir = "out/quickstart"
dataset = "sample"
n_layers = 4
d_model = 128
n_heads = 4
n_ctx = 256
tokens_per_step = 4096
batch_size = 16
max_iters = 400
learning_rate = 4e-3
weight_decay = 0.3  # the sample corpus is small: 0.3 gave a lower val loss than 0.1 (4.53 vs 4.64 nats)
warmup_iters = 30
eval_interval = 100
eval_seqs = 64
log_interval = 20
compile = False
overwrite = True  # quickstart.sh may be run again: its run is cheap to redo
