"""What DPO taught a policy, measured on held-out preference pairs: each pair's implicit rewards (the file
`preference_pairs.jsonl`), the reward accuracy and margins over all of them, and the per-token rewards of one pair.

The implicit reward of an answer is beta * (log pi(answer | prompt) - log pi_ref(answer | prompt)), summed over the
answer's tokens as DPO's loss sums them; `hfgpt dpo` (hfgpt.training.alignment) reports these after training.
"""

from __future__ import annotations

import torch

from ..data import chat


def preference_pairs(trainer) -> list[dict]:
    """Each of the trainer's held-out pairs, in order, with DPO's implicit rewards: beta * (log pi(answer | prompt) -
    log pi_ref(answer | prompt)), summed over the answer's tokens as DPO's loss sums them (with LD-DPO's `ld_alpha`
    when set). `prefers_chosen` is the pair's share of the reward accuracy; the file of them shows which pairs the
    policy gets wrong."""
    model, tokenizer, beta = trainer.model, trainer.processing_class, trainer.args.beta
    was_training = model.training
    model.eval()
    chosen_rewards, rejected_rewards = [], []
    try:
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            with torch.no_grad():
                chosen, rejected = _answer_log_probs(model, batch, trainer.ld_alpha)
                if "ref_chosen_logps" in batch:  # precompute_ref_log_probs=True
                    ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
                else:  # TRL's own reference pass: the frozen model, or the policy with its adapters disabled
                    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model or model, batch)
            chosen, rejected = trainer.accelerator.gather_for_metrics((beta * (chosen - ref_chosen),
                                                                      beta * (rejected - ref_rejected)))
            chosen_rewards += chosen.float().tolist()
            rejected_rewards += rejected.float().tolist()
    finally:
        model.train(was_training)

    def text(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    return [{"prompt": text(row["prompt_ids"]), "chosen": text(row["chosen_ids"]), "rejected": text(row["rejected_ids"]),
             "reward_chosen": chosen, "reward_rejected": rejected, "margin": chosen - rejected,
             "prefers_chosen": chosen > rejected}
            for row, chosen, rejected in zip(trainer.eval_dataset, chosen_rewards, rejected_rewards)]


def _answer_log_probs(model, batch, ld_alpha: float | None):
    """Summed log-probabilities of the chosen and the rejected answers (the batch holds all chosen rows, then all
    rejected ones, as TRL's collator builds it). The forward goes through the LM head TRL fuses into the model, which
    returns each token's log-probability (0 outside the answer)."""
    inputs = {key: value for key, value in batch.items()
              if key not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    answer_mask = batch["completion_mask"][:, 1:]
    per_token = model(**inputs, labels=labels, use_cache=False, fused_lm_head=True).log_probs[:, -answer_mask.size(1):]
    if ld_alpha is None:
        return per_token.sum(dim=1).chunk(2)
    # LD-DPO: tokens beyond the shorter answer's length count ld_alpha times
    position = answer_mask.cumsum(dim=1)
    shared = torch.minimum(*answer_mask.sum(dim=1).chunk(2)).repeat(2).unsqueeze(1)
    shared_mask, tail_mask = (position > 0) & (position <= shared), position > shared
    return ((per_token * shared_mask).sum(dim=1) + ld_alpha * (per_token * tail_mask).sum(dim=1)).chunk(2)


def preference_metrics(trainer, pairs: list[dict] | None = None) -> dict:
    """Reward accuracy (how often the policy prefers `chosen` over `rejected` relative to the reference) and the mean
    rewards and margin over the held-out pairs, from `preference_pairs` (pass them if already computed), plus
    TRL's evaluation loss. Exact means over the pairs (TRL's own eval metrics average per-batch means)."""
    pairs = preference_pairs(trainer) if pairs is None else pairs
    raw = trainer.evaluate()  # TRL names its metrics eval_* whatever metric_key_prefix says

    def mean(key: str) -> float:
        return sum(float(pair[key]) for pair in pairs) / len(pairs) if pairs else float("nan")

    return {
        "reward_accuracy": mean("prefers_chosen"),
        "reward_margin": mean("margin"),
        "reward_chosen": mean("reward_chosen"),
        "reward_rejected": mean("reward_rejected"),
        "loss": raw["eval_loss"],
        "num_pairs": len(pairs),
        "beta": trainer.args.beta,
        "loss_type": list(trainer.args.loss_type),
    }


def token_rewards(model, ref_model, tokenizer, row: dict, beta: float = 0.1) -> dict[str, list[tuple[str, float]]]:
    """Where a preference pair's implicit rewards come from, token by token: for each token of the chosen and of the
    rejected answer, beta * (log pi(token | prompt, answer so far) - log pi_ref(the same)), the answers rendered with
    the chat template as DPO renders them. Each answer's tokens sum to its reward in preference_pairs.jsonl (plain
    DPO weighting, no `ld_alpha`). The tokens show what the policy learned to like and dislike beyond the one
    margin: a rude word's negative reward can be outweighed by formatting the policy learned to favour
    (bench/alignment_experiments.md).

        rewards = token_rewards(policy, reference, tokenizer, {"instruction": ..., "chosen": ..., "rejected": ...})
        [(token, round(reward, 2)) for token, reward in rewards["rejected"]]

    `row`: a preference row in any shape `hfgpt.data.chat` reads; `model` / `ref_model`: the policy and the
    reference (for a LoRA policy, its merged model and the model it started from)."""
    example = chat.preference_example(row)
    prompt = list(tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
    result = {}
    for kind in ("chosen", "rejected"):
        # the chat template closes an assistant turn with the EOS token, inside the part DPO scores
        answer = tokenizer(example[kind][-1]["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        log_ratio = 0.0
        for network, sign in ((model, 1.0), (ref_model, -1.0)):
            was_training = network.training
            network.eval()
            ids = torch.tensor([prompt + answer], device=next(network.parameters()).device)
            with torch.no_grad():
                log_probs = network(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            network.train(was_training)
            per_token = log_probs.gather(1, ids[0, 1:, None])[len(prompt) - 1:, 0].cpu()
            log_ratio = log_ratio + sign * per_token
        result[kind] = [(tokenizer.decode([token]), beta * float(value)) for token, value in zip(answer, log_ratio)]
    return result


__all__ = ["preference_metrics", "preference_pairs", "token_rewards"]
