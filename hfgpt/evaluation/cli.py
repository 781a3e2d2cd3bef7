"""`hfgpt eval perplexity|rouge|classification ...` and the eval/ scripts: run a metric on a model, print the
results and merge them into the model directory's eval_results.json (`hfgpt.files.update_eval_results`)."""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import files
from ..docs_smoke import scale_down

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The model to evaluate: a local directory (results are written there) or a Hub id."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "The tokenizer, if it is not saved with the model."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, mps. Default: the best available."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code of non-hfgpt models."})
    quantize: str | None = field(
        default=None,
        metadata={"help": "Evaluate with int8 weights (hfgpt.quantization: what decoding with `hfgpt chat --quantize "
                          "int8` computes). The result is stored apart from, and never replaces, the full-precision "
                          "one.", "choices": ["int8"]},
    )
    batch_size: int = field(default=8, metadata={"help": "Examples (or windows) per forward pass."})
    results_dir: str | None = field(
        default=None,
        metadata={"help": f"Where to merge the results into {files.EVAL_RESULTS}. Default: the model directory."},
    )
    allow_training_data: bool = field(
        default=False,
        metadata={"help": "Score a file the model was trained on (training_summary.json records the run's files; "
                          "such a file is refused by default). The result is marked as training data."},
    )


@dataclass
class PerplexityArguments(ModelArguments):
    file: str | None = field(
        default=None,
        metadata={"help": "A .txt file (scored as one text) or .jsonl/.json/.csv/.tsv (one text per row)."},
    )
    text_column: str = field(default="text", metadata={"help": "The text field of a .jsonl/.csv/.tsv file."})
    max_length: int | None = field(default=None, metadata={"help": "Tokens per window. Default: the model's context."})
    stride: int | None = field(
        default=None, metadata={"help": "New tokens scored per window. Default: max_length // 2."}
    )
    add_start_token: bool | None = field(
        default=None, metadata={"help": "Prepend BOS so the first token is scored. Default: if the tokenizer has one."}
    )


@dataclass
class RougeArguments(ModelArguments):
    predictions_file: str | None = field(
        default=None, metadata={"help": "Score existing generations: a .jsonl with prediction and reference fields."}
    )
    prompts_file: str | None = field(
        default=None,
        metadata={"help": "Generate with --model_name_or_path for these rows (.jsonl): `messages`, Alpaca "
                          "`instruction`/`input`/`output`, preference rows, or --prompt_column/--reference_column."},
    )
    prediction_column: str = field(default="prediction")
    prompt_column: str = field(default="prompt")
    reference_column: str = field(default="reference")
    max_new_tokens: int = field(default=128, metadata={"help": "Longest generated response, in tokens."})
    max_examples: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows."})
    use_stemmer: bool = field(default=False, metadata={"help": "Porter-stem words before matching (Hub default: off)."})
    seed: int = field(default=42, metadata={"help": "Seed of ROUGE's bootstrap aggregation (and of sampling)."})
    save_predictions: str | None = field(
        default=None, metadata={"help": "Write the generated predictions with their references to this .jsonl file."}
    )


@dataclass
class ClassificationArguments(ModelArguments):
    file: str | None = field(default=None, metadata={"help": "A .csv, .tsv or .jsonl file with texts and labels."})
    text_column: str = field(default="text")
    label_column: str = field(default="label")
    average: str = field(
        default="macro", metadata={"help": "Averaging of precision/recall/F1: macro, micro, weighted, binary."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Truncate texts to this many tokens. Default: the model's context."}
    )


def _parse(argument_class, argv, prog):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(argument_class, prog=prog)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args, parser


def _results_dir(args) -> Path | None:
    if args.results_dir:
        return Path(args.results_dir)
    if args.model_name_or_path and Path(args.model_name_or_path).is_dir():
        return Path(args.model_name_or_path)
    return None


def _report(name: str, results: dict, args) -> None:
    if args.quantize:  # a score of the quantised model: kept apart from the model's own (files.eval_results_key)
        results = {**results, "quantization": args.quantize}
    print(json.dumps({name: results}, indent=2))
    directory = _results_dir(args)
    if directory is None:
        logger.warning("The model is not a local directory and no --results_dir was given: results not saved.")
        return
    path = files.update_eval_results(directory, name, results)
    print(f"Saved to {path}")


def _dataset_info(path: str, args=None, **extra) -> dict:
    """eval_results.json's "dataset": the file's name (no path: the results are published with the model), and
    whether the model was trained on it."""
    info = {"name": Path(path).name, **extra}
    if args is not None and _training_file(path, args):
        info["training_data"] = True
    return info


class TrainingDataError(ValueError):
    """The evaluation file is one the model was trained on."""


def _training_file(path: str, args) -> str | None:
    model_dir = args.model_name_or_path
    if not model_dir or not Path(model_dir).is_dir():
        return None
    return files.training_file_named(model_dir, path)


def check_not_training_data(path: str, args) -> None:
    """Refuse to score the model on a file its run trained on (unless --allow_training_data): that number measures
    memory, not generalisation, and would sit in the card beside the held-out one."""
    name = _training_file(path, args)
    if name is None:
        return
    if not args.allow_training_data:
        raise TrainingDataError(
            f"{path} is {name}, a file this model was trained on ({files.TRAINING_SUMMARY} in "
            f"{args.model_name_or_path} records it). A score on it measures how well the model remembers its training "
            "data, not how it does on new data. Evaluate on held-out data (a file the run did not train on), or pass "
            "--allow_training_data to score it anyway: the result is then marked as training data.")
    print(f"Warning: {path} is a file this model was trained on (--allow_training_data): the result is marked as "
          "training data, and the model card keeps it out of the model-index metadata.", file=sys.stderr)


def _model_and_tokenizer(args, auto_class=None):
    from .loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer_name_or_path or args.model_name_or_path)
    model = load_model(args.model_name_or_path, auto_class=auto_class, device=args.device,
                       trust_remote_code=args.trust_remote_code, quantize=args.quantize)
    return model, tokenizer


def _require(parser, **values) -> None:
    missing = [f"--{name}" for name, value in values.items() if not value]
    if missing:
        parser.error(f"missing {', '.join(missing)}")


# --- perplexity -----------------------------------------------------------------------------------------------------


def read_texts(path: str, text_column: str = "text") -> list[str]:
    """A .txt file is one text (so the sliding window runs across it); other formats give one text per row."""
    if Path(path).suffix.lower() == ".txt":
        if not Path(path).is_file():
            raise FileNotFoundError(f"Data file {path} does not exist.")
        return [Path(path).read_text(encoding="utf-8")]
    from ..files import read_rows

    return [str(row[text_column]) for row in read_rows(path, columns=(text_column,))]


def perplexity_main(argv: list[str] | None = None) -> int:
    import evaluate

    from . import metric_path

    args, parser = _parse(PerplexityArguments, argv, "hfgpt eval perplexity")
    _require(parser, model_name_or_path=args.model_name_or_path, file=args.file)
    scale_down("hfgpt eval perplexity", args)
    check_not_training_data(args.file, args)
    texts = read_texts(args.file, args.text_column)
    kept = [text for text in texts if text.strip()]
    if not kept:
        raise ValueError(f"{args.file} holds no non-empty text to score.")
    model, tokenizer = _model_and_tokenizer(args)
    results = evaluate.load(metric_path("perplexity")).compute(
        predictions=kept, model=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length,
        stride=args.stride, add_start_token=args.add_start_token,
    )
    summary = {key: results[key] for key in ("perplexity", "mean_nll", "mean_perplexity", "num_tokens", "max_length",
                                             "stride")}
    summary.update(num_texts=len(kept), skipped_empty_texts=len(texts) - len(kept),
                   dataset=_dataset_info(args.file, args,
                                         column=None if args.file.endswith(".txt") else args.text_column))
    _report("perplexity", summary, args)
    return 0


# --- ROUGE ----------------------------------------------------------------------------------------------------------


def prompt_and_reference(row: dict, index: int, source: str, prompt_column: str = "prompt",
                         reference_column: str = "reference"):
    """(prompt, reference) of a prompts-file row; the prompt is chat messages or a plain string.

    Rows with `prompt_column` give it and `reference_column` as they are; every other row (chat `messages`, Alpaca
    `instruction`/`input`/`output`, preference rows) goes through `hfgpt.data.chat.prompt_and_reference`, the
    formatting SFT and DPO train with, so a row means the same conversation in training and in evaluation.
    """
    from ..data.chat import prompt_and_reference as chat_prompt_and_reference

    if prompt_column not in row:
        return chat_prompt_and_reference(row, index, source)
    if reference_column not in row:
        raise ValueError(f"{source}: row {index} has {prompt_column!r} but no {reference_column!r} reference; its "
                         f"fields are {', '.join(map(repr, row))}. Set --reference_column.")
    return row[prompt_column], row[reference_column]


def render_prompt(tokenizer, prompt) -> str:
    """Chat messages go through the tokenizer's chat template; without one the user turns are joined as text."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}] if tokenizer.chat_template else prompt
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(message["content"] for message in prompt) + "\n\n"


def ensure_pad_token(tokenizer) -> None:
    """Batches need a pad token; like GPT-2's users, fall back to EOS (padded positions are masked anyway)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token to batch.")
        tokenizer.pad_token = tokenizer.eos_token


def generate_responses(model, tokenizer, prompts: list, max_new_tokens: int = 128, batch_size: int = 8,
                       progress: bool = True) -> tuple[list[str], int]:
    """Greedy responses to `prompts` (strings or chat messages), in batches with left padding.

    Returns the responses and how many prompts were cut from the left to fit the model's context.
    """
    import torch
    from tqdm.auto import tqdm

    from ..generation import compiled_by_default, generate
    from ..onednn import onednn_linears
    from .perplexity import model_context_length

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    context = model_context_length(model)
    room = None if context is None else context - max_new_tokens
    if room is not None and room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {context}-token "
                         "context; lower it.")
    ensure_pad_token(tokenizer)
    texts = [render_prompt(tokenizer, prompt) for prompt in prompts]
    # a chat template writes its own special tokens; a raw prompt gets the tokenizer's usual ones
    add_special_tokens = not tokenizer.chat_template
    device = next(model.parameters()).device
    compiled = compiled_by_default(model)
    responses, truncated = [], 0
    # the weights packed for oneDNN once for all batches, not at every generate() call (hfgpt.onednn)
    with onednn_linears(model):
        for start in tqdm(range(0, len(texts), batch_size), desc="generating", unit="batch", disable=not progress):
            encoded = [tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
                       for text in texts[start : start + batch_size]]
            if room is not None:
                truncated += sum(len(ids) > room for ids in encoded)
                encoded = [ids[-room:] for ids in encoded]  # keep the end: it holds the generation prompt
            rows = len(encoded)
            if compiled and len(texts) > batch_size:  # a short last batch repeats a prompt: reuses the compiled step
                encoded += [encoded[0]] * (batch_size - rows)
            width = max(map(len, encoded))
            input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(encoded):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
            with torch.no_grad():
                output = generate(model, input_ids.to(device), attention_mask=attention_mask.to(device),
                                  compiled=compiled, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
            responses += [text.strip()
                          for text in tokenizer.batch_decode(output[:rows, width:], skip_special_tokens=True)]
    return responses, truncated


def rouge_main(argv: list[str] | None = None) -> int:
    import evaluate

    from . import metric_path
    from ..files import read_rows

    args, parser = _parse(RougeArguments, argv, "hfgpt eval rouge")
    if bool(args.predictions_file) == bool(args.prompts_file):
        parser.error("give either --predictions_file (score existing generations) or --model_name_or_path with "
                     "--prompts_file (generate, then score)")
    if args.predictions_file and args.quantize:
        parser.error("--quantize applies when generating with --model_name_or_path; --predictions_file scores "
                     "generations that already exist")
    scale_down("hfgpt eval rouge", args)
    extra = {}
    if args.predictions_file:
        rows = read_rows(args.predictions_file, columns=(args.prediction_column, args.reference_column))
        rows = rows[: args.max_examples]
        predictions = [str(row[args.prediction_column]) for row in rows]
        references = [row[args.reference_column] for row in rows]
        dataset = _dataset_info(args.predictions_file)
    else:
        _require(parser, model_name_or_path=args.model_name_or_path)
        check_not_training_data(args.prompts_file, args)
        import torch

        torch.manual_seed(args.seed)
        pairs = [prompt_and_reference(row, index, args.prompts_file, args.prompt_column, args.reference_column)
                 for index, row in enumerate(read_rows(args.prompts_file)[: args.max_examples])]
        model, tokenizer = _model_and_tokenizer(args)
        prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
        predictions, truncated = generate_responses(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        extra = {"max_new_tokens": args.max_new_tokens, "chat_template": bool(tokenizer.chat_template),
                 "truncated_prompts": truncated}
        dataset = _dataset_info(args.prompts_file, args)
        if args.save_predictions:
            out = Path(args.save_predictions)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w", encoding="utf-8") as handle:
                for prompt, prediction, reference in zip(prompts, predictions, references):
                    handle.write(json.dumps({"prompt": prompt, args.prediction_column: prediction,
                                             args.reference_column: reference}) + "\n")
    scores = evaluate.load(metric_path("rouge"), seed=args.seed).compute(
        predictions=predictions, references=references, use_stemmer=args.use_stemmer)
    _report("rouge", {**scores, "num_examples": len(predictions), "use_stemmer": args.use_stemmer, **extra,
                      "dataset": dataset}, args)
    return 0


# --- classification -------------------------------------------------------------------------------------------------


def predict_classes(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int | None = None,
                    progress: bool = True) -> list[int]:
    """argmax class of each text, batched with right padding (truncated to `max_length` tokens)."""
    import torch
    from tqdm.auto import tqdm

    from ..onednn import onednn_linears

    ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # heads that find the last token by the pad id need it
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    predictions = []
    with torch.no_grad(), onednn_linears(model):  # fp32 forwards at up to twice MKL's speed on x86 CPUs
        for start in tqdm(range(0, len(texts), batch_size), desc="classifying", unit="batch", disable=not progress):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=max_length is not None,
                              max_length=max_length, return_tensors="pt")
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            predictions += logits.argmax(-1).tolist()
    return predictions


def classification_main(argv: list[str] | None = None) -> int:
    import evaluate
    from transformers import AutoModelForSequenceClassification

    from ..data.labels import encode_labels
    from . import metric_path
    from ..files import read_rows
    from .perplexity import model_context_length

    args, parser = _parse(ClassificationArguments, argv, "hfgpt eval classification")
    _require(parser, model_name_or_path=args.model_name_or_path, file=args.file)
    scale_down("hfgpt eval classification", args)
    check_not_training_data(args.file, args)
    rows = read_rows(args.file, columns=(args.text_column, args.label_column))
    model, tokenizer = _model_and_tokenizer(args, auto_class=AutoModelForSequenceClassification)
    # the same label-name -> class-id mapping the classification training uses
    references = encode_labels([row[args.label_column] for row in rows], model.config.label2id, where=args.file)
    max_length = args.max_length or model_context_length(model)
    predictions = predict_classes(model, tokenizer, [str(row[args.text_column]) for row in rows], args.batch_size,
                                  max_length)
    labels = sorted(model.config.id2label)
    results = evaluate.load(metric_path("classification")).compute(
        predictions=predictions, references=references, labels=labels, average=args.average, zero_division=0.0)
    results["label_names"] = [model.config.id2label[i] for i in labels]
    results.update(num_examples=len(rows), dataset=_dataset_info(args.file, args, text_column=args.text_column,
                                                                 label_column=args.label_column))
    _report("classification", results, args)
    return 0


# --- dispatcher -----------------------------------------------------------------------------------------------------

EVALUATIONS = {
    "perplexity": (perplexity_main, "perplexity of a causal LM on a text / jsonl / csv file (sliding window)"),
    "rouge": (rouge_main, "ROUGE of generated responses (from a predictions file, or generated from prompts)"),
    "classification": (classification_main, "accuracy, precision, recall, F1, confusion matrix of a classifier"),
}


def main(argv: list[str] | None = None) -> int:
    """`hfgpt eval <perplexity|rouge|classification> [arguments]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in EVALUATIONS:
        lines = ["usage: hfgpt eval <evaluation> [arguments]   (hfgpt eval <evaluation> --help)", "", "evaluations:"]
        lines += [f"  {name.ljust(14)}  {help_}" for name, (_, help_) in EVALUATIONS.items()]
        known = not argv or argv[0] in ("-h", "--help")
        print(("" if known else f"hfgpt eval: unknown evaluation {argv[0]!r}\n\n") + "\n".join(lines),
              file=sys.stdout if known else sys.stderr)
        return 0 if known else 2
    try:
        return EVALUATIONS[argv[0]][0](argv[1:])
    except (FileNotFoundError, ValueError) as error:  # bad input: a message, not a traceback
        print(f"hfgpt eval {argv[0]}: error: {error}", file=sys.stderr)
        return 1
