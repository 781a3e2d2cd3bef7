"""Training hfgpt models with transformers' Trainer (and TRL's trainers built on it), one module per task.

`common` holds what every task shares: weight decay on matrices only, perplexity at evaluation, the log history and
loss curve, checkpoint resolution for resuming, output-directory checks and the end-of-run files.
"""
