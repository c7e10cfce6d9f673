"""The 5M model of the suite: 6 layers, d_model 256, 4 heads; 5,374,208 parameters with d_vocab 4096.
The rest (context 512, 2 key/value heads, 32,768 tokens per step, schedule) is train.py's defaults."""
out_dir = "out/5m"
dataset = "simplestories"
n_layers = 6
d_model = 256
n_heads = 4
learning_rate = 2e-3
batch_size = 64  # per device per micro-step, at most
