"""Estimated peak GPU memory of a grid cell's trial, per GPU, so that `run --dry-run`
can show it and `run` can refuse a cell that cannot fit the GPUs it asks for.

An estimate, by part, of what one trial worker's process allocates on its device:

Training (DeepSpeed, data parallel over N = `workers` workers, one device each):
  - weights, gradients, optimizer: bytes per parameter as in the ZeRO paper
    (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
    Parameter Models", section 3.1): with bf16 mixed precision 2 + 2 + 12 (fp32 master
    weights 4, Adam's m and v 8); in fp32 4 + 4 + 8. ZeRO stage 1 divides the optimizer
    states by N, stage 2 the gradients too, stage 3 the weights too (ZeRO section 5).
  - activations, stored for the backward pass without recomputation: per transformer
    layer s*b*h*(34 + 5*a*s/h) bytes in 16-bit, twice that in fp32 (Korthikanti et al.
    2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1), with
    s the sequence length, b the micro batch, h the hidden size, a the attention heads.
    Decoder-only: every layer sees s = prompt + output tokens. Encoder-decoder: encoder
    layers s = prompt tokens, decoder layers s = output tokens, plus each decoder layer's
    cross-attention (see `cross_attention_bytes`). Plus the logits kept in fp32 for the
    loss, b * (decoder positions) * vocab * 4 bytes.

Inference only (zero-shot, Hugging Face generate with beam search): no gradients and no
optimizer; the weights (2 bytes a parameter in bf16, else 4) spread over the worker's GPUs
by device_map="auto"; activations are the beam search's KV cache plus the working set of
one forward pass (see `inference_activation_bytes`).

The activation formulas assume GPT-shaped layers (a 4h MLP), so for T5's gated FFN and
Llama's SwiGLU they are approximations. Nothing counts the CUDA context, allocator
fragmentation or DeepSpeed's communication buckets (together often 1-3 GB), so a total
near a GPU's size will not fit: leave headroom.
"""

import copy
from dataclasses import dataclass

from grid.model import auto_class, decoder_only

GB = 1e9  # describe() prints decimal gigabytes, the unit its label says

# Bytes per parameter for (weights, gradients, optimizer states), by precision (ZeRO, section 3.1).
BF16_BYTES = (2, 2, 12)  # bf16 weights and gradients; fp32 master weights (4) + Adam m, v (8)
FP32_BYTES = (4, 4, 8)  # fp32 weights and gradients; Adam m, v (8), no separate master copy

# The first of these config attributes that is set names each size (T5, GPT-2, Llama, BART).
HIDDEN_NAMES = ("d_model", "n_embd", "hidden_size")
HEAD_NAMES = ("num_heads", "n_head", "num_attention_heads", "encoder_attention_heads")
DECODER_ONLY_LAYER_NAMES = ("num_hidden_layers", "n_layer", "num_layers")
ENCODER_LAYER_NAMES = ("num_layers", "encoder_layers", "num_hidden_layers")
DECODER_LAYER_NAMES = ("num_decoder_layers", "decoder_layers", "num_layers")


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak GPU memory of one GPU of a cell's trial, in bytes, by part."""
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        """One line in GB, e.g. "14.2 GB/GPU (weights 0.5, gradients 0.5, optimizer 3.0, activations 10.2)"."""
        return (f"{self.total / GB:.1f} GB/GPU (weights {self.weights / GB:.1f}, "
                f"gradients {self.gradients / GB:.1f}, optimizer {self.optimizer / GB:.1f}, "
                f"activations {self.activations / GB:.1f})")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Hugging Face config that the estimate needs."""
    encoder_decoder: bool
    encoder_layers: int  # 0 for a decoder-only model
    decoder_layers: int
    hidden: int  # h
    heads: int  # a
    kv_width: int  # width of the cached K (or V) per token: kv heads * head dim, below h under GQA
    vocab: int


def _first_set(config, names: tuple) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(f"{type(config).__name__} has none of {', '.join(names)}")


def model_shape(config) -> ModelShape:
    """The layer counts, hidden size, heads and vocabulary a T5, GPT-2 or Llama config states."""
    encoder_decoder = not decoder_only(config)
    hidden = _first_set(config, HIDDEN_NAMES)
    heads = _first_set(config, HEAD_NAMES)
    # T5 states its head size (d_kv, also read as head_dim), Llama its KV heads; GPT-2 neither.
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if encoder_decoder:
        encoder_layers = _first_set(config, ENCODER_LAYER_NAMES)
        decoder_layers = _first_set(config, DECODER_LAYER_NAMES)
    else:
        encoder_layers, decoder_layers = 0, _first_set(config, DECODER_ONLY_LAYER_NAMES)
    return ModelShape(encoder_decoder, encoder_layers, decoder_layers, hidden, heads, kv_heads * head_dim,
                      _first_set(config, ("vocab_size",)))


def count_parameters(model_config) -> int:
    """Parameters of the model a Hugging Face config describes, counted on torch's meta
    device (the Auto class that loads it, .from_config), so no weights are loaded or
    downloaded."""
    # Imported here: the rest of this module is arithmetic, cheap to import for a dry run.
    import torch

    auto = auto_class(decoder_only(model_config))
    with torch.device("meta"):  # shapes only: a 7B model costs no memory here
        model = auto.from_config(copy.deepcopy(model_config))  # from_config may set fields on its config
    # parameters() yields a tied matrix (e.g. embeddings shared with the LM head) once, as memory holds it once.
    total = sum(p.numel() for p in model.parameters())
    # transformers 5 ties T5's LM head to its embeddings in from_config whatever the config
    # says, keeping a config's tie_word_embeddings: false as scale_decoder_outputs: false;
    # such a checkpoint (T5 v1.1, Flan-T5) holds its head apart, and loading unties it.
    head = model.get_output_embeddings()
    if getattr(model_config, "scale_decoder_outputs", True) is False and head is not None and (
            head.weight is model.get_input_embeddings().weight):
        total += head.weight.numel()
    return total


def layer_activation_bytes(seq: int, batch: int, hidden: int, heads: int) -> float:
    """One transformer layer's stored activations in 16-bit, no recomputation (Korthikanti
    et al. 2022, eq. 1): attention 11sbh + 5as^2b, MLP 19sbh, two layer norms 4sbh."""
    return seq * batch * hidden * (34 + 5 * heads * seq / hidden)


def cross_attention_bytes(query_seq: int, key_seq: int, batch: int, hidden: int, heads: int) -> float:
    """A decoder layer's cross-attention block and its layer norm, in 16-bit.

    Korthikanti's attention terms with queries of length s_q (the output) and keys and
    values of length s_k (the prompt): Q projection input, Q, output projection input,
    dropout mask and layer-norm input 9*s_q*b*h; K and V 4*s_k*b*h; scores, softmax
    dropout mask and dropped-out scores 5*a*s_q*s_k*b. With s_q = s_k = s this is the
    self-attention block plus a layer norm, 13sbh + 5as^2b. The encoder output that feeds
    K and V is stored once for all layers, and left out as small.
    """
    return batch * hidden * (9 * query_seq + 4 * key_seq) + 5 * heads * batch * query_seq * key_seq


def training_activation_bytes(shape: ModelShape, micro_batch: int, prompt_tokens: int, output_tokens: int,
                              bf16: bool) -> float:
    """Activations kept for the backward pass of one micro batch, plus the fp32 logits."""
    b, h, a = micro_batch, shape.hidden, shape.heads
    if shape.encoder_decoder:
        layers = (shape.encoder_layers * layer_activation_bytes(prompt_tokens, b, h, a)
                  + shape.decoder_layers * (layer_activation_bytes(output_tokens, b, h, a)
                                            + cross_attention_bytes(output_tokens, prompt_tokens, b, h, a)))
        scored_positions = output_tokens
    else:
        layers = shape.decoder_layers * layer_activation_bytes(prompt_tokens + output_tokens, b, h, a)
        scored_positions = prompt_tokens + output_tokens  # the LM head runs over the whole sequence
    precision = 1 if bf16 else 2  # Korthikanti counts 16-bit values; fp32 doubles them
    logits = b * scored_positions * shape.vocab * 4  # upcast to fp32 for the cross-entropy loss
    return layers * precision + logits


def inference_activation_bytes(shape: ModelShape, micro_batch: int, prompt_tokens: int, output_tokens: int,
                               bf16: bool, beams: int) -> float:
    """Generation's peak besides the weights: the beam search's KV cache, full length, plus
    one forward pass's working set.

    KV cache: 2 (K and V) * decoder layers * (b*beams) * length * kv width * bytes, where
    length is prompt + output for a decoder-only model; for an encoder-decoder model the
    self-attention cache holds the output tokens and the cross-attention cache the prompt.
    Working set: without autograd a forward pass frees each layer's intermediates once the
    next layer has them, so we count one layer's Korthikanti activations (an upper bound:
    no dropout masks at inference) for the prefill of the prompt, at batch b*beams for a
    decoder-only model; for an encoder-decoder model the encoder runs once at batch b and
    its output, copied for every beam, stays for all decoding steps. Plus one step's fp32
    beam scores, b*beams*vocab*4.
    """
    value_bytes = 2 if bf16 else 4
    precision = value_bytes / 2  # layer_activation_bytes counts 16-bit values
    sequences = micro_batch * beams
    h, a = shape.hidden, shape.heads
    kv_cache = 2 * shape.decoder_layers * sequences * (prompt_tokens + output_tokens) * shape.kv_width * value_bytes
    if shape.encoder_decoder:
        forward_pass = (layer_activation_bytes(prompt_tokens, micro_batch, h, a) * precision
                        + sequences * prompt_tokens * h * value_bytes)
    else:
        forward_pass = layer_activation_bytes(prompt_tokens, sequences, h, a) * precision
    step_scores = sequences * shape.vocab * 4
    return kv_cache + forward_pass + step_scores


def estimate_memory(model_config, params: int, *, micro_batch: int, prompt_tokens: int, output_tokens: int,
                    workers: int, gpus_per_worker: float, zero_stage: int, bf16: bool, training: bool,
                    beams: int) -> MemoryEstimate:
    """Estimated peak memory of one GPU of a trial: `params` parameters (count_parameters)
    of the model `model_config` describes, `workers` Ray Train workers of `gpus_per_worker`
    GPUs each.

    It is what one worker's process allocates on its device: where `gpus_per_worker` is a
    fraction, several workers share a GPU, and their estimates add up on it.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, not {zero_stage!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers!r}")
    for name, value in (("micro_batch", micro_batch), ("beams", beams)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value!r}")
    for name, value in (("params", params), ("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens),
                        ("gpus_per_worker", gpus_per_worker)):
        if value < 0:
            raise ValueError(f"{name} must not be negative, not {value!r}")
    shape = model_shape(model_config)

    if not training:
        # device_map="auto" spreads the layers over the worker's whole GPUs; a fraction of one holds them all.
        gpus = max(1, int(gpus_per_worker))
        weights = params * (2 if bf16 else 4) / gpus
        activations = inference_activation_bytes(shape, micro_batch, prompt_tokens, output_tokens, bf16, beams)
        return MemoryEstimate(weights, 0.0, 0.0, activations)

    # DeepSpeed drives one device per worker, so the data-parallel degree is the worker count.
    data_parallel = workers
    weight_bytes, gradient_bytes, optimizer_bytes = BF16_BYTES if bf16 else FP32_BYTES
    return MemoryEstimate(
        weights=params * weight_bytes / (data_parallel if zero_stage >= 3 else 1),
        gradients=params * gradient_bytes / (data_parallel if zero_stage >= 2 else 1),
        optimizer=params * optimizer_bytes / (data_parallel if zero_stage >= 1 else 1),
        activations=training_activation_bytes(shape, micro_batch, prompt_tokens, output_tokens, bf16),
    )
