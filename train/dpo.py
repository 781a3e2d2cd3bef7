"""Align a causal LM to preference pairs with TRL's DPOTrainer: `python train/dpo.py --help` (= `hfgpt dpo`)."""

from hfgpt.training.alignment import dpo_main

if __name__ == "__main__":
    raise SystemExit(dpo_main())
