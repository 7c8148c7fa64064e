"""The model as one object: its kind from the name alone, then resolved once, from
real local Hugging Face folders built here (no downloads)."""

import pickle

import pytest
import torch

from grid.model import HUB, LOCAL, TINY, VOTE, ModelRef
from lamp.errors import LampError


def save_model(folder, config, model_class):
    """A Hugging Face model folder: a tiny model's weights, its config and a tokenizer."""
    from grid.tiny import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog ran far away"] * 10, vocab_size=300)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(d_model=16, d_ff=32, d_kv=4, num_layers=1, num_heads=2, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    return save_model(tmp_path_factory.mktemp("t5"), config, T5ForConditionalGeneration)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, eos_token_id=1, bos_token_id=1)
    return save_model(tmp_path_factory.mktemp("gpt2"), config, GPT2LMHeadModel)


def test_the_kind_is_read_from_the_name_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    assert ModelRef.named("tiny") == ModelRef("tiny", TINY)
    assert ModelRef.named("vote") == ModelRef("vote", VOTE)
    # A hub id: nothing is fetched, so it is named without a network.
    assert ModelRef.named("google/flan-t5-base") == ModelRef("google/flan-t5-base", HUB, "google/flan-t5-base")
    # A folder here, or a name that reads as a path, is a local folder, located absolutely.
    assert ModelRef.named("my-model") == ModelRef("my-model", LOCAL, str(tmp_path / "my-model"))
    assert ModelRef.named("./not-yet").kind == LOCAL and ModelRef.named("./not-yet").path == str(tmp_path / "not-yet")
    assert [ModelRef.named(name).has_weights for name in ("tiny", "vote", "my-model")] == [True, False, True]


def test_a_seq2seq_folder_resolves_as_encoder_decoder_and_loads_so(t5):
    from transformers import T5ForConditionalGeneration

    model = ModelRef.named(t5).resolved()
    assert (model.name, model.kind, model.path, model.node_path, model.decoder_only) == (t5, LOCAL, t5, t5, False)
    assert isinstance(model.load(), T5ForConditionalGeneration)
    assert model.tokenizer()("the cat")["input_ids"][-1] == 1  # the tokenizer saved with it: T5's </s>


def test_a_causal_folder_resolves_as_decoder_only_and_loads_so(gpt2):
    from transformers import GPT2LMHeadModel

    model = ModelRef.named(gpt2).resolved()
    assert model.kind == LOCAL and model.decoder_only is True
    assert isinstance(model.load(), GPT2LMHeadModel)


def test_a_model_that_is_neither_is_refused_with_its_name_and_why(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    with pytest.raises(LampError) as refused:
        ModelRef.named(str(tmp_path / "vit")).resolved()
    message = str(refused.value)
    assert str(tmp_path / "vit") in message and "vit model" in message
    assert "neither as a causal LM (decoder-only) nor as a seq2seq LM (encoder-decoder)" in message


def test_a_missing_folder_or_one_without_a_config_is_refused(tmp_path):
    with pytest.raises(LampError, match="no such model folder: ./no-such-model"):
        ModelRef.named("./no-such-model").resolved()
    from grid.tiny import train_tokenizer

    train_tokenizer(["a b c"], vocab_size=300).save_pretrained(tmp_path / "tokenizer-only")
    with pytest.raises(LampError, match="cannot load model .*tokenizer-only"):
        ModelRef.named(str(tmp_path / "tokenizer-only")).resolved()


def test_tiny_is_built_once_into_the_models_folder_from_the_grids_data(data, tmp_path):
    logged = []
    model = ModelRef.named("tiny").resolved(data, ("LaMP_2",), tmp_path / "models", logged.append)
    assert model.name == "tiny" and model.kind == TINY and model.decoder_only is False
    assert model.path.startswith(str(tmp_path / "models" / "tiny-")) and model.node_path == model.path
    assert logged == [f"building the tiny model into {model.path}"]
    again = []
    assert ModelRef.named("tiny").resolved(data, ("LaMP_2",), tmp_path / "models", again.append) == model
    assert again == []
    # Before it is built, its config is the one it will have (a dry run's memory estimate reads it).
    planned, built = ModelRef.named("tiny").config(), model.config()
    assert (planned.d_model, planned.num_layers, planned.is_encoder_decoder) == \
        (built.d_model, built.num_layers, built.is_encoder_decoder)


def test_vote_has_nothing_to_load():
    model = ModelRef.named("vote").resolved()
    assert model == ModelRef("vote", VOTE) and model.config() is None


def test_a_hub_id_is_left_for_each_node_to_download():
    model = ModelRef("google/flan-t5-base", HUB, "google/flan-t5-base", "google/flan-t5-base", False)
    assert model.for_nodes("/no/cache", other_nodes=True, log=None) == model
    assert model.on_this_node() == "google/flan-t5-base"


def test_a_folder_published_at_a_uri_is_copied_to_the_node_that_loads_it(t5):
    from pathlib import Path

    model = ModelRef.named(t5).resolved()
    published = ModelRef(t5, LOCAL, t5, Path(t5).as_uri(), False)
    here = published.on_this_node()
    assert here != t5 and (Path(here) / "config.json").read_bytes() == (Path(t5) / "config.json").read_bytes()
    assert published.tokenizer()("the cat")["input_ids"] == model.tokenizer()("the cat")["input_ids"]


def test_it_travels_to_workers_whole(t5):
    model = ModelRef.named(t5).resolved()
    assert pickle.loads(pickle.dumps(model)) == model
