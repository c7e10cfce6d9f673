"""The 35M model of the suite: 12 layers, d_model 512, 8 heads; 35,133,952 parameters with d_vocab 4096.
The rest (context 512, 2 key/value heads, 32,768 tokens per step, schedule) is train.py's defaults."""
out_dir = "out/35m"
dataset = "simplestories"
n_layers = 12
d_model = 512
n_heads = 8
learning_rate = 1e-3
batch_size = 32  # per device per micro-step, at most
