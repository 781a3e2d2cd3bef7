"""Chat formatting: the one path from instruction and preference rows to what the chat template renders.

SFT, DPO and evaluation all go through here, so a row means the same conversation in training and in evaluation.

Instruction rows (SFT, evaluation), either shape:
    {"instruction": ..., "input": ... (optional, may be empty), "output": ...}         Alpaca
    {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", ...}]}  chat
become a conversation, a list of `{"role", "content"}` messages ending with the assistant's answer. Alpaca rows map to
one user turn (the instruction, then a blank line and the input when there is one) and one assistant turn.

Preference rows (DPO), any of:
    {"instruction": ..., "input": ..., "chosen": str, "rejected": str}
    {"prompt": str or messages, "chosen": str or messages, "rejected": str or messages}  TRL, explicit prompt
    {"chosen": messages, "rejected": messages}                                           TRL, implicit prompt
become TRL's conversational preference format:
    {"prompt": [messages...], "chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}

Every error names the row and the field, and lists the fields the row does have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MESSAGES = "messages"
ALPACA_FIELDS = ("instruction", "input", "output")
PREFERENCE_FIELDS = ("chosen", "rejected")


def _where(index: int | None, source: str | None) -> str:
    """'row 12 of train.jsonl' / 'row 12' / 'the row': how errors point at a row."""
    where = "the row" if index is None else f"row {index}"
    return f"{where} of {source}" if source else where


def _as_dict(row: Any, where: str) -> dict:
    if not isinstance(row, Mapping):  # datasets hands `map` functions a lazy Mapping, not a dict
        raise ValueError(f"{where} is {type(row).__name__}, expected an object with named fields.")
    return dict(row)


def _fields(row: dict) -> str:
    return ", ".join(map(repr, row)) or "none"


def _text(row: dict, name: str, where: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:  # absent, or an empty cell of a CSV / a null in JSON
        if required:
            raise ValueError(f"{where} has no {name!r} field; its fields are {_fields(row)}.")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name!r} must be a string, got {type(value).__name__} {value!r}.")
    return value


def check_messages(messages: Any, where: str, field: str = MESSAGES) -> list[dict]:
    """A list of `{"role": str, "content": str}` dicts, or a clear error. Returns plain dicts with only those keys."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(
            f"{where}: {field!r} must be a non-empty list of {{'role': ..., 'content': ...}} messages, got "
            f"{type(messages).__name__} {messages!r:.80}."
        )
    checked = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"{where}: {field}[{position}] must be a dict with a 'role' string, got {message!r:.80}.")
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"{where}: {field}[{position}] ({message['role']}) must have a string 'content', got "
                f"{message.get('content')!r:.80}."
            )
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def alpaca_prompt(instruction: str, input: str = "") -> list[dict]:
    """The user turn of an Alpaca row: the instruction, then a blank line and the input when there is one."""
    content = f"{instruction}\n\n{input}" if input.strip() else instruction
    return [{"role": "user", "content": content}]


def conversation(row: dict, index: int | None = None, source: str | None = None) -> list[dict]:
    """The whole conversation of an instruction row (`messages`, or Alpaca `instruction`/`input`/`output`), ending
    with the assistant's answer."""
    where = _where(index, source)
    row = _as_dict(row, where)
    if row.get(MESSAGES) is not None:
        messages = check_messages(row[MESSAGES], where)
        if not any(message["role"] == "assistant" for message in messages):
            raise ValueError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn or compare to.")
        return messages
    if "instruction" in row:
        instruction = _text(row, "instruction", where)
        output = _text(row, "output", where)
        return alpaca_prompt(instruction, _text(row, "input", where, required=False)) + [
            {"role": "assistant", "content": output}
        ]
    raise ValueError(
        f"{where} is not an instruction row: it needs 'messages' (a list of chat messages) or the Alpaca fields "
        f"'instruction', 'output' (and optionally 'input'); its fields are {_fields(row)}."
    )


def is_preference_row(row: Any) -> bool:
    return isinstance(row, Mapping) and any(row.get(name) is not None for name in PREFERENCE_FIELDS)


def prompt_and_reference(row: dict, index: int | None = None, source: str | None = None) -> tuple[list[dict], str]:
    """(prompt messages, reference answer) of an instruction row: everything before the last assistant turn, and
    that turn's content. A preference row gives its prompt and its `chosen` answer. What held-out generation and
    ROUGE evaluation use."""
    if is_preference_row(row):
        example = preference_example(row, index, source)
        return example["prompt"], example["chosen"][-1]["content"]
    messages = conversation(row, index, source)
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    if last == 0:
        raise ValueError(f"{_where(index, source)}: the conversation starts with the assistant; there is no prompt.")
    return messages[:last], messages[last]["content"]


def _as_prompt(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return check_messages(value, where, field="prompt")


def _as_completion(value: Any, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = check_messages(value, where, field=field)
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: {field!r} must end with an assistant message, it ends with {messages[-1]['role']!r}."
        )
    return messages


def preference_example(row: dict, index: int | None = None, source: str | None = None) -> dict[str, list[dict]]:
    """A preference row in TRL's conversational format with an explicit prompt:
    `{"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}`."""
    where = _where(index, source)
    row = _as_dict(row, where)
    missing = [name for name in PREFERENCE_FIELDS if row.get(name) is None]
    if missing:
        raise ValueError(
            f"{where} has no {' or '.join(map(repr, missing))} field; a preference row needs both 'chosen' and "
            f"'rejected' (plus 'prompt', or 'instruction' and optionally 'input'); its fields are {_fields(row)}."
        )
    if row.get("prompt") is not None:
        prompt = _as_prompt(row["prompt"], where)
    elif row.get("instruction") is not None:
        prompt = alpaca_prompt(_text(row, "instruction", where), _text(row, "input", where, required=False))
    else:  # TRL's implicit prompt: chosen and rejected are whole conversations sharing the prompt turns
        if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
            raise ValueError(
                f"{where} has 'chosen' and 'rejected' but no 'prompt' or 'instruction' to answer; its fields are "
                f"{_fields(row)}. Add the prompt, or give chosen/rejected as whole conversations."
            )
        from trl.data_utils import extract_prompt

        split = extract_prompt({name: _as_completion(row[name], where, name) for name in PREFERENCE_FIELDS})
        if not split["prompt"]:
            raise ValueError(f"{where}: 'chosen' and 'rejected' share no leading turns, so there is no prompt.")
        return {"prompt": split["prompt"], "chosen": split["chosen"], "rejected": split["rejected"]}
    return {
        "prompt": prompt,
        "chosen": _as_completion(row["chosen"], where, "chosen"),
        "rejected": _as_completion(row["rejected"], where, "rejected"),
    }


def to_sft_dataset(dataset, source: str | None = None):
    """A `datasets.Dataset` of instruction rows -> one `messages` column (what TRL's SFTTrainer takes for chat)."""
    return dataset.map(
        lambda row, index: {MESSAGES: conversation(row, index, source)},
        with_indices=True,
        remove_columns=dataset.column_names,
        desc=f"Formatting {source or 'the instruction rows'} as conversations",
    )


def to_preference_dataset(dataset, source: str | None = None):
    """A `datasets.Dataset` of preference rows -> `prompt` / `chosen` / `rejected` conversation columns."""
    return dataset.map(
        lambda row, index: preference_example(row, index, source),
        with_indices=True,
        remove_columns=dataset.column_names,
        desc=f"Formatting {source or 'the preference rows'} for DPO",
    )


def check_prompt_lengths(tokenizer, prompts: Sequence[list[dict]], context: int, source: str | None = None,
                         context_name: str = "the model's context") -> list[int]:
    """Token counts of the rendered prompts (with the generation prompt); a clear error for the first prompt that
    leaves no room for an answer within `context` tokens (the model's context, or the training `max_length`)."""
    lengths = []
    for index, prompt in enumerate(prompts):
        encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = encoded["input_ids"]
        lengths.append(len(ids))
        if len(ids) >= context:
            raise ValueError(
                f"The prompt of {_where(index, source)} is {len(ids)} tokens long once rendered with the chat "
                f"template, but {context_name} is {context} tokens, which leaves no room for the answer. Shorten or "
                "drop that row, or use a model with a longer context (max_position_embeddings)."
            )
    return lengths


__all__ = [
    "ALPACA_FIELDS",
    "MESSAGES",
    "PREFERENCE_FIELDS",
    "alpaca_prompt",
    "check_messages",
    "check_prompt_lengths",
    "conversation",
    "is_preference_row",
    "preference_example",
    "prompt_and_reference",
    "to_preference_dataset",
    "to_sft_dataset",
]
