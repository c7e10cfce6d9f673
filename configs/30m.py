"""The 30M model of the suite: 10 layers, d_model 512, 8 heads; 29,627,904 parameters with d_vocab 4096.
The rest (context 512, 2 key/value heads, 32,768 tokens per step, schedule) is train.py's defaults."""
out_dir = "out/30m"
dataset = "simplestories"
n_layers = 10
d_model = 512
n_heads = 8
learning_rate = 1e-3
batch_size = 32  # per device per micro-step, at most
