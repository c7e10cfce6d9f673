"""The 11M model of the suite: 6 layers, d_model 384, 6 heads; 11,015,040 parameters with d_vocab 4096.
The rest (context 512, 2 key/value heads, 32,768 tokens per step, schedule) is train.py's defaults."""
out_dir = "out/11m"
dataset = "simplestories"
n_layers = 6
d_model = 384
n_heads = 6
learning_rate = 1.5e-3
batch_size = 64  # per device per micro-step, at most
