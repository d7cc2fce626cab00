"""python -m jvlm.testing DIR: write a tiny random jina-vlm checkpoint (random weights)."""

import argparse

from . import write_tiny_checkpoint

parser = argparse.ArgumentParser(prog="python -m jvlm.testing", description=__doc__)
parser.add_argument("directory")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
print(write_tiny_checkpoint(args.directory, seed=args.seed))
