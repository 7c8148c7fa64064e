"""Decoding a cell's rows: each worker generates for its share, in batches of
similar length, and every worker gets all the predictions."""

import math

from grid.order import pad
from grid.trial.hardware import all_gather
from lamp.recipes import get_recipe


def load_tokenizer(model_ref):
    """The model's tokenizer (model_ref: a grid.model.ModelRef), with a pad token for
    decoding in batches: a causal LM's may have none, and its eos pads then."""
    tokenizer = model_ref.tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def generate(model, device, tokenizer, rows: list, settings: dict, beams: int, decoder_only: bool,
             synced_gpus: bool) -> list:
    """Predictions for this worker's rows, in order. Decoded in batches of similar
    length (sorted, then put back), so that little of a batch is padding."""
    import torch

    recipe = get_recipe(settings["recipe"])
    decoding = recipe.decoding(settings["task"], beams, decoder_only)
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]))
    predictions = [None] * len(rows)
    with torch.no_grad():
        for start in range(0, len(order), settings["eval_batch_size"]):
            picked = order[start:start + settings["eval_batch_size"]]
            ids = [rows[i]["prompt_ids"] for i in picked]
            input_ids = pad(ids, tokenizer.pad_token_id, left=decoder_only).to(device)
            mask = pad([[1] * len(s) for s in ids], 0, left=decoder_only).to(device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=tokenizer.pad_token_id,
                                 repetition_penalty=settings["repetition_penalty"], synced_gpus=synced_gpus,
                                 **decoding)
            if decoder_only:
                out = out[:, input_ids.shape[1]:]
            for i, text in zip(picked, tokenizer.batch_decode(out, skip_special_tokens=True)):
                predictions[i] = recipe.answer(text, decoder_only)
    return predictions


def evaluate_rows(model, device, tokenizer, rows: list, settings: dict, beams: int, decoder_only: bool,
                  zero_stage: int) -> list:
    """The predictions for all rows, in order, each worker generating for its share; every worker gets all."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Equal shares (the last row repeated) so that ZeRO-3's synced generation lines up.
    share = math.ceil(len(rows) / world) if rows else 0
    padded = rows + rows[-1:] * (share * world - len(rows))
    mine = padded[rank * share:(rank + 1) * share]
    predictions = generate(model, device, tokenizer, mine, settings, beams, decoder_only,
                           synced_gpus=zero_stage == 3 and world > 1)
    return [p for part in all_gather(predictions) for p in part][:len(rows)]
