"""hfgpt.data: loading rows from files / saved datasets, tokenizing, packing with per-document positions."""

import json

import pytest
import torch
from datasets import Dataset, DatasetDict

from hfgpt.data import (
    DataError,
    PackedBlockCollator,
    build_lm_datasets,
    check_block_size,
    load_raw_datasets,
    pack_token_stream,
    split_file_list,
    tokenize_documents,
)
from hfgpt.data.default_corpus import default_corpus

TEXTS = ["The cat sat on the mat.", "A dog barked at the moon all night long.", "Short one.",
         "Tokens, tokens and more tokens: packing puts several documents in one block."]


@pytest.fixture(scope="module")
def tokenizer():
    from hfgpt.tokenization import train_tokenizer

    return train_tokenizer(iter(TEXTS * 20), vocab_size=300, show_progress=False)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------------------------------------------------
# Loading


def test_text_file_rows_are_paragraphs_and_validation_is_the_tail(tmp_path):
    path = write(tmp_path / "a.txt", "\n\n".join(f"paragraph {i}\nsecond line {i}" for i in range(20)))
    raw = load_raw_datasets(train_files=path, validation_split_percentage=10)
    assert raw["train"]["text"][0] == "paragraph 0\nsecond line 0"
    assert len(raw["train"]) == 18 and len(raw["validation"]) == 2
    assert raw["validation"]["text"] == ["paragraph 18\nsecond line 18", "paragraph 19\nsecond line 19"]
    by_line = load_raw_datasets(train_files=path, sample_by="line", validation_split_percentage=0)
    assert len(by_line["train"]) == 40 and "validation" not in by_line  # blank lines are no documents


def test_jsonl_csv_tsv_and_file_lists(tmp_path):
    jsonl = write(tmp_path / "a.jsonl", "\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(TEXTS)))
    jsonl2 = write(tmp_path / "b.jsonl", json.dumps({"body": "extra", "id": 9}))
    raw = load_raw_datasets(train_files=f"{jsonl},{jsonl2}", validation_files=[jsonl2], required_columns=["body"])
    assert raw["train"]["body"] == TEXTS + ["extra"] and raw["validation"]["body"] == ["extra"]
    tsv = write(tmp_path / "a.tsv", "label\ttext\nham\thello there\nspam\twin a prize, now\n")
    assert load_raw_datasets(train_files=[tsv], validation_split_percentage=0)["train"]["text"] == \
        ["hello there", "win a prize, now"]
    csv = write(tmp_path / "a.csv", 'text,n\n"a, b",1\nc,2\n')
    assert load_raw_datasets(train_files=csv, validation_split_percentage=0)["train"]["text"] == ["a, b", "c"]
    assert split_file_list(["a.txt,b.txt", tmp_path / "c.txt"]) == ["a.txt", "b.txt", str(tmp_path / "c.txt")]
    assert len(load_raw_datasets(train_files=str(tmp_path / "*.jsonl"), validation_split_percentage=0)["train"]) == 5


def test_saved_datasets_keep_their_validation_split_or_get_one(tmp_path):
    rows = {"text": [f"document {i}" for i in range(10)]}
    DatasetDict({"train": Dataset.from_dict(rows), "validation": Dataset.from_dict({"text": ["held out"]}),
                 "test": Dataset.from_dict({"text": ["never used"]})}).save_to_disk(tmp_path / "dict")
    raw = load_raw_datasets(dataset_name=str(tmp_path / "dict"))
    assert set(raw) == {"train", "validation"} and raw["validation"]["text"] == ["held out"]
    Dataset.from_dict(rows).save_to_disk(tmp_path / "single")
    raw = load_raw_datasets(dataset_name=str(tmp_path / "single"), validation_split_percentage=20)
    assert raw["validation"]["text"] == ["document 8", "document 9"]


def test_streaming_reads_lazily_and_holds_out_every_kth_row(tmp_path):
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps({"text": f"row {i}"}) for i in range(40)))
    raw = load_raw_datasets(train_files=path, streaming=True, validation_split_percentage=10)
    train, validation = [row["text"] for row in raw["train"]], [row["text"] for row in raw["validation"]]
    assert validation == [f"row {i}" for i in range(0, 40, 10)]
    assert len(train) == 36 and not set(train) & set(validation)


def test_clear_errors_for_bad_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_raw_datasets(train_files=[str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="empty"):
        load_raw_datasets(train_files=write(tmp_path / "empty.txt", ""))
    jsonl = write(tmp_path / "a.jsonl", json.dumps({"body": "x", "id": 1}))
    with pytest.raises(DataError, match=r"no column 'text'.*'body', 'id'"):
        load_raw_datasets(train_files=jsonl, required_columns=["text"], validation_split_percentage=0)
    with pytest.raises(DataError, match="one format"):
        load_raw_datasets(train_files=[jsonl, write(tmp_path / "b.txt", "hello")])
    with pytest.raises(DataError, match="unsupported extension"):
        load_raw_datasets(train_files=write(tmp_path / "a.parquet2", "x"))
    with pytest.raises(DataError, match="not both"):
        load_raw_datasets(train_files=jsonl, dataset_name="wikitext")


# --------------------------------------------------------------------------------------------------------------------
# Tokenizing and packing


BAD_FILES = {  # name: (content, the message's line and reason)
    "rows.jsonl": ('{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n',
                   "rows.jsonl, line 4: not valid JSON (Expecting property name"),
    "list.jsonl": ('{"text": "a"}\n["b"]\n', "list.jsonl, line 2: a JSON list where an object with named fields"),
    "rows.json": ('[{"text": "a"},\n {"text": }]', "rows.json, line 2: not valid JSON (Expecting value"),
    "rows.csv": ("text,label\nhi,1\nhello, world,2\n", "rows.csv, line 3: 3 fields where the header (the first "
                 "line) has 2 (a comma inside an unquoted text? Quote the field)"),
    "rows.tsv": ("text\tlabel\nhi\t1\nho\t2\t3\n", "rows.tsv, line 3: 3 fields where the header"),
    "latin1.tsv": ("text\tlabel\ncaf\xe9\t1\n".encode("latin-1"), "latin1.tsv, line 2: not UTF-8 text (byte 0xe9)"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_malformed_line_is_one_message_with_the_file_and_line(tmp_path, name, capsys):
    from hfgpt.files import DataFileError, read_rows
    from hfgpt.training.pretrain import main as pretrain_main

    content, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for read in (lambda: load_raw_datasets(train_files=str(path), validation_split_percentage=0),
                 lambda: read_rows(path)):
        with pytest.raises(DataFileError) as error:
            read()
        assert str(error.value).startswith(str(path.parent / expected))
    # the command prints that one message, not datasets' traceback
    assert pretrain_main(["--train_file", str(path), "--output_dir", str(tmp_path / "out")]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and "examples/s]" not in line]  # progress bars
    assert len(lines) == 1 and lines[0].startswith(f"hfgpt pretrain: error: {path.parent / expected}")


def test_pack_token_stream_restarts_positions_at_documents_and_blocks():
    eos = 0
    docs = [[eos, 5, 6, 7], [eos], [eos, 8, 9], [eos, 1, 2, 3, 4, 5, 6]]  # [eos] alone is an empty document
    packed = pack_token_stream(docs, block_size=5)
    assert packed["input_ids"] == [[0, 5, 6, 7, 0], [8, 9, 0, 1, 2]]  # 13 tokens: 2 blocks, 3 dropped
    assert packed["position_ids"] == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]  # restart at EOS and at the block start
    assert pack_token_stream([[eos, 1]], block_size=5) == {"input_ids": [], "position_ids": []}


def test_every_document_starts_with_eos_and_blocks_have_no_attention_mask(tokenizer):
    raw = DatasetDict({"train": Dataset.from_dict({"text": TEXTS * 3, "other": list(range(12))})})
    tokenized = tokenize_documents(raw, tokenizer)
    assert tokenized["train"].column_names == ["input_ids"]
    first = tokenized["train"][0]["input_ids"]
    assert first[0] == tokenizer.eos_token_id and tokenizer.decode(first[1:]) == TEXTS[0]
    blocks = build_lm_datasets(raw, tokenizer, block_size=16)
    lengths = [len(row["input_ids"]) for row in tokenized["train"]]
    assert len(blocks["train"]) == sum(lengths) // 16
    batch = PackedBlockCollator()([blocks["train"][0], blocks["train"][1]])
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention_mask: it would undo the packing
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], batch["input_ids"])
    starts = (batch["position_ids"] == 0)
    is_eos = batch["input_ids"] == tokenizer.eos_token_id
    assert torch.equal(starts[:, 1:], is_eos[:, 1:])  # after a block's first token, positions restart exactly at EOS


def test_packed_documents_give_the_same_logits_as_each_document_alone(tokenizer, tiny_model):
    raw = DatasetDict({"train": Dataset.from_dict({"text": TEXTS})})
    documents = tokenize_documents(raw, tokenizer)["train"]["input_ids"]
    total = sum(map(len, documents))
    block = build_lm_datasets(raw, tokenizer, block_size=total)["train"]
    batch = PackedBlockCollator()([block[0]])
    with torch.no_grad():
        packed_logits = tiny_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for ids in documents:
            alone = tiny_model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed_logits[start:start + len(ids)], alone, atol=1e-5, rtol=1e-5)
            start += len(ids)
        # the control: the same block read as one sequence gives different logits after the first document
        unpacked = tiny_model(input_ids=batch["input_ids"]).logits[0]
    assert not torch.allclose(unpacked[len(documents[0]):], packed_logits[len(documents[0]):], atol=1e-4)


def test_block_errors(tokenizer):
    with pytest.raises(DataError, match="max_position_embeddings=128"):
        check_block_size(256, 128)
    raw = DatasetDict({"train": Dataset.from_dict({"text": TEXTS}), "validation": Dataset.from_dict({"text": ["x"]})})
    with pytest.raises(DataError, match="validation split gives no block"):
        build_lm_datasets(raw, tokenizer, block_size=16)
    with pytest.raises(DataError, match="no column 'content'.*'text'"):
        build_lm_datasets(raw, tokenizer, block_size=16, text_column="content")


def test_default_corpus_is_python_docstrings():
    corpus = default_corpus(max_chars=20_000)
    assert 20_000 <= sum(map(len, corpus["text"])) < 40_000
    assert all(len(text) >= 40 for text in corpus["text"]) and len(set(corpus["text"])) == len(corpus)
