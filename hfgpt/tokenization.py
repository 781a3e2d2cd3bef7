"""Byte-level BPE tokenizers for hfgpt: training, special tokens and the chat template.

`train_tokenizer` learns a GPT-2 style byte-level BPE with the `tokenizers` library and wraps it as a transformers
`PreTrainedTokenizerFast`, so it saves with `save_pretrained` and loads with `AutoTokenizer.from_pretrained`.

Special tokens come first in the vocabulary, so their ids are small and the same for every tokenizer trained here:

    0 <|endoftext|>   end of a document; also the BOS token and the end of every chat turn (so `generate` stops)
    1 <|pad|>         padding only; never seen in training text
    2 <|system|>      chat role headers, see CHAT_TEMPLATE
    3 <|user|>
    4 <|assistant|>

then the 256 byte symbols, then the learned merges. Because every byte is a symbol, any Unicode text encodes
without an unknown token, and nothing normalises the text: `decode(encode(text)) == text`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

ENDOFTEXT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
# The order is the id order; configs and saved models rely on it, so append new tokens at the end only.
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT_TOKEN, PAD_TOKEN, *ROLE_TOKENS.values())
NUM_BYTE_SYMBOLS = 256

# Each turn is its role token, the content, then the EOS token:
#     <|system|>You are terse.<|endoftext|><|user|>Hi<|endoftext|><|assistant|>Hello.<|endoftext|>
# No newline after the role token: the content then starts right after a special token, so no BPE token can straddle
# header and content, and the assistant mask is exact whatever the content starts or ends with.
# The assistant's content and its EOS sit inside {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` (TRL's assistant-only loss) trains the model to reply
# and to stop. The role tokens are written out literally; `add_chat_template` makes sure the tokenizer has them.
CHAT_TEMPLATE = """\
{%- for message in messages -%}
    {%- if message['role'] not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('Unknown chat role ' ~ message['role']
                            ~ '; this template knows system, user and assistant.') -}}
    {%- endif -%}
    {%- if message['content'] is not string -%}
        {{- raise_exception('The content of a ' ~ message['role'] ~ ' message must be a string.') -}}
    {%- endif -%}
    {{- '<|' ~ message['role'] ~ '|>' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}{{- message['content'] ~ eos_token -}}{%- endgeneration -%}
    {%- else -%}
        {{- message['content'] ~ eos_token -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}
"""


def train_tokenizer(
    files_or_iterator: str | os.PathLike | list[str | os.PathLike] | tuple | Iterable[str],
    vocab_size: int = 8192,
    min_frequency: int = 2,
    special_tokens: list[str] | None = None,
    show_progress: bool = True,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with hfgpt's special tokens and chat template.

    Args:
        files_or_iterator: the training text. A path (str or PathLike) or a list/tuple of paths to text files, or any
            other iterable of strings (or of lists of strings, i.e. batches), e.g. a generator over a dataset column.
            A list is always read as file paths; to train on in-memory strings pass `iter(texts)`.
        vocab_size: the size of the final vocabulary, special tokens and the 256 byte symbols included. The result
            has fewer tokens only when the corpus has no more pairs seen `min_frequency` times.
        min_frequency: a pair must occur at least this often to be merged.
        special_tokens: extra special tokens, added after the default ones (ids 5, 6, ...) as
            `extra_special_tokens`. The defaults (see `DEFAULT_SPECIAL_TOKENS`) are always present.
        show_progress: show the `tokenizers` progress bars.
        model_max_length: the longest input the model takes (e.g. `config.max_position_embeddings`); left unset,
            transformers uses a very large number.

    Returns:
        A `PreTrainedTokenizerFast` with bos/eos `<|endoftext|>`, pad `<|pad|>`, the chat role tokens and
        `CHAT_TEMPLATE`.
    """
    special_tokens = _all_special_tokens(special_tokens)
    smallest = NUM_BYTE_SYMBOLS + len(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs the {NUM_BYTE_SYMBOLS} byte symbols plus "
            f"{len(special_tokens)} special tokens, so vocab_size must be an integer >= {smallest}."
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(f"min_frequency={min_frequency!r} must be a non-negative integer (2 is the usual choice).")
    if model_max_length is not None and (not isinstance(model_max_length, int) or model_max_length < 1):
        raise ValueError(f"model_max_length={model_max_length!r} must be a positive integer or None.")

    backend = Tokenizer(models.BPE())
    # No normalizer and no prefix space: the text is kept byte for byte, which is what makes decoding exact.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen in the corpus or not
        show_progress=show_progress,
    )

    if _is_paths(files_or_iterator):
        files = _checked_files(files_or_iterator)
        backend.train(files, trainer=trainer)
    else:
        texts = _CheckedTexts(files_or_iterator)
        backend.train_from_iterator(texts, trainer=trainer, length=_len_or_none(files_or_iterator))
        if texts.characters == 0:
            raise ValueError("The text iterator gave no text (it was empty, or every string was empty).")

    return wrap_tokenizer(backend, special_tokens, model_max_length)


def wrap_tokenizer(
    backend: Tokenizer, special_tokens: list[str] | tuple[str, ...] = DEFAULT_SPECIAL_TOKENS,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` that holds hfgpt's default special tokens as a transformers tokenizer."""
    missing = [token for token in DEFAULT_SPECIAL_TOKENS if backend.token_to_id(token) is None]
    if missing:
        raise ValueError(f"The tokenizer lacks the special tokens {missing}; hfgpt's tokenizers need all of "
                         f"{list(DEFAULT_SPECIAL_TOKENS)}.")
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT_TOKEN,
        eos_token=ENDOFTEXT_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[token for token in special_tokens if token not in (ENDOFTEXT_TOKEN, PAD_TOKEN)],
        clean_up_tokenization_spaces=False,  # its clean-up would delete spaces: no round trip
        model_input_names=["input_ids", "attention_mask"],
        **extra,
    )
    # Every pretraining document starts with <|endoftext|> (hfgpt.data.text), so raw text is tokenized the same way:
    # BOS first. Chat conversations are rendered by the template and tokenized without it.
    tokenizer.add_bos_token = True
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """The token ids a model config needs: `HFGPTConfig.from_preset("tiny", **special_token_ids(tokenizer))`."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def add_chat_template(tokenizer: PreTrainedTokenizerBase) -> int:
    """Give any tokenizer with an EOS token (e.g. GPT-2's) hfgpt's chat template and role tokens, in place.

    Returns the number of tokens added to the vocabulary. When it is not 0, grow the model's embeddings to match:
    `model.resize_token_embeddings(len(tokenizer))`.
    """
    if tokenizer.eos_token is None:
        raise ValueError(
            "The tokenizer has no EOS token, which the chat template ends every turn with (so that generate() stops "
            "after a reply). Set one first, e.g. tokenizer.eos_token = '<|endoftext|>'."
        )
    added = tokenizer.add_special_tokens(
        {"extra_special_tokens": list(ROLE_TOKENS.values())}, replace_extra_special_tokens=False
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return added


def check_chat_template(tokenizer: PreTrainedTokenizerBase, assistant_masks: bool = False) -> None:
    """Raise a clear error unless the tokenizer has a chat template (with `{% generation %}` if `assistant_masks`).

    Call it before chat training: assistant-only loss needs the `{% generation %}` markers.
    """
    template = tokenizer.chat_template
    name = f" {tokenizer.name_or_path!r}" if tokenizer.name_or_path else ""
    if isinstance(template, dict):  # a tokenizer may ship named templates; transformers uses "default"
        template = template.get("default")
    if not template:
        raise ValueError(
            f"The tokenizer{name} has no chat template. Give it hfgpt's with "
            "hfgpt.tokenization.add_chat_template(tokenizer), or set tokenizer.chat_template to a Jinja template."
        )
    if assistant_masks and "generation" not in _generation_tags(template):
        raise ValueError(
            f"The chat template of the tokenizer{name} has no {{% generation %}} block, so the assistant's "
            "tokens cannot be masked for assistant-only loss. Use hfgpt.tokenization.add_chat_template(tokenizer) "
            "or wrap the assistant content and its end-of-turn token in {% generation %}...{% endgeneration %}."
        )


def _generation_tags(template: str) -> set[str]:
    return set(re.findall(r"\{%-?\s*(generation|endgeneration)\s*-?%\}", template))


def _all_special_tokens(extra: list[str] | None) -> list[str]:
    tokens = list(DEFAULT_SPECIAL_TOKENS)
    if extra is None:
        return tokens
    if isinstance(extra, str):
        raise TypeError(f"special_tokens must be a list of strings, got the string {extra!r}; wrap it: [{extra!r}].")
    for token in extra:
        if not isinstance(token, str) or not token:
            raise TypeError(f"special_tokens must be non-empty strings; got {token!r}.")
        if token not in tokens:  # the defaults are always there; repeating one is harmless
            tokens.append(token)
    return tokens


def _is_paths(source) -> bool:
    """A path or a list/tuple (of paths). Any other iterable is a stream of texts."""
    return isinstance(source, (str, os.PathLike, list, tuple))


def _checked_files(source) -> list[str]:
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not paths:
        raise ValueError("No training files were given (the list is empty).")
    hint = " To train on in-memory strings, pass an iterator instead of a list or string, e.g. iter(texts)."
    for path in paths:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"A list is read as text file paths, but it holds {type(path).__name__} {path!r}.{hint}")
    missing = [str(path) for path in paths if not Path(path).is_file()]
    if missing:
        kinds = ["a directory" if Path(path).is_dir() else "not found" for path in missing]
        listed = ", ".join(f"{path!r} ({kind})" for path, kind in zip(missing, kinds))
        raise FileNotFoundError(f"These training files are not readable files: {listed}.{hint}")
    if all(Path(path).stat().st_size == 0 for path in paths):
        raise ValueError(f"The training corpus is empty: every file is empty ({[str(path) for path in paths]}).")
    return [str(path) for path in paths]


class _CheckedTexts(Iterator):
    """Passes texts (or batches of texts) through to `tokenizers`, counting characters and rejecting non-strings."""

    def __init__(self, texts: Iterable):
        try:
            self._texts = iter(texts)
        except TypeError:
            raise TypeError(
                f"files_or_iterator must be a file path, a list of file paths or an iterable of strings; "
                f"got {type(texts).__name__}."
            ) from None
        self.characters = 0

    def __next__(self):
        item = next(self._texts)
        batch = item if isinstance(item, (list, tuple)) else [item]
        for text in batch:
            if not isinstance(text, str):
                raise TypeError(
                    f"The text iterator must give strings (or lists of strings); it gave {type(text).__name__}. "
                    "For a datasets.Dataset, pass the text column, e.g. (row['text'] for row in dataset)."
                )
            self.characters += len(text)
        return item


def _len_or_none(source) -> int | None:
    try:
        return len(source)
    except TypeError:
        return None
