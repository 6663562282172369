"""Reconstruct images from a trained checkpoint (not available yet: needs the trainer)."""

import sys

if __name__ == "__main__":
    sys.exit("sample.py: there is no trainer yet, so no checkpoint to sample from.")
