"""`hfgpt chat`: driven through a real pseudo-terminal (pexpect) as a user would, and through its functions.

The answers are checked against the same conversation answered greedily in-process, so a dropped turn, a wrong
template or a lost history changes the expected text. Ctrl-C is tested on an answer that could not end by itself for
minutes (its EOS token is suppressed and its context is 100k tokens): only a working stop brings the prompt back.
"""

import io
import os
import sys

import pexpect
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.chat import Chat
from hfgpt.cli import main as hfgpt_main
from hfgpt.tokenization import special_token_ids

TIMEOUT = 120  # seconds pexpect waits for one expected output; each step here takes a few seconds


def save_model(path, tokenizer, preset="tiny", generation=None, **overrides):
    torch.manual_seed(0)
    model = HFGPTForCausalLM(HFGPTConfig.from_preset(preset, **special_token_ids(tokenizer), **overrides)).eval()
    for name, value in (generation or {}).items():
        setattr(model.generation_config, name, value)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tiny_tokenizer):
    return save_model(tmp_path_factory.mktemp("chat") / "model", tiny_tokenizer)


def spawn(*args) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "hfgpt.cli", "chat", *map(str, args)], encoding="utf-8",
                          timeout=TIMEOUT, env={**os.environ, "TERM": "dumb"}, dimensions=(50, 1000))
    child.expect_exact("you> ")
    return child


def answer_of(child: pexpect.spawn, message: str) -> str:
    """Send a message, return the streamed answer (the text between 'model> ' and the next prompt)."""
    child.sendline(message)
    child.expect_exact("model> ")
    child.expect_exact("you> ")
    return child.before.replace("\r\n", "\n").removesuffix("\n")


def greedy(model_dir, tokenizer, messages: list[str], system=None, max_new_tokens=8) -> list[str]:
    """The answers `hfgpt chat --temperature 0` must give to these messages, one after the other."""
    model = HFGPTForCausalLM.from_pretrained(model_dir).eval()
    chat = Chat(model, tokenizer, system=system, temperature=0, max_new_tokens=max_new_tokens)
    return [chat.say(message, out=io.StringIO()) for message in messages]


# ---------------------------------------------------------------------------------------------------------------------
# Through a pseudo-terminal


def test_interactive_multi_turn_reset_and_exit(chat_dir, tiny_tokenizer):
    messages = ["Hello there", "Where is the red house?"]
    expected = greedy(chat_dir, tiny_tokenizer, messages, system="Be brief.")
    child = spawn(chat_dir, "--temperature", "0", "--max_new_tokens", "8", "--system", "Be brief.")
    assert [answer_of(child, message) for message in messages] == expected  # the second answer saw the first turn
    child.sendline("/reset")
    child.expect_exact("[new conversation]")
    child.expect_exact("you> ")
    assert answer_of(child, messages[1]) == greedy(chat_dir, tiny_tokenizer, messages[1:], system="Be brief.")[0]
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(tmp_path, tiny_tokenizer):
    endless = save_model(tmp_path / "endless", tiny_tokenizer, preset="modern-tiny", max_position_embeddings=100_000,
                         generation={"suppress_tokens": [tiny_tokenizer.eos_token_id]})
    child = spawn(endless, "--max_new_tokens", "90000", "--temperature", "1.0", "--seed", "0")
    child.sendintr()  # at the prompt: a reminder, not an exit
    child.expect_exact("Ctrl-C stops an answer")
    child.expect_exact("you> ")
    child.sendline("Tell me everything")
    child.expect_exact("model> ")
    child.expect(r"\S+ ")  # the answer is streaming: words are on the screen long before it could end
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("you> ")  # still in the chat
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_the_oldest_turns_are_dropped_when_the_context_fills(tmp_path, tiny_tokenizer):
    small = save_model(tmp_path / "small", tiny_tokenizer, max_position_embeddings=64)
    message = "the old sailor carries three apples near the sea"  # about 12 tokens with its template
    child = spawn(small, "--temperature", "0", "--max_new_tokens", "8", "--system", "Be brief.")
    transcript = ""
    for _ in range(4):
        transcript += answer_of(child, message)
    assert "[context full: dropped the 2 oldest messages of the conversation]" in transcript
    child.sendline("x " * 200)  # one message longer than the whole context: refused, the chat goes on
    child.expect_exact("Send a shorter one.")
    child.expect_exact("you> ")
    child.sendeof()  # Ctrl-D leaves too
    child.expect(pexpect.EOF)


# ---------------------------------------------------------------------------------------------------------------------
# One answer (--prompt), --raw, other models, bad input


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = hfgpt_main(["chat", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_prompt_prints_one_answer(chat_dir, tiny_tokenizer, capsys):
    code, out, _ = run(capsys, chat_dir, "--prompt", "Hello there", "--temperature", "0", "--max_new_tokens", "8")
    assert code == 0 and out == greedy(chat_dir, tiny_tokenizer, ["Hello there"])[0] + "\n"
    # sampling is repeatable with --seed, and differs from greedy
    sampled = [run(capsys, chat_dir, "--prompt", "Hello there", "--seed", "3", "--temperature", "1.5", "--top_k",
                   "0", "--top_p", "1.0", "--max_new_tokens", "8")[1] for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != out


def test_a_model_without_chat_template_needs_raw(tmp_path, tiny_tokenizer, capsys):
    source = save_model(tmp_path / "m", tiny_tokenizer)
    (source / "chat_template.jinja").unlink()  # a pretrained-only model's tokenizer
    code, _, error = run(capsys, source, "--prompt", "Hi")
    assert code == 1 and len(error.splitlines()) == 1 and "no chat template" in error and "--raw" in error
    code, out, _ = run(capsys, tmp_path / "m", "--raw", "--prompt", "The old sailor", "--temperature", "0",
                       "--max_new_tokens", "10")
    model = HFGPTForCausalLM.from_pretrained(tmp_path / "m")
    ids = tiny_tokenizer("The old sailor", return_tensors="pt").input_ids  # raw text: BOS first, as in pretraining
    continuation = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=1)[0, ids.shape[1]:]
    assert code == 0 and out == tiny_tokenizer.decode(continuation, skip_special_tokens=True) + "\n"


def test_any_causal_lm_with_a_chat_template_works(tmp_path, tiny_tokenizer, capsys):
    """Not only hfgpt: a transformers GPT-2 with hfgpt's tokenizer."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512, n_positions=64,
                               **special_token_ids(tiny_tokenizer))).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    code, out, _ = run(capsys, tmp_path / "gpt2", "--prompt", "Hi", "--temperature", "0", "--max_new_tokens", "6")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    assert code == 0 and out == Chat(model, tiny_tokenizer, temperature=0, max_new_tokens=6).say(
        "Hi", out=io.StringIO()) + "\n"


def test_bad_arguments_are_one_line_errors(chat_dir, tmp_path, capsys):
    code, _, error = run(capsys, tmp_path / "missing", "--prompt", "Hi")
    assert code == 1 and len(error.splitlines()) == 1 and "does not exist" in error
    code, _, error = run(capsys, chat_dir, "--raw", "--system", "Be brief.", "--prompt", "Hi")
    assert code == 1 and "--system needs a chat template" in error
    with pytest.raises(SystemExit):
        hfgpt_main(["chat", str(chat_dir), "--top_p", "0"])


# ---------------------------------------------------------------------------------------------------------------------
# The conversation window


def test_prompt_ids_drop_whole_exchanges_and_keep_the_system_message(chat_dir, tiny_tokenizer):
    model = HFGPTForCausalLM.from_pretrained(chat_dir)
    chat = Chat(model, tiny_tokenizer, system="Be brief.", max_new_tokens=16)
    chat.context = 60
    for index in range(6):
        chat.messages += [{"role": "user", "content": f"question {index} about the red house"},
                          {"role": "assistant", "content": f"answer {index}"}]
    chat.messages.append({"role": "user", "content": "last question"})
    ids, dropped = chat.prompt_ids()
    assert len(ids) + 16 <= 60 and dropped > 0 and dropped % 2 == 0  # whole exchanges only
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert chat.messages[1]["role"] == "user" and chat.messages[-1]["content"] == "last question"
    text = tiny_tokenizer.apply_chat_template(chat.messages, add_generation_prompt=True, tokenize=False)
    assert ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    # and the most recently dropped exchange would not have fit
    kept = int(chat.messages[1]["content"].split()[1])
    back = [{"role": "user", "content": f"question {kept - 1} about the red house"},
            {"role": "assistant", "content": f"answer {kept - 1}"}]
    longer = tiny_tokenizer.apply_chat_template(chat.messages[:1] + back + chat.messages[1:],
                                                add_generation_prompt=True, tokenize=False)
    assert len(tiny_tokenizer(longer, add_special_tokens=False)["input_ids"]) + 16 > 60
