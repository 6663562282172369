"""Train a VQ-VAE tokenizer (not available yet: the training loop is still to come)."""

import sys

if __name__ == "__main__":
    sys.exit("train.py: the training loop is not in the package yet; see README.md.")
