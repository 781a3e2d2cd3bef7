"""Fine-tune an hfgpt sequence classifier: `python train/classify.py --help` (the same as `hfgpt classify`).

Full fine-tuning, only the last N blocks (--train_last_n_blocks), LoRA (--lora) or QLoRA (--qlora).
"""

from hfgpt.training.classification import main

if __name__ == "__main__":
    raise SystemExit(main())
