"""`hfgpt chat MODEL_DIR`: talk to a causal language model in the terminal.

    hfgpt chat out/sft                                  # interactive: /reset starts over, /exit (or Ctrl-D) leaves
    hfgpt chat out/sft --system "You are terse." --temperature 0.7 --top_p 0.9 --seed 0
    hfgpt chat out/sft --prompt "What is a tokenizer?"  # one answer, then exit (scripts)
    hfgpt chat out/pretrain --raw                       # no chat template: continue plain text

Any causal LM directory works (hfgpt or not). Answers stream token by token through transformers' TextStreamer. The
conversation is kept across turns; when the prompt plus the answer would no longer fit the model's context, the
oldest turns are dropped (the system message is kept) and a note says so. Ctrl-C while an answer streams stops that
answer and returns to the prompt: a SIGINT handler asks generate() to stop through a StoppingCriteria, so generation
ends after the current token, cleanly, instead of an exception unwinding through the model.
"""

import argparse
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer, set_seed

from .docs_smoke import scale_down
from .evaluation.loading import load_model, load_tokenizer
from .evaluation.perplexity import model_context_length
from .generation import generate
from .onednn import onednn_linears
from .quantization import QUANTIZE_CHOICES

COMMANDS_HELP = "/reset starts a new conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer"
USER_PROMPT = "you> "
ASSISTANT_PROMPT = "model> "


class StopRequested(StoppingCriteria):
    """True once `requested` is set (by the Ctrl-C handler): generate() then ends after the current token."""

    def __init__(self):
        self.requested = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.requested, dtype=torch.bool, device=input_ids.device)


@dataclass
class Chat:
    """A conversation with a model: `say(text)` streams the answer to stdout and returns it."""

    model: torch.nn.Module
    tokenizer: object
    system: str | None = None
    raw: bool = False  # plain continuation of each input: no template, no history
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 50
    messages: list[dict] = field(default_factory=list)
    stop: StopRequested = field(default_factory=StopRequested)

    def __post_init__(self):
        self.context = model_context_length(self.model)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _encode(self, messages: list[dict]) -> list[int]:
        # the chat template writes its own special tokens; a raw prompt gets the tokenizer's usual ones (e.g. BOS)
        if self.raw:
            return self.tokenizer(messages[-1]["content"])["input_ids"]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self) -> tuple[list[int], int]:
        """The prompt for the conversation so far and how many old turns were dropped to leave room for an answer
        (at least min(max_new_tokens, half the context)). A single message too long to fit is a ValueError."""
        if self.context is None:
            return self._encode(self.messages), 0
        room = min(self.max_new_tokens, self.context // 2)
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            ids = self._encode(self.messages)
            if len(ids) + room <= self.context:
                return ids, dropped
            if len(self.messages) - first <= 1:  # only the new message is left (with the system message, if any)
                raise ValueError(f"That message is {len(ids)} tokens with the template; the model's context is "
                                 f"{self.context} tokens and {room} are kept for the answer. Send a shorter one.")
            # drop the oldest exchange: the oldest message and, if it was the user's, the answer that followed it
            del self.messages[first]
            dropped += 1
            if len(self.messages) - first > 1 and self.messages[first]["role"] == "assistant":
                del self.messages[first]
                dropped += 1

    def say(self, text: str, out=None) -> str:
        """Add the user's message, stream the answer to `out` (stdout) and return it. Ctrl-C (SIGINT) during the
        answer stops it early; what was generated so far is kept as the answer."""
        out = out or sys.stdout
        self.messages.append({"role": "user", "content": text})
        try:
            ids, dropped = self.prompt_ids()
        except ValueError:
            self.messages.pop()
            raise
        if dropped:
            print(f"[context full: dropped the {dropped} oldest message{'s' * (dropped > 1)} of the conversation]",
                  file=out, flush=True)
        input_ids = torch.tensor([ids], device=self.model.device)
        max_new = self.max_new_tokens if self.context is None else min(self.max_new_tokens, self.context - len(ids))
        sampling = (dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
                    if self.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        streamer = _Streamer(self.tokenizer, out)
        self.stop.requested = False
        # signal handlers can only be set from the main thread; elsewhere (a notebook's worker) Ctrl-C is not ours
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._request_stop) if in_main_thread else None
        try:
            with torch.no_grad():
                # eager: compiling would delay the first answer by 10-40 s
                output = generate(
                    self.model, input_ids, attention_mask=torch.ones_like(input_ids), compiled=False,
                    max_new_tokens=max_new,
                    streamer=streamer, stopping_criteria=StoppingCriteriaList([self.stop]),
                    pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                    else self.tokenizer.eos_token_id, **sampling,
                )
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if self.stop.requested:
            print("\n[stopped]", file=out, flush=True)
        else:
            print(file=out, flush=True)
        answer = self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        if self.raw:
            self.messages.pop()  # raw mode keeps no history
        else:
            self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _request_stop(self, signum, frame) -> None:
        self.stop.requested = True


class _Streamer(TextStreamer):
    """TextStreamer that writes to a given stream (the answer only: the prompt is skipped)."""

    def __init__(self, tokenizer, out):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        self.out.flush()


def has_chat_template(tokenizer) -> bool:
    template = tokenizer.chat_template
    return bool(template.get("default") if isinstance(template, dict) else template)


def interactive(chat: Chat, read=input) -> None:
    """The read-answer loop. Ctrl-C at the prompt only reminds how to leave; Ctrl-D or /exit leaves."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # not on every platform
        pass
    mode = "raw continuation: each line is continued as plain text" if chat.raw else "chat"
    print(f"{mode}; {COMMANDS_HELP}", flush=True)
    while True:
        try:
            text = read(USER_PROMPT)
        except EOFError:
            print(flush=True)
            return
        except KeyboardInterrupt:
            print(f"\n({COMMANDS_HELP})", flush=True)
            continue
        command = text.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            chat.reset()
            print("[new conversation]", flush=True)
            continue
        if not command:
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; {COMMANDS_HELP}", flush=True)
            continue
        print(ASSISTANT_PROMPT, end="", flush=True)
        try:
            chat.say(text)
        except ValueError as error:
            print(f"[{error}]", flush=True)
        except KeyboardInterrupt:  # Ctrl-C in the instant before generation started: forget the unanswered message
            if chat.messages and chat.messages[-1]["role"] == "user":
                chat.messages.pop()
            print("\n[stopped]", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hfgpt chat",
        description=f"Chat with a causal language model in the terminal ({COMMANDS_HELP}), or answer one --prompt.",
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="a causal LM directory (or Hub id) with its tokenizer")
    parser.add_argument("--prompt", default=None, help="answer this one message, print the answer and exit")
    parser.add_argument("--system", default=None, help="a system message that starts (and stays in) the conversation")
    parser.add_argument("--raw", action="store_true",
                        help="no chat template: continue each input as plain text (for pretrained-only models)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="the longest answer, in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling: keep this much probability mass")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampling, for repeatable answers")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps ... (default: the best available)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="int8: weights stored in 8 bits, 2.4-2.9x faster answers on a CPU, slightly different "
                             "numbers (hfgpt.quantization)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens={args.max_new_tokens} must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error("--temperature must be >= 0, --top_p in (0, 1], --top_k >= 0")
    scale_down("hfgpt chat", args)
    try:
        local = Path(args.model).is_absolute() or args.model.startswith((".", "~")) or args.model.count("/") > 1
        if local and not Path(args.model).expanduser().exists():  # not a Hub id (owner/name) either
            raise FileNotFoundError(f"{args.model} does not exist; give a model directory (or a Hub id).")
        tokenizer = load_tokenizer(args.model)
        if not args.raw and not has_chat_template(tokenizer):
            raise ValueError(f"{args.model}'s tokenizer has no chat template, so it cannot hold a conversation; run "
                             "with --raw to continue plain text, or fine-tune it into a chat model (hfgpt sft).")
        if args.raw and args.system:
            raise ValueError("--system needs a chat template; --raw continues plain text and has no system message.")
        model = load_model(args.model, device=args.device, quantize=args.quantize)
    except (ValueError, OSError) as error:
        print(f"hfgpt chat: error: {error}", file=sys.stderr)
        return 1
    if args.seed is not None:
        set_seed(args.seed)
    chat = Chat(model, tokenizer, system=args.system, raw=args.raw, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.prompt is not None:
        try:
            chat.say(args.prompt)
        except ValueError as error:
            print(f"hfgpt chat: error: {error}", file=sys.stderr)
            return 1
        return 0
    with onednn_linears(model):  # weights packed once for the session, not at every answer (hfgpt.onednn)
        interactive(chat)
    return 0
