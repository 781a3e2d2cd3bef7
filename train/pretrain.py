"""Pretrain an hfgpt model: `python train/pretrain.py --help` (the same as `hfgpt pretrain`)."""

from hfgpt.training.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
