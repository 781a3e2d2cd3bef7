"""hfgpt.data.chat: instruction and preference rows -> conversations, with errors that name the row and the field."""

import pytest
from datasets import Dataset

from hfgpt.data.chat import (
    check_prompt_lengths,
    conversation,
    preference_example,
    prompt_and_reference,
    to_preference_dataset,
    to_sft_dataset,
)

USER, ASSISTANT = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


def test_alpaca_rows_become_one_user_and_one_assistant_turn():
    assert conversation({"instruction": "Add 2 and 3.", "input": "", "output": "5"}) == [
        msg(USER, "Add 2 and 3."), msg(ASSISTANT, "5")]
    # the input follows the instruction after a blank line; a missing or null input is the same as an empty one
    assert conversation({"instruction": "Fix it.", "input": "He go.", "output": "He goes."})[0] == msg(
        USER, "Fix it.\n\nHe go.")
    assert conversation({"instruction": "Hi", "output": "Hello"}) == conversation(
        {"instruction": "Hi", "input": None, "output": "Hello"})


def test_messages_rows_keep_their_turns_and_drop_extra_keys():
    messages = [msg("system", "Be brief."), msg(USER, "Hi"), {"role": ASSISTANT, "content": "Hi", "tool_calls": None}]
    assert conversation({"messages": messages}) == [msg("system", "Be brief."), msg(USER, "Hi"), msg(ASSISTANT, "Hi")]


def test_prompt_and_reference_splits_at_the_last_assistant_turn():
    messages = [msg(USER, "a"), msg(ASSISTANT, "b"), msg(USER, "c"), msg(ASSISTANT, "d")]
    assert prompt_and_reference({"messages": messages}) == (messages[:3], "d")
    assert prompt_and_reference({"instruction": "q", "input": "x", "output": "r"}) == ([msg(USER, "q\n\nx")], "r")
    # a preference row is evaluated against its chosen answer
    assert prompt_and_reference({"prompt": "q", "chosen": "good", "rejected": "bad"}) == ([msg(USER, "q")], "good")


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"instruction": "q"}, "row 7 of train.jsonl has no 'output' field; its fields are 'instruction'"),
        ({"prompt": "q", "completion": "a"}, "row 7 of train.jsonl is not an instruction row"),
        ({"messages": [msg(USER, "q")]}, "row 7 of train.jsonl: 'messages' has no assistant turn"),
        ({"messages": "q"}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": USER, "content": 3}]}, "messages[0] (user) must have a string 'content'"),
        ({"instruction": 5, "output": "a"}, "'instruction' must be a string, got int"),
    ],
)
def test_bad_instruction_rows_name_the_row_and_the_field(row, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        conversation(row, 7, "train.jsonl")


def test_preference_rows_in_every_accepted_shape_give_the_same_example():
    expected = {"prompt": [msg(USER, "Fix it.\n\nHe go.")], "chosen": [msg(ASSISTANT, "He goes.")],
                "rejected": [msg(ASSISTANT, "He go, whatever.")]}
    alpaca = {"instruction": "Fix it.", "input": "He go.", "chosen": "He goes.", "rejected": "He go, whatever."}
    explicit_text = {"prompt": "Fix it.\n\nHe go.", "chosen": "He goes.", "rejected": "He go, whatever."}
    explicit_chat = {key: value for key, value in expected.items()}
    implicit = {name: expected["prompt"] + expected[name] for name in ("chosen", "rejected")}
    for row in (alpaca, explicit_text, explicit_chat, implicit):
        assert preference_example(row) == expected


@pytest.mark.parametrize("missing", ["chosen", "rejected"])
def test_preference_row_without_chosen_or_rejected_is_a_clear_error(missing):
    row = {"instruction": "q", "chosen": "a", "rejected": "b"}
    del row[missing]
    with pytest.raises(ValueError, match=f"row 4 of prefs.jsonl has no '{missing}' field.*its fields are"):
        preference_example(row, 4, "prefs.jsonl")


def test_preference_row_with_plain_text_and_no_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="no 'prompt' or 'instruction'"):
        preference_example({"chosen": "a", "rejected": "b"})
    with pytest.raises(ValueError, match="'chosen' must end with an assistant message"):
        preference_example({"prompt": "q", "chosen": [msg(USER, "a")], "rejected": "b"})


def test_dataset_mappers_keep_only_the_trl_columns_and_report_the_bad_row():
    rows = Dataset.from_list([{"instruction": "a", "input": "", "output": "b", "extra": 1}] * 2)
    sft = to_sft_dataset(rows, "train.jsonl")
    assert sft.column_names == ["messages"] and sft[1]["messages"] == [msg(USER, "a"), msg(ASSISTANT, "b")]

    preferences = Dataset.from_list([{"instruction": "a", "chosen": "b", "rejected": "c"},
                                     {"instruction": "a", "chosen": "b", "rejected": None}])
    with pytest.raises(ValueError, match="row 1 of prefs.jsonl has no 'rejected' field"):
        to_preference_dataset(preferences, "prefs.jsonl")
    good = to_preference_dataset(preferences.select([0]))
    assert sorted(good.column_names) == ["chosen", "prompt", "rejected"]


def test_prompt_longer_than_the_context_is_a_clear_error(tiny_tokenizer):
    short, long = [msg(USER, "hi")], [msg(USER, "word " * 200)]
    (length,) = check_prompt_lengths(tiny_tokenizer, [short], context=128)
    assert length == len(tiny_tokenizer.apply_chat_template(short, add_generation_prompt=True)["input_ids"])
    with pytest.raises(ValueError, match=r"prompt of row 1 of eval.jsonl is \d+ tokens long .* context is 128 tokens"):
        check_prompt_lengths(tiny_tokenizer, [short, long], context=128, source="eval.jsonl")
