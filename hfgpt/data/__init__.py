"""Data for training: loading rows (`sources`) and turning text into packed blocks for language modelling (`text`).

    from hfgpt.data import load_raw_datasets, build_lm_datasets, PackedBlockCollator

    raw = load_raw_datasets(train_files=["corpus.txt"], validation_split_percentage=5)
    blocks = build_lm_datasets(raw, tokenizer, block_size=256)        # input_ids + position_ids per block
    batch = PackedBlockCollator()([blocks["train"][0], blocks["train"][1]])
"""

from .sources import (
    DataError,
    check_columns,
    column_names,
    expand_data_files,
    hold_out_validation,
    is_saved_dataset,
    load_raw_datasets,
    split_file_list,
)
from .text import (
    PackedBlockCollator,
    build_lm_datasets,
    check_block_size,
    document_separator_id,
    pack_blocks,
    pack_token_stream,
    tokenize_documents,
)

__all__ = [
    "DataError",
    "PackedBlockCollator",
    "build_lm_datasets",
    "check_block_size",
    "check_columns",
    "column_names",
    "document_separator_id",
    "expand_data_files",
    "hold_out_validation",
    "is_saved_dataset",
    "load_raw_datasets",
    "pack_blocks",
    "pack_token_stream",
    "split_file_list",
    "tokenize_documents",
]
