"""Text -> fixed-length training blocks for causal language modelling.

    documents --tokenize--> [EOS] doc1   [EOS] doc2   [EOS] doc3 ...      (one row per document)
              --pack------> blocks of exactly `block_size` tokens, with `position_ids` that restart at 0 at every EOS
                            (and at the start of every block)

Each document starts with the EOS token (`<|endoftext|>`, which is also hfgpt's BOS), so EOS sits between documents:
the last token of a document learns to predict the end, and the first token of the next is predicted from EOS alone.
Blocks carry no attention mask: from `position_ids` that restart, transformers' `create_causal_mask` builds a
block-diagonal causal mask, so a token never attends to another document packed into the same block. Tokens left over
at the end of each tokenized batch (fewer than a block) are dropped, as in transformers' `run_clm.py`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from .sources import DataError, check_columns, column_names

BLOCK_COLUMNS = ("input_ids", "position_ids")

logger = logging.getLogger(__name__)


def document_separator_id(tokenizer) -> int:
    """The token placed before every document: EOS (GPT-2's and hfgpt's `<|endoftext|>`)."""
    token_id = tokenizer.eos_token_id
    if token_id is None:
        raise DataError(
            f"The tokenizer {tokenizer.name_or_path!r} has no EOS token, which packing puts between documents. "
            "Set one (tokenizer.eos_token = '...') or train a tokenizer with --vocab_size."
        )
    return token_id


def set_text_start_bos(tokenizer, bos: bool) -> None:
    """Make `tokenizer` put BOS before every text (`bos=True`) or encode texts as they are, through transformers'
    `add_bos_token` (kept by save_pretrained). hfgpt's own tokenizers already start with it on: pretraining puts the
    document separator before every document, so position 0 has only ever held it (a classifier fed bare texts sees
    its first word there instead; full fine-tuning can re-learn that position, LoRA with its frozen embeddings
    cannot: bench/spam_experiments.md). Other tokenizers (GPT-2's) get it switched on here.

    `add_bos_token` can add only the BOS token, so this matches pretraining where BOS is the separator (hfgpt's and
    GPT-2's `<|endoftext|>` is both); where it is not, it says so."""
    if tokenizer.bos_token_id is None:
        if bos:
            logger.warning("The tokenizer has no BOS token: texts are encoded as they are.")
        return
    if bos and tokenizer.eos_token_id is not None and tokenizer.bos_token_id != document_separator_id(tokenizer):
        logger.warning("The tokenizer's BOS token %r is not the document separator %r that hfgpt's pretraining puts "
                       "before every document; texts start with BOS all the same.", tokenizer.bos_token,
                       tokenizer.eos_token)

    def starts_with_bos() -> bool:
        return tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]

    if starts_with_bos() == bos:
        return
    tokenizer.add_bos_token = bos  # transformers rewrites the post-processor
    if starts_with_bos() != bos:
        raise ValueError(f"Could not make the {type(tokenizer).__name__} tokenizer {'add' if bos else 'leave out'} its "
                         f"BOS token (its post-processor decides, whatever add_bos_token says); pass --add_bos_token "
                         f"{'false' if bos else 'true'} to use it as it is.")


def tokenize_documents(dataset, tokenizer, text_column: str = "text", num_proc: int | None = None,
                       batch_size: int = 1000):
    """Tokenize every row of `text_column` into `input_ids` = [EOS] + tokens, dropping all other columns.

    Works on a `Dataset`, `IterableDataset` or a dict of them (one `datasets.map` per split, batched; `num_proc`
    processes for in-memory datasets, cached by `datasets`). Empty texts become a lone EOS, which packing drops.
    """
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        return type(dataset)({name: tokenize_documents(split, tokenizer, text_column, num_proc, batch_size)
                              for name, split in dataset.items()})
    check_columns(dataset, [text_column])
    separator = document_separator_id(tokenizer)

    def tokenize(batch):
        texts = [text if isinstance(text, str) else "" for text in batch[text_column]]
        # verbose=False: documents longer than the model are expected here; packing cuts them into blocks
        encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return {"input_ids": [[separator] + ids for ids in encoded["input_ids"]]}

    kwargs = dict(batched=True, batch_size=batch_size, remove_columns=column_names(dataset))
    if isinstance(dataset, Dataset):
        kwargs.update(num_proc=num_proc, desc="Tokenizing")
    return dataset.map(tokenize, **kwargs)


def pack_token_stream(documents: list[list[int]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate tokenized documents and cut them into full blocks of `block_size`.

    Returns `input_ids` and `position_ids` per block; positions count from 0 at each document start and at each
    block start (a document cut by a block boundary continues from position 0 in the next block).
    """
    lengths = [len(ids) for ids in documents if len(ids) > 1]  # a lone EOS is an empty document
    stream = np.fromiter((token for ids in documents if len(ids) > 1 for token in ids), dtype=np.int64,
                         count=sum(lengths))
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        return {"input_ids": [], "position_ids": []}
    stream = stream[: num_blocks * block_size]
    starts = np.zeros(len(stream), dtype=bool)
    document_starts = np.cumsum([0] + lengths[:-1])
    starts[document_starts[document_starts < len(stream)]] = True
    starts[::block_size] = True
    index = np.arange(len(stream))
    last_start = np.maximum.accumulate(np.where(starts, index, 0))
    positions = index - last_start
    return {"input_ids": stream.reshape(num_blocks, block_size).tolist(),
            "position_ids": positions.reshape(num_blocks, block_size).tolist()}


def pack_blocks(tokenized, block_size: int, num_proc: int | None = None, batch_size: int = 1000):
    """Pack a tokenized dataset (or dict of them) into blocks; see `pack_token_stream`."""
    if isinstance(tokenized, (DatasetDict, IterableDatasetDict)):
        return type(tokenized)({name: pack_blocks(split, block_size, num_proc, batch_size)
                                for name, split in tokenized.items()})
    kwargs = dict(batched=True, batch_size=batch_size, remove_columns=column_names(tokenized))
    if isinstance(tokenized, Dataset):
        kwargs.update(num_proc=num_proc, desc=f"Packing into blocks of {block_size}")
    return tokenized.map(lambda batch: pack_token_stream(batch["input_ids"], block_size), **kwargs)


def check_block_size(block_size: int, max_position_embeddings: int) -> None:
    if not isinstance(block_size, int) or block_size < 2:
        raise DataError(f"block_size={block_size!r} must be an integer >= 2.")
    if block_size > max_position_embeddings:
        raise DataError(
            f"block_size={block_size} is larger than the model's max_position_embeddings={max_position_embeddings}. "
            f"Use --block_size {max_position_embeddings} or less, or a longer model "
            f"(--config_overrides max_position_embeddings={block_size})."
        )


def build_lm_datasets(raw, tokenizer, block_size: int, text_column: str = "text", num_proc: int | None = None,
                      batch_size: int = 1000):
    """Raw rows (a `DatasetDict` / `IterableDatasetDict` from `load_raw_datasets`) -> packed blocks per split.

    For in-memory datasets, a split that yields no block (empty corpus, or less text than one block) is an error
    naming how many tokens it has. Streamed splits are checked when the first block is drawn.
    """
    blocks = pack_blocks(tokenize_documents(raw, tokenizer, text_column, num_proc, batch_size), block_size,
                         num_proc, batch_size)
    for name, split in blocks.items():
        if isinstance(split, Dataset) and len(split) == 0:
            raise DataError(
                f"The {name} split gives no block of {block_size} tokens: its text is empty or too short. "
                f"Give more text, or a smaller --block_size."
            )
    return blocks


class PackedBlockCollator:
    """Stacks packed blocks into a batch for causal LM training: `input_ids`, `position_ids`, `labels`.

    Labels are the input ids (the model shifts them). There is deliberately no `attention_mask`: with one, the mask
    builder would not look at `position_ids` and documents packed into a block would see each other.
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        missing = [column for column in BLOCK_COLUMNS if column not in features[0]]
        if missing:
            raise DataError(f"PackedBlockCollator needs {', '.join(BLOCK_COLUMNS)} per example (from pack_blocks); "
                            f"missing {', '.join(missing)} (the example has {', '.join(features[0])}).")
        input_ids = torch.tensor([feature["input_ids"] for feature in features], dtype=torch.long)
        position_ids = torch.tensor([feature["position_ids"] for feature in features], dtype=torch.long)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": input_ids.clone()}


__all__ = [
    "BLOCK_COLUMNS",
    "PackedBlockCollator",
    "build_lm_datasets",
    "check_block_size",
    "document_separator_id",
    "pack_blocks",
    "pack_token_stream",
    "set_text_start_bos",
    "tokenize_documents",
]
