"""The 1.25M model of the suite: 4 layers, d_model 128, 4 heads; 1,245,824 parameters with d_vocab 4096.
The rest (context 512, 2 key/value heads, 32,768 tokens per step, schedule) is train.py's defaults."""
out_dir = "out/1.25m"
dataset = "simplestories"
n_layers = 4
d_model = 128
n_heads = 4
learning_rate = 3e-3
batch_size = 64  # per device per micro-step, at most
