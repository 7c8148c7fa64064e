"""grid.memory against hand computations: parameter counts of known model shapes, the
ZeRO bytes per parameter and what each stage divides, and the activation formulas.

Configs are built in code; nothing is downloaded.
"""

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    LlamaConfig,
    T5Config,
)

from grid.memory import (
    MemoryEstimate,
    count_parameters,
    cross_attention_bytes,
    estimate_memory,
    model_shape,
)

GPT2_SMALL_PARAMS = 124_439_808  # GPT2Config() defaults, the published GPT-2 small count


def flan_t5_base_config():
    return T5Config(d_model=768, d_ff=2048, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def small_llama_config():
    """Llama-shaped, with grouped-query attention: 4 query heads share 2 K/V heads."""
    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000)


def estimate(config, params, **overrides):
    settings = {"micro_batch": 4, "prompt_tokens": 96, "output_tokens": 32, "workers": 1, "gpus_per_worker": 1,
                "zero_stage": 0, "bf16": True, "training": True, "beams": 4}
    return estimate_memory(config, params, **{**settings, **overrides})


# --- counting parameters --------------------------------------------------------------


@pytest.fixture
def meta_only(monkeypatch):
    """Fails a count that would build real weights, before it allocates them (a 7B model
    is 27 GB in fp32), and records the models built."""
    built = []
    for auto in (AutoModelForCausalLM, AutoModelForSeq2SeqLM):
        def from_config(config, _original=auto.from_config, **kwargs):
            assert torch.empty(0).device.type == "meta", "count_parameters would materialize the weights"
            model = _original(config, **kwargs)
            built.append(model)
            return model
        monkeypatch.setattr(auto, "from_config", from_config)
    return built


def test_counts_on_the_meta_device(meta_only):
    count_parameters(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    count_parameters(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100))
    assert [type(model).__name__ for model in meta_only] == ["GPT2LMHeadModel", "T5ForConditionalGeneration"]
    assert all(p.device.type == "meta" for model in meta_only for p in model.parameters())


def test_counts_gpt2_small(meta_only):
    h, vocab, positions, layers = 768, 50257, 1024, 12
    block = (2 * h  # ln_1
             + h * 3 * h + 3 * h  # c_attn: Q, K, V with biases
             + h * h + h  # attention c_proj
             + 2 * h  # ln_2
             + h * 4 * h + 4 * h  # c_fc
             + 4 * h * h + h)  # mlp c_proj
    # The LM head is tied to the token embeddings: counted once.
    expected = vocab * h + positions * h + layers * block + 2 * h
    assert expected == GPT2_SMALL_PARAMS
    assert count_parameters(GPT2Config()) == expected


def test_counts_flan_t5_base_shape(meta_only):
    h, d_ff, vocab, layers, buckets_x_heads = 768, 2048, 32128, 12, 32 * 12
    attention = 4 * h * h  # q, k, v, o without biases (12 heads x d_kv 64 = 768)
    gated_ffn = 2 * h * d_ff + d_ff * h  # wi_0, wi_1, wo
    encoder = layers * (attention + gated_ffn + 2 * h) + buckets_x_heads + h  # RMS norms, relative bias, final norm
    decoder = layers * (2 * attention + gated_ffn + 3 * h) + buckets_x_heads + h  # plus cross-attention
    body = vocab * h + encoder + decoder  # the shared embedding, once
    assert body == 222_903_552
    # Flan-T5's checkpoint holds its LM head apart: 247,577,856 parameters in all, as
    # loaded (transformers 5 ties T5's head in from_config, whatever the config says).
    assert count_parameters(flan_t5_base_config()) == body + vocab * h == 247_577_856
    # The original t5-base's config ties it (and its ReLU feed-forward of 3072 has as many weights): counted once.
    assert count_parameters(T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64,
                                     vocab_size=32128)) == 222_903_552


def test_counts_llama_with_grouped_query_attention(meta_only):
    h, inter, vocab, layers, kv_width = 256, 512, 1000, 2, 2 * 64
    layer = h * h + 2 * h * kv_width + h * h + 3 * h * inter + 2 * h  # q, k, v, o, SwiGLU MLP, two RMS norms
    expected = vocab * h + layers * layer + h + vocab * h  # embeddings, layers, final norm, untied LM head
    assert count_parameters(small_llama_config()) == expected == 1_692_928


def test_counts_llama_2_7b_without_its_memory(meta_only):
    h, inter, vocab, layers = 4096, 11008, 32000, 32  # LlamaConfig() defaults: Llama-2-7B
    expected = 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h
    assert count_parameters(LlamaConfig()) == expected == 6_738_415_616


def test_count_leaves_the_config_alone(meta_only):
    # from_config picks an attention implementation and writes it into the config it is given.
    config = GPT2Config()
    before = copy.deepcopy(vars(config))
    count_parameters(config)
    assert vars(config) == before


# --- reading configs ------------------------------------------------------------------


def test_reads_shapes_of_t5_gpt2_and_llama():
    t5 = model_shape(T5Config(d_model=512, num_heads=8, d_kv=32, num_layers=6, num_decoder_layers=2, vocab_size=100))
    assert (t5.encoder_decoder, t5.encoder_layers, t5.decoder_layers) == (True, 6, 2)
    assert (t5.hidden, t5.heads, t5.kv_width, t5.vocab) == (512, 8, 8 * 32, 100)

    gpt2 = model_shape(GPT2Config(n_layer=3, n_embd=96, n_head=4, vocab_size=200))
    assert (gpt2.encoder_decoder, gpt2.encoder_layers, gpt2.decoder_layers) == (False, 0, 3)
    assert (gpt2.hidden, gpt2.heads, gpt2.kv_width, gpt2.vocab) == (96, 4, 96, 200)

    llama = model_shape(small_llama_config())
    assert (llama.encoder_decoder, llama.decoder_layers, llama.hidden, llama.heads) == (False, 2, 256, 4)
    assert (llama.kv_width, llama.vocab) == (2 * 64, 1000)


def test_a_model_neither_causal_nor_seq2seq_is_refused_as_a_grid_refuses_it():
    from transformers import ViTConfig

    from lamp.errors import LampError

    for read in (model_shape, count_parameters):
        with pytest.raises(LampError, match="is a vit model, which transformers loads neither as a causal LM"):
            read(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2))


# --- training -------------------------------------------------------------------------


def test_gpt2_training_in_bf16_by_hand():
    p = GPT2_SMALL_PARAMS
    b, s, h, a, layers, vocab = 4, 96 + 32, 768, 12, 12, 50257  # decoder-only: s = prompt + output
    per_layer = s * b * h * (34 + 5 * a * s / h)  # Korthikanti et al. 2022, 16-bit
    logits = b * s * vocab * 4
    assert layers * per_layer + logits == 310_544_384

    got = estimate(GPT2Config(), p, micro_batch=4, prompt_tokens=96, output_tokens=32)
    assert got == MemoryEstimate(weights=2 * p, gradients=2 * p, optimizer=12 * p,
                                 activations=layers * per_layer + logits)
    assert got.total == 16 * p + 310_544_384


def test_fp32_training_doubles_weights_gradients_and_layer_activations():
    p = GPT2_SMALL_PARAMS
    b, s, h, a, layers, vocab = 2, 64, 768, 12, 12, 50257
    per_layer = s * b * h * (34 + 5 * a * s / h)
    got = estimate(GPT2Config(), p, micro_batch=b, prompt_tokens=48, output_tokens=16, bf16=False)
    # fp32 Adam keeps no separate master copy: 8 bytes of optimizer state, not 12.
    assert (got.weights, got.gradients, got.optimizer) == (4 * p, 4 * p, 8 * p)
    assert got.activations == 2 * layers * per_layer + b * s * vocab * 4  # the fp32 logits do not double


def test_t5_training_activations_by_hand():
    b, s_enc, s_dec, h, a, layers, vocab = 2, 512, 16, 768, 12, 12, 32128
    encoder_layer = s_enc * b * h * (34 + 5 * a * s_enc / h)  # 58,195,968
    decoder_self = s_dec * b * h * (34 + 5 * a * s_dec / h)  # 866,304
    # Cross-attention: queries over the output, keys and values over the prompt.
    cross = b * h * (9 * s_dec + 4 * s_enc) + 5 * a * b * s_dec * s_enc  # 4,349,952
    logits = b * s_dec * vocab * 4  # only decoder positions are scored
    expected = layers * encoder_layer + layers * (decoder_self + cross) + logits
    assert expected == 765_059_072

    got = estimate(flan_t5_base_config(), 1, micro_batch=b, prompt_tokens=s_enc, output_tokens=s_dec)
    assert got.activations == expected


def test_cross_attention_of_equal_lengths_is_an_attention_block_and_a_layer_norm():
    s, b, h, a = 64, 3, 256, 8
    # Korthikanti: attention block 11sbh + 5as^2b, a layer norm 2sbh.
    assert cross_attention_bytes(s, s, b, h, a) == 11 * s * b * h + 5 * a * s * s * b + 2 * s * b * h


ZERO_DIVIDES = {0: set(), 1: {"optimizer"}, 2: {"optimizer", "gradients"}, 3: {"optimizer", "gradients", "weights"}}


@pytest.mark.parametrize("stage", sorted(ZERO_DIVIDES))
def test_zero_stage_divides_exactly_its_parts_by_the_workers(stage):
    p, workers = GPT2_SMALL_PARAMS, 4
    alone = estimate(GPT2Config(), p, zero_stage=0, workers=1)
    sharded = estimate(GPT2Config(), p, zero_stage=stage, workers=workers, gpus_per_worker=2)
    for part in ("weights", "gradients", "optimizer"):
        expected = getattr(alone, part) / (workers if part in ZERO_DIVIDES[stage] else 1)
        assert getattr(sharded, part) == expected, part
    assert sharded.activations == alone.activations  # each worker runs its own micro batch


def test_zero_3_over_8_workers_by_hand():
    p = 1_000_000
    got = estimate(GPT2Config(), p, zero_stage=3, workers=8)
    assert (got.weights, got.gradients, got.optimizer) == (2 * p / 8, 2 * p / 8, 12 * p / 8)


# --- inference (zero-shot) ------------------------------------------------------------


def test_zero_shot_has_no_gradients_or_optimizer():
    for config in (GPT2Config(), flan_t5_base_config(), small_llama_config()):
        got = estimate(config, 1000, training=False, zero_stage=3, workers=4)
        assert (got.gradients, got.optimizer) == (0, 0)
        assert got.weights > 0 and got.activations > 0


def test_zero_shot_llama_by_hand():
    p = 1_692_928
    b, beams, s_prompt, s_out, h, a, layers, kv_width, vocab = 3, 4, 40, 8, 256, 4, 2, 2 * 64, 1000
    sequences = b * beams
    kv_cache = 2 * layers * sequences * (s_prompt + s_out) * kv_width * 2  # K and V, bf16, GQA width
    prefill = s_prompt * sequences * h * (34 + 5 * a * s_prompt / h)  # one layer's working set
    scores = sequences * vocab * 4
    assert kv_cache + prefill + scores == 5_199_744

    got = estimate(small_llama_config(), p, training=False, micro_batch=b, beams=beams, prompt_tokens=s_prompt,
                   output_tokens=s_out, gpus_per_worker=2)
    assert got == MemoryEstimate(weights=2 * p / 2, gradients=0, optimizer=0, activations=5_199_744)


def test_zero_shot_t5_in_fp32_by_hand():
    p = 222_903_552
    b, beams, s_enc, s_dec, h, a, layers, vocab = 2, 4, 512, 16, 768, 12, 12, 32128
    sequences = b * beams
    # Self-attention cache over the output and cross-attention cache over the prompt, 4-byte values.
    kv_cache = 2 * layers * sequences * (s_dec + s_enc) * h * 4
    encoder_pass = 2 * s_enc * b * h * (34 + 5 * a * s_enc / h) + sequences * s_enc * h * 4
    scores = sequences * vocab * 4
    got = estimate(flan_t5_base_config(), p, training=False, bf16=False, micro_batch=b, beams=beams,
                   prompt_tokens=s_enc, output_tokens=s_dec, gpus_per_worker=1)
    assert got == MemoryEstimate(weights=4 * p, gradients=0, optimizer=0,
                                 activations=kv_cache + encoder_pass + scores)


@pytest.mark.parametrize("gpus, divisor", [(0.5, 1), (1, 1), (4, 4)])
def test_zero_shot_weights_spread_over_whole_gpus(gpus, divisor):
    got = estimate(GPT2Config(), 1000, training=False, gpus_per_worker=gpus)
    assert got.weights == 2 * 1000 / divisor


# --- growth, errors, description ------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("config", [GPT2Config(), flan_t5_base_config(), small_llama_config()],
                         ids=["gpt2", "t5", "llama"])
def test_total_grows_with_batch_and_prompt_length(config, training):
    base = estimate(config, 1000, training=training, micro_batch=2, prompt_tokens=64).total
    assert estimate(config, 1000, training=training, micro_batch=4, prompt_tokens=64).total > base
    assert estimate(config, 1000, training=training, micro_batch=2, prompt_tokens=128).total > base


@pytest.mark.parametrize("bad", [{"zero_stage": -1}, {"zero_stage": 4}, {"workers": 0}, {"micro_batch": 0},
                                 {"beams": 0}, {"prompt_tokens": -1}, {"gpus_per_worker": -1}])
def test_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        estimate(GPT2Config(), 1000, **bad)


def test_describe_is_one_line_in_gb():
    got = MemoryEstimate(weights=0.5e9, gradients=0.5e9, optimizer=3.0e9, activations=10.2e9)
    assert got.describe() == "14.2 GB/GPU (weights 0.5, gradients 0.5, optimizer 3.0, activations 10.2)"
