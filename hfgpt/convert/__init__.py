"""Checkpoint conversion between hfgpt and other model formats.

    from hfgpt.convert import gpt2_to_hfgpt, hfgpt_to_gpt2
    gpt2_to_hfgpt("openai-community/gpt2", "gpt2-hfgpt")      # a Hub id or a local GPT2LMHeadModel directory
    hfgpt_to_gpt2("gpt2-hfgpt", "gpt2-again")                  # back to transformers' GPT2LMHeadModel

The command line: `hfgpt convert --from gpt2|hfgpt SOURCE OUTPUT`.
"""

from .gpt2 import gpt2_to_hfgpt, hfgpt_to_gpt2

# --from value -> converter. A new source format adds one entry (and its module).
CONVERTERS = {"gpt2": gpt2_to_hfgpt, "hfgpt": hfgpt_to_gpt2}

__all__ = ["CONVERTERS", "gpt2_to_hfgpt", "hfgpt_to_gpt2"]
