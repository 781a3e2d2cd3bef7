"""Instruction-tune a causal LM with TRL's SFTTrainer: `python train/sft.py --help` (the same as `hfgpt sft`)."""

from hfgpt.training.alignment import sft_main

if __name__ == "__main__":
    raise SystemExit(sft_main())
