"""python train.py [--config configs/train/shapes.yaml] [flags]: train the Unifier generalist model.

With no arguments: builds the shapes tokenizer (runs/tokenizer-shapes) if missing, trains the tiny model on the
shapes-world task mixture through DeepSpeed ZeRO-2, and writes runs/shapes-tiny/. `python train.py --help` lists
the flags; `torchrun`, `accelerate launch` and `deepspeed` launch this same script on several processes.
"""

import sys

from unifier.train import main

if __name__ == "__main__":
    sys.exit(main())
