#!/usr/bin/env bash
# The whole pipeline on the bundled sample corpus, on a CPU, in minutes:
# tokenizer -> token bins -> a small model -> stories sampled from it -> its loss by story and label.
set -euo pipefail
cd "$(dirname "$0")"
python tokenizer.py --input=data/sample/stories.jsonl --vocab_size=4096
python prepare.py --input=data/sample/stories.jsonl --tokenizer=tokenizers/sample.model --val_fraction=0.1
python train.py configs/quickstart.py
python sample.py --out_dir=out/quickstart --num_samples=3 --max_new_tokens=300
python evaluate.py --out_dir=out/quickstart
