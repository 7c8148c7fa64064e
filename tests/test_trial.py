"""The trial's pieces (grid/trial/) that decide hardware, batches, decoding,
checkpoints and a cell's end, each checked on its own; the whole trial runs in
test_run.py."""

import json

import pytest
import torch

from grid.trial.decoding import generate, load_tokenizer
from grid.trial.hardware import all_reduce, deepspeed_config, micro_batch, native_bf16, spread_over
from grid.trial.loop import Clock, finish
from grid.trial.weights import BestEpoch, BestWeights, portable_config

SETTINGS = {"batch_size": 6, "lr": 1e-3, "weight_decay": 0.0, "warmup": 0.1}


@pytest.mark.parametrize("world, micro", [(1, 6), (2, 3), (3, 2), (6, 1)])
def test_the_grid_batch_is_the_global_batch_whatever_the_workers(world, micro):
    config = deepspeed_config(SETTINGS, 2, 100, False, world)
    assert config["train_batch_size"] == 6
    assert config["train_micro_batch_size_per_gpu"] == micro
    assert micro * config["gradient_accumulation_steps"] * world == 6


def test_a_batch_that_does_not_split_over_the_workers_is_refused():
    with pytest.raises(ValueError, match="batch_size 6 cannot be split evenly over 4 workers"):
        micro_batch(6, 4)


def test_no_bf16_on_a_cpu():
    assert native_bf16(torch.device("cpu")) is False


def worker_sees(config):
    """A Train worker's view: the accelerator DeepSpeed picks, and a sum over the workers."""
    import json
    import os

    import ray.train

    from grid.trial.hardware import worker_device

    # What a CPU head ships in its job's environment must not decide for the worker.
    os.environ["DS_ACCELERATOR"] = config["shipped"]
    device = worker_device({"settings": {"deterministic": True}, "threads": 1})
    from deepspeed.accelerator import get_accelerator

    rank = ray.train.get_context().get_world_rank()
    total, most = all_reduce([rank + 1.0, 10.0], device), all_reduce([rank + 1.0], device, op="max")
    if rank == 0:
        with open(config["out"], "w") as out:
            json.dump({"device": device.type, "accelerator": get_accelerator().device_name(), "total": total,
                       "most": most}, out)


def test_a_worker_decides_its_device_and_sums_over_workers_on_it(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "seen.json"
    trainer = TorchTrainer(worker_sees, train_loop_config={"shipped": "cuda", "out": str(out)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
                           run_config=RunConfig(name="worker-sees", storage_path=str(tmp_path)))
    trainer.fit()
    metrics = json.loads(out.read_text())
    assert metrics["device"] == "cpu" and metrics["accelerator"] == "cpu"
    assert metrics["total"] == [3.0, 20.0] and metrics["most"] == [2.0]


def tiny_seq2seq(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from grid.tiny import train_tokenizer

    texts = ["the cat sat on the mat", "a dog ran far away", "news of the day", "stars and tags and titles"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8,
                                                num_layers=1, num_heads=2, decoder_start_token_id=0,
                                                pad_token_id=0, eos_token_id=1))
    return model, tokenizer


def test_decoding_in_batches_sorted_by_length_keeps_the_rows_order(tmp_path):
    model, tokenizer = tiny_seq2seq(tmp_path)
    prompts = ["the cat", "a dog ran far away and the cat sat on the mat", "news", "stars and tags",
               "the day of the dog", "a", "titles and tags and stars and news of the day"]
    rows = [{"prompt_ids": tokenizer(p)["input_ids"]} for p in prompts]
    settings = {"task": "LaMP_4", "repetition_penalty": 1.0, "recipe": "lamp"}
    one_by_one = generate(model, torch.device("cpu"), tokenizer, rows, {**settings, "eval_batch_size": 1}, 1,
                          False, False)
    batched = generate(model, torch.device("cpu"), tokenizer, rows, {**settings, "eval_batch_size": 3}, 1,
                       False, False)
    assert batched == one_by_one
    assert len(set(one_by_one)) > 1  # the rows differ, so a shuffled order would show


def test_a_decoder_only_model_under_the_study_recipe_decodes_as_its_llama_2_did(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from grid.tiny import train_tokenizer

    tokenizer = train_tokenizer(["Answer: the cat sat\n on the \"mat\"", "a dog ran far away"] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                       pad_token_id=0, eos_token_id=1))
    rows = [{"prompt_ids": tokenizer(p + "\nAnswer:")["input_ids"]} for p in ("the cat", "a dog ran")]
    settings = {"task": "LaMP_4", "repetition_penalty": 1.0, "recipe": "study", "eval_batch_size": 2}
    predictions = generate(model, torch.device("cpu"), tokenizer, rows, settings, 1, True, False)
    # 128 sampled tokens of an untrained model, read as the study read them: one line, no quotes.
    assert len(predictions) == 2
    assert all("\n" not in p and not p.startswith('"') and "Answer:" not in p for p in predictions)


def files_in(directory) -> list:
    return sorted(p.name for p in directory.iterdir())


def test_best_weights_are_kept_per_epoch_and_pruned_to_what_states_point_to(tmp_path):
    best = BestWeights(str(tmp_path / "best"))
    for epoch in (0, 2, 3):
        best.save({"w": torch.full((2,), float(epoch))}, epoch)
    assert best.load(2)["w"].tolist() == [2.0, 2.0]
    assert best.load(-1) is None
    best.keep_only({2, 3})
    assert files_in(tmp_path / "best") == ["epoch-2.pt", "epoch-3.pt"]
    uri = BestWeights((tmp_path / "best").as_uri())  # the same through a URI, as s3:// would be
    assert uri.load(3)["w"].tolist() == [3.0, 3.0]


def test_the_best_epoch_is_the_one_that_improved_and_a_retry_reads_its_weights_back(tmp_path):
    """Lower is better (LaMP_3's MAE): epoch 1 is the best. An epoch's file goes once
    neither of the last two saved training states points to it."""
    engine = type("Engine", (), {"module": torch.nn.Linear(2, 1)})()
    best = BestEpoch(str(tmp_path / "best"), higher_is_better=False)
    for epoch, metric in enumerate([0.9, 0.4, 0.6]):
        with torch.no_grad():
            engine.module.weight.fill_(float(epoch))
        best.offer(metric, epoch, engine, zero_stage=0, rank=0)
        if epoch == 0:
            best.checkpointed(rank=0)
    assert (best.metric, best.epoch, best.state["weight"].tolist()) == (0.4, 1, [[1.0, 1.0]])
    assert files_in(tmp_path / "best") == ["epoch-0.pt", "epoch-1.pt"]
    best.checkpointed(rank=0)  # a state that points to epoch 1; the one before, to epoch 0, may be the newest committed
    assert files_in(tmp_path / "best") == ["epoch-0.pt", "epoch-1.pt"]
    best.checkpointed(rank=0)
    assert files_in(tmp_path / "best") == ["epoch-1.pt"]
    retry = BestEpoch(str(tmp_path / "best"), higher_is_better=False)
    retry.resume(best.as_saved())
    assert (retry.metric, retry.epoch, retry.saved) == (0.4, 1, 1)
    assert retry.state["weight"].tolist() == [[1.0, 1.0]]


class RecordedLog:
    """What finish() writes to a cell's run, kept in memory."""

    def __init__(self):
        self.metrics_logged, self.results_logged = [], []

    def metrics(self, metrics: dict, step: int = 0) -> None:
        self.metrics_logged.append(metrics)

    def results(self, task, ids, golds, predictions, rows, ds_config) -> None:
        self.results_logged.append((task, ids, golds, predictions, ds_config))


def test_a_cell_ends_with_its_dev_metrics_then_its_measures_logged_by_rank_0_only():
    rows = [{"id": "a", "output": "3"}, {"id": "b", "output": "5"}]
    log = RecordedLog()
    final = finish(log, "LaMP_3", rows, ["3", "4"], {"n_params": 7}, {"bf16": {"enabled": False}})
    assert final == {"dev_MAE": 0.5, "dev_RMSE": pytest.approx(0.5 ** 0.5), "n_params": 7}
    assert list(final) == ["dev_MAE", "dev_RMSE", "n_params"]
    assert log.metrics_logged == [final]
    assert log.results_logged == [("LaMP_3", ["a", "b"], ["3", "5"], ["3", "4"], {"bf16": {"enabled": False}})]
    assert finish(None, "LaMP_3", rows, ["3", "4"], {}) == {"dev_MAE": 0.5, "dev_RMSE": pytest.approx(0.5 ** 0.5)}


def test_training_speeds_count_the_steps_only_and_a_retry_that_trained_nothing_has_none():
    clock = Clock(loop_start=100.0)
    assert clock.speeds(torch.device("cpu")) == {}
    clock.train_s, clock.checkpoint_s, clock.examples, clock.tokens, clock.loop_end = 2.0, 1.0, 8, 100, 104.0
    assert clock.speeds(torch.device("cpu")) == {"train_s": 2.0, "train_examples_per_s": 4.0,
                                                 "train_tokens_per_s": 50.0, "checkpoint_s": 1.0,
                                                 "checkpoint_share": 0.25}


def test_a_model_spread_over_gpus_takes_this_workers_gpus_only():
    mine = [torch.device("cuda", 1), torch.device("cuda", 3)]  # of the node's 0-3, which Ray shows every worker
    assert spread_over(mine, lambda device: 80 * 10 ** 9) == {1: 72 * 10 ** 9, 3: 72 * 10 ** 9}


def test_a_logged_models_config_says_whether_its_head_is_tied_as_its_weights_do(tmp_path):
    """transformers 4 reads T5's tie_word_embeddings as: tie the head and scale the
    outputs. A head of its own (Flan-T5's) must be saved as untied to load alike."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSeq2SeqLM

    model, tokenizer = tiny_seq2seq(tmp_path)
    portable_config(model)
    assert model.config.tie_word_embeddings is True  # one matrix, as the tiny model has it
    # A checkpoint with a head of its own, as Flan-T5's is written.
    state = {name: value.clone().contiguous() for name, value in model.state_dict().items()}
    state["lm_head.weight"] = torch.randn_like(state["shared.weight"])
    raw = {k: v for k, v in model.config.to_dict().items() if k != "scale_decoder_outputs"}
    flan_like = tmp_path / "flan-like"
    flan_like.mkdir()
    (flan_like / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": False}))
    save_file(state, str(flan_like / "model.safetensors"), metadata={"format": "pt"})
    untied = AutoModelForSeq2SeqLM.from_pretrained(flan_like)
    assert untied.lm_head.weight is not untied.shared.weight
    portable_config(untied)
    untied.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["scale_decoder_outputs"] is False
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "saved")
    ids = tokenizer(["the cat sat on the mat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, decoder_input_ids=ids[:, :3]).logits,
                           untied(input_ids=ids, decoder_input_ids=ids[:, :3]).logits)


def test_a_tokenizer_without_a_pad_token_pads_with_its_eos(tmp_path):
    from transformers import GPT2Config

    from grid.model import ModelRef
    from grid.tiny import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat", "a dog ran"] * 5, vocab_size=300)
    tokenizer.pad_token = None  # as GPT-2's and Llama's come
    tokenizer.save_pretrained(tmp_path)
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    model = ModelRef.named(str(tmp_path)).resolved()
    assert model.tokenizer().pad_token_id is None
    padded = load_tokenizer(model)
    assert padded.pad_token_id == padded.eos_token_id == 1
