"""SFT and DPO with TRL on a tiny hfgpt model: the loss mask, runs from a directory and from memory, with and without
LoRA, the DPO reference model, the saved outputs, the command line, and the errors for bad input."""

import copy
import gc
import importlib
import itertools
import json

import pytest
import torch

from hfgpt.hardware import native_bf16
from hfgpt import HFGPTConfig, HFGPTForCausalLM, files
from hfgpt.tokenization import CHAT_TEMPLATE, special_token_ids
from hfgpt.training.alignment import (
    GenerationSettings,
    HFGPTDPOConfig,
    HFGPTSFTConfig,
    build_dpo_trainer,
    build_sft_trainer,
    dpo_main,
    run_dpo,
    run_sft,
    sft_main,
)
from hfgpt.training.common import NonFiniteTrainingError
from hfgpt.training.peft import PeftArguments

COLOURS = ["red", "blue", "green", "white", "black", "yellow", "brown", "grey", "pink", "orange", "gold", "silver"]
SHORT = GenerationSettings(max_eval_prompts=2, max_new_tokens=4)


def instruction_rows(n: int = 10) -> list[dict]:
    return [{"instruction": f"What colour is house {i}?", "input": "" if i % 2 else f"House {i} is on the hill.",
             "output": f"House {i} is {COLOURS[i % len(COLOURS)]}."} for i in range(n)]


def preference_rows(n: int = 10) -> list[dict]:
    return [{"instruction": f"Describe house {i}.", "input": "",
             "chosen": f"House {i} is a warm {COLOURS[i % len(COLOURS)]} house.", "rejected": "No."}
            for i in range(n)]


def fresh_model(tokenizer) -> HFGPTForCausalLM:
    torch.manual_seed(0)
    return HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", **special_token_ids(tokenizer)))


def config(config_class, output_dir, **overrides):
    """fp32 unless asked: several tests check exact equalities (policy == reference at the start, rewards summed by
    hand), which bf16 autocast rounds apart; bf16's own test is test_dpo_learns_the_preferences_in_bf16."""
    settings = dict(max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3,
                    report_to=[], logging_steps=1, save_strategy="no", gradient_checkpointing=False,
                    disable_tqdm=True, seed=0, bf16=False)
    return config_class(str(output_dir), **{**settings, **overrides})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    """A (random) tiny hfgpt model saved with its tokenizer: the 'pretrained' starting point."""
    path = tmp_path_factory.mktemp("base")
    fresh_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def starting_model(source: str, base_dir, tokenizer):
    """(what run_* gets as the model, the tokenizer argument, the starting weights)."""
    if source == "dir":
        weights = HFGPTForCausalLM.from_pretrained(base_dir).state_dict()
        return str(base_dir), None, weights
    model = fresh_model(tokenizer)
    return model, tokenizer, copy.deepcopy(model.state_dict())


def peft_args(lora: bool):
    return PeftArguments(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0) if lora else None


def chat_reply(model_dir) -> dict:
    """Answer one chat message with transformers' pipeline, as a user of the saved model would."""
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(model_dir))
    assert generator.tokenizer.chat_template == CHAT_TEMPLATE
    output = generator([{"role": "user", "content": "What colour is house 3?"}], max_new_tokens=3, do_sample=False)
    return output[0]["generated_text"][-1]


def check_outputs(result, starting_weights, lora: bool, base_is_dir: bool, reference_rows: list[dict], answer_key: str):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = result.output_dir
    saved = AutoModelForCausalLM.from_pretrained(out)
    changed = [name for name, tensor in saved.state_dict().items() if not torch.equal(tensor, starting_weights[name])]
    assert changed, "training left every weight as it was"
    if lora:
        assert (out / files.ADAPTER_DIR / "adapter_config.json").is_file()
        if base_is_dir:  # an adapter on an in-memory base has no base directory to name
            adapter_model = AutoPeftModelForCausalLM.from_pretrained(out / files.ADAPTER_DIR).eval()
            ids = torch.tensor([[3, 100, 101, 0, 4]])
            torch.testing.assert_close(adapter_model(ids).logits, saved(ids).logits, atol=1e-5, rtol=1e-4)

    generations = [json.loads(line) for line in (out / files.GENERATIONS).read_text().splitlines()]
    assert len(generations) == 2 and all(set(row) == {"prompt", "prediction", "reference"} for row in generations)
    assert [row["reference"] for row in generations] == [row[answer_key] for row in reference_rows[:2]]
    assert generations[0]["prompt"][-1]["role"] == "user"
    results = files.read_json(out / files.EVAL_RESULTS)
    assert results["rouge"]["num_examples"] == 2 and 0.0 <= results["rouge"]["rougeL"] <= 1.0
    summary = files.read_json(out / files.TRAINING_SUMMARY)
    assert summary["run"]["method"] == ("lora" if lora else "full")
    assert (out / files.MODEL_CARD).is_file() and (out / files.LOG_HISTORY_JSON).is_file()
    assert not (out / "training_args.bin").exists()

    reply = chat_reply(out)
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)


# --- the SFT loss mask ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_loss_mask_covers_only_assistant_tokens(tmp_path, tiny_tokenizer, packing):
    tokenizer = tiny_tokenizer
    rows = [
        {"messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
                      {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": " Blue, then"}]},
        {"instruction": "What colour is the sea?", "input": "Think of a calm day.", "output": "The sea is blue."},
    ]
    run = build_sft_trainer(fresh_model(tokenizer), rows, config(HFGPTSFTConfig, tmp_path, packing=packing),
                            tokenizer=tokenizer)
    dataset = run.trainer.train_dataset
    batch = run.trainer.data_collator([dataset[i] for i in range(len(dataset))])
    trained = batch["input_ids"][batch["labels"] != -100].tolist()

    # per conversation: each assistant answer's own tokens and the EOS that ends its turn, nothing else
    def answer_tokens(answers):
        return [token for answer in answers for token in tokenizer(answer, add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id]]

    per_conversation = [answer_tokens(["Red.", " Blue, then"]), answer_tokens(["The sea is blue."])]
    # padded batches keep the order; packing (best-fit decreasing) may reorder the conversations inside a block
    orders = itertools.permutations(per_conversation) if packing else [per_conversation]
    assert any(trained == [token for tokens in order for token in tokens] for order in orders)
    if packing:
        assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # one block, positions restart
        loss = run.trainer.model(**run.trainer._prepare_inputs(batch)).loss
        assert torch.isfinite(loss)


# --- SFT and DPO runs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["dir", "memory"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_trains_and_saves_a_chat_model(tmp_path, base_dir, tiny_tokenizer, source, lora):
    model, tokenizer, starting_weights = starting_model(source, base_dir, tiny_tokenizer)
    rows = instruction_rows(10)
    result = run_sft(model, rows[:8], config(HFGPTSFTConfig, tmp_path / "sft"), tokenizer=tokenizer,
                     eval_dataset=rows[8:], peft_args=peft_args(lora), generation=SHORT)
    assert result.metrics["validation"]["eval_loss"] > 0
    check_outputs(result, starting_weights, lora, source == "dir", rows[8:], "output")


def test_max_eval_prompts_0_skips_the_held_out_generations(tmp_path, tiny_tokenizer):
    rows = instruction_rows(10)
    result = run_sft(fresh_model(tiny_tokenizer), rows[:8], config(HFGPTSFTConfig, tmp_path / "sft"),
                     tokenizer=tiny_tokenizer, eval_dataset=rows[8:],
                     generation=GenerationSettings(max_eval_prompts=0, max_new_tokens=4))
    assert "rouge" not in result.metrics and "validation" in result.metrics
    assert not (tmp_path / "sft" / "generations.jsonl").exists()


@pytest.mark.parametrize("source", ["dir", "memory"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_trains_and_saves_a_chat_model(tmp_path, base_dir, tiny_tokenizer, source, lora):
    model, tokenizer, starting_weights = starting_model(source, base_dir, tiny_tokenizer)
    rows = preference_rows(10)
    result = run_dpo(model, rows[:8], config(HFGPTDPOConfig, tmp_path / "dpo"), tokenizer=tokenizer,
                     eval_dataset=rows[8:], peft_args=peft_args(lora), generation=SHORT)
    preference = result.metrics["preference"]
    assert preference["num_pairs"] == 2 and 0.0 <= preference["reward_accuracy"] <= 1.0
    assert files.read_json(result.output_dir / files.EVAL_RESULTS)["preference"]["num_pairs"] == 2
    pairs = [json.loads(line) for line in (result.output_dir / files.PREFERENCE_PAIRS).read_text().splitlines()]
    assert [pair["rejected"] for pair in pairs] == ["No.", "No."]
    assert preference["reward_accuracy"] == sum(pair["prefers_chosen"] for pair in pairs) / 2 and pairs == result.pairs
    check_outputs(result, starting_weights, lora, source == "dir", rows[8:], "chosen")


def live_hfgpt_models() -> int:
    gc.collect()
    return sum(isinstance(obj, HFGPTForCausalLM) for obj in gc.get_objects())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_reference_is_a_frozen_copy_or_the_adapter_disabled_policy(tmp_path, tiny_tokenizer, lora):
    model = fresh_model(tiny_tokenizer)
    probe = torch.tensor([[3, 100, 101, 0, 4, 102, 0]])
    with torch.no_grad():
        starting_logits = model(probe).logits
    models_before = live_hfgpt_models()
    run = build_dpo_trainer(model, preference_rows(8), config(HFGPTDPOConfig, tmp_path, max_steps=3),
                            tokenizer=tiny_tokenizer, peft_args=peft_args(lora))
    trainer = run.trainer
    if lora:  # no second model: TRL disables the adapters to get the reference log-probabilities
        assert trainer.ref_model is None and live_hfgpt_models() == models_before
    else:
        assert live_hfgpt_models() == models_before + 1
        assert not any(parameter.requires_grad for parameter in trainer.ref_model.parameters())
    trainer.train()

    # back on the CPU, where the starting logits were computed (Trainer moves the models to a GPU where there is one)
    policy = trainer.model.eval().cpu()
    with torch.no_grad():
        assert not torch.allclose(policy(probe).logits, starting_logits)  # the policy moved...
        if lora:
            with policy.disable_adapter():
                reference_logits = policy(probe).logits
        else:
            reference_logits = trainer.ref_model.cpu()(probe).logits
    torch.testing.assert_close(reference_logits, starting_logits)  # ...the reference did not


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_learns_the_preferences_pair_by_pair(tmp_path, tiny_tokenizer, lora):
    rows = preference_rows(8)
    settings = dict(max_steps=12, learning_rate=1e-2 if lora else 1e-3)  # adapters want a higher rate
    run = build_dpo_trainer(fresh_model(tiny_tokenizer), rows, config(HFGPTDPOConfig, tmp_path, **settings),
                            tokenizer=tiny_tokenizer, eval_dataset=rows, peft_args=peft_args(lora))
    from hfgpt.training.preferences import preference_metrics, preference_pairs

    before = preference_pairs(run.trainer)
    assert [(pair["chosen"], pair["rejected"]) for pair in before] == [(row["chosen"], row["rejected"]) for row in rows]
    # policy == reference: no reward. Exactly 0 on CPU; on a GPU the policy's and TRL's reference forward round apart.
    exact = run.trainer.model.device.type == "cpu"
    assert all(pair["reward_chosen"] == pytest.approx(0.0, abs=0 if exact else 1e-3)
               and pair["reward_rejected"] == pytest.approx(0.0, abs=0 if exact else 1e-3) for pair in before)
    if exact:
        assert preference_metrics(run.trainer, before)["reward_accuracy"] == 0.0  # a tie is no preference
    run.trainer.train()
    after = preference_pairs(run.trainer)
    assert all(pair["prefers_chosen"] and pair["margin"] > 0.5 for pair in after)
    metrics = preference_metrics(run.trainer, after)
    assert metrics["reward_accuracy"] == 1.0 and metrics["num_pairs"] == 8
    # the same numbers as TRL's own evaluation (8 pairs in eval batches of 4: its mean of batch means is exact)
    trl_metrics = run.trainer.evaluate()
    assert metrics["reward_margin"] == pytest.approx(trl_metrics["eval_rewards/margins"], rel=1e-4)
    assert metrics["reward_chosen"] == pytest.approx(trl_metrics["eval_rewards/chosen"], rel=1e-4)


@pytest.mark.skipif(not native_bf16(torch.device("cpu"))[0], reason="this CPU computes bf16 by emulation only")
def test_dpo_learns_the_preferences_in_bf16(tmp_path, tiny_tokenizer):
    """hfgpt's default on a CPU with native bf16: DPO under bf16 autocast learns the same pairs as in fp32."""
    from hfgpt.training.preferences import preference_metrics, preference_pairs

    rows = preference_rows(8)
    dpo_config = config(HFGPTDPOConfig, tmp_path, max_steps=12, bf16=None)
    assert dpo_config.bf16 is True  # hfgpt's choice for this CPU
    run = build_dpo_trainer(fresh_model(tiny_tokenizer), rows, dpo_config, tokenizer=tiny_tokenizer,
                            eval_dataset=rows)
    run.trainer.train()
    after = preference_pairs(run.trainer)
    assert all(pair["prefers_chosen"] and pair["margin"] > 0.5 for pair in after)
    assert preference_metrics(run.trainer, after)["reward_accuracy"] == 1.0
    history = [entry for entry in run.trainer.state.log_history if "loss" in entry]
    assert all(entry["tokens_per_second"] > 0 and entry["mfu"] > 0 for entry in history)


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_a_diverged_run_stops_with_a_clear_error(tmp_path, tiny_tokenizer, poison_weights_at, task):
    build, config_class, rows = ((build_sft_trainer, HFGPTSFTConfig, instruction_rows(8)) if task == "sft"
                                 else (build_dpo_trainer, HFGPTDPOConfig, preference_rows(8)))
    run = build(fresh_model(tiny_tokenizer), rows, config(config_class, tmp_path, max_steps=6), tokenizer=tiny_tokenizer)
    run.trainer.add_callback(poison_weights_at(2))
    with pytest.raises(NonFiniteTrainingError, match="diverged by step 3"):
        run.trainer.train()


def test_token_rewards_add_up_to_each_answers_reward(tmp_path, tiny_tokenizer):
    from hfgpt.training.preferences import preference_pairs, token_rewards

    rows = preference_rows(4)
    run = build_dpo_trainer(fresh_model(tiny_tokenizer), rows, config(HFGPTDPOConfig, tmp_path, max_steps=6),
                            tokenizer=tiny_tokenizer, eval_dataset=rows)
    run.trainer.train()
    pairs = preference_pairs(run.trainer)
    for row, pair in zip(rows, pairs):
        rewards = token_rewards(run.trainer.model, run.trainer.ref_model, tiny_tokenizer, row, run.trainer.args.beta)
        assert "".join(token for token, _ in rewards["rejected"]) == "No." + tiny_tokenizer.eos_token
        for kind in ("chosen", "rejected"):
            assert sum(reward for _, reward in rewards[kind]) == pytest.approx(pair[f"reward_{kind}"], abs=1e-4)
        assert any(abs(reward) > 1e-3 for _, reward in rewards["chosen"])  # trained: the policy moved


# --- the command line -------------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_sft_then_dpo_from_the_command_line(tmp_path, base_dir):
    from hfgpt.cli import COMMANDS

    for name, function in (("sft", sft_main), ("dpo", dpo_main)):
        module, attribute, _ = COMMANDS[name]
        assert getattr(importlib.import_module(module), attribute) is function
    common = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
              "--gradient_checkpointing", "false", "--disable_tqdm", "true", "--learning_rate", "1e-3",
              "--validation_split_percentage", "20", "--max_eval_prompts", "2", "--max_new_tokens", "4"]
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    assert sft_main(["--model_name_or_path", str(base_dir), "--output_dir", str(sft_dir),
                     "--train_file", write_jsonl(tmp_path / "instructions.jsonl", instruction_rows(10)), *common]) == 0
    summary = files.read_json(sft_dir / files.TRAINING_SUMMARY)
    assert summary["sft"]["assistant_only_loss"] is True and summary["train_rows"] == 8
    assert summary["validation_rows"] == 2 and summary["base_model"] == str(base_dir)

    assert dpo_main(["--model_name_or_path", str(sft_dir), "--output_dir", str(dpo_dir), "--lora", "--lora_r", "4",
                     "--beta", "0.2", "--loss_type", "ipo",
                     "--train_file", write_jsonl(tmp_path / "preferences.jsonl", preference_rows(10)), *common]) == 0
    summary = files.read_json(dpo_dir / files.TRAINING_SUMMARY)
    assert summary["dpo"]["beta"] == 0.2 and summary["dpo"]["loss_type"] == ["ipo"]
    assert "adapters disabled" in summary["dpo"]["reference_model"]
    assert files.read_json(dpo_dir / files.EVAL_RESULTS)["preference"]["num_pairs"] == 2
    assert len((dpo_dir / files.GENERATIONS).read_text().splitlines()) == 2


# --- bad input --------------------------------------------------------------------------------------------------------


def test_preference_row_without_rejected_is_a_clear_error(tmp_path, tiny_tokenizer):
    rows = preference_rows(3)
    del rows[1]["rejected"]
    with pytest.raises(ValueError, match="row 1 of the training pairs has no 'rejected' field"):
        run_dpo(fresh_model(tiny_tokenizer), rows, config(HFGPTDPOConfig, tmp_path), tokenizer=tiny_tokenizer)


def test_wpo_weighting_with_the_sft_loss_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="use_weighting.*'sft' loss.*Drop 'sft'"):
        HFGPTDPOConfig(str(tmp_path), use_weighting=True, loss_type=["hinge", "sft"], report_to="none")
    assert HFGPTDPOConfig(str(tmp_path), use_weighting=True, loss_type=["hinge"], report_to="none").use_weighting


def test_label_smoothing_a_loss_ignores_is_a_clear_error(tmp_path):
    # TRL's sigmoid loss does not read label_smoothing: asking for it must not silently train plain DPO
    with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect with loss_type \\['sigmoid'\\]"):
        HFGPTDPOConfig(str(tmp_path), label_smoothing=0.1, report_to="none")
    assert HFGPTDPOConfig(str(tmp_path), label_smoothing=0.1, loss_type=["robust", "sft"],
                          report_to="none").label_smoothing == 0.1


def test_tokenizer_without_chat_template_is_a_clear_error(tmp_path, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template.*add_chat_template"):
        run_sft(fresh_model(tokenizer), instruction_rows(4), config(HFGPTSFTConfig, tmp_path), tokenizer=tokenizer)
    # assistant-only loss also needs the template's {% generation %} markers
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    with pytest.raises(ValueError, match="no {% generation %} block"):
        run_sft(fresh_model(tokenizer), instruction_rows(4), config(HFGPTSFTConfig, tmp_path), tokenizer=tokenizer)


def test_prompt_longer_than_the_context_is_a_clear_error(tmp_path, tiny_tokenizer):
    rows = instruction_rows(3)
    rows[2]["instruction"] = "Describe every house on the long mountain road. " * 20
    with pytest.raises(ValueError, match=r"prompt of row 2 of the training rows is \d+ tokens long .* 128 tokens"):
        run_sft(fresh_model(tiny_tokenizer), rows, config(HFGPTSFTConfig, tmp_path), tokenizer=tiny_tokenizer)


def test_in_memory_model_needs_its_tokenizer_and_qlora_needs_a_path(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="in-memory model needs its tokenizer"):
        run_sft(fresh_model(tiny_tokenizer), instruction_rows(4), config(HFGPTSFTConfig, tmp_path))
    with pytest.raises(ValueError, match="--qlora quantises the weights while the model loads"):
        run_sft(fresh_model(tiny_tokenizer), instruction_rows(4), config(HFGPTSFTConfig, tmp_path),
                tokenizer=tiny_tokenizer, peft_args=PeftArguments(qlora=True))


def test_command_line_help_and_bad_input(tmp_path, base_dir, capsys):
    for main in (sft_main, dpo_main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
    assert "--ref_model_name_or_path" in capsys.readouterr().out
    rows = preference_rows(10)
    del rows[3]["rejected"]
    code = dpo_main(["--model_name_or_path", str(base_dir), "--output_dir", str(tmp_path / "dpo"), "--report_to",
                     "none", "--train_file", write_jsonl(tmp_path / "preferences.jsonl", rows)])
    assert code == 1  # a message, not a traceback, and nothing trained
    message = f"hfgpt dpo: error: row 3 of {tmp_path / 'preferences.jsonl'} has no 'rejected' field"
    assert message in capsys.readouterr().err
    assert not (tmp_path / "dpo" / "config.json").exists()


def test_held_out_answers_are_proportionate_to_the_run_and_announced(tmp_path, base_dir, capsys):
    """The commands answer one held-out prompt per 10 training examples by default (at least 8), say how many, and
    --help names the flag; the Python API answers all unless told otherwise."""
    from hfgpt.training.alignment import eval_prompts_for_run

    assert [eval_prompts_for_run(n) for n in (0, 40, 2700)] == [8, 8, 270]
    out = tmp_path / "sft"
    assert sft_main(["--model_name_or_path", str(base_dir), "--output_dir", str(out), "--max_steps", "1",
                     "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
                     "--gradient_checkpointing", "false", "--disable_tqdm", "true", "--max_new_tokens", "2",
                     "--validation_split_percentage", "50",
                     "--train_file", write_jsonl(tmp_path / "instructions.jsonl", instruction_rows(24))]) == 0
    assert len((out / files.GENERATIONS).read_text().splitlines()) == 8  # of 12 held out, after 4 examples
    assert "Answering 8 of 12 held-out prompts" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sft_main(["--help"])
    assert "--max_eval_prompts N sets the number" in " ".join(capsys.readouterr().out.split())


def test_no_pinned_memory_without_a_gpu(tmp_path):
    """torch warns at every dataloader that pinned memory is useless without an accelerator: hfgpt's training
    arguments pin only where there is a GPU."""
    from hfgpt.training.alignment import HFGPTDPOConfig, HFGPTSFTConfig
    from hfgpt.training.classification import ClassificationTrainingArguments
    from hfgpt.training.pretrain import PretrainingArguments

    for arguments in (HFGPTSFTConfig, HFGPTDPOConfig, ClassificationTrainingArguments, PretrainingArguments):
        assert arguments(output_dir=str(tmp_path)).dataloader_pin_memory is torch.cuda.is_available(), arguments
