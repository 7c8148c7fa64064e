"""The `tiny` model: a small T5 built from a config, with a tokenizer trained on
the data, saved as a local Hugging Face model folder.

It is loaded through the same `from_pretrained` path as google/flan-t5-base, so
tests and the demo exercise the real code and never touch a hub.
"""

import json
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from grid.storage import build_atomically, digest
from lamp.data import find_splits, read_examples
from lamp.prompts import ITEM_SEPARATOR
from lamp.retrieval import document_text
from lamp.tasks import get_task

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0 (also the decoder start), eos 1, unk 2
# Small enough to fine-tune a cell in seconds on one CPU thread (about 200k
# parameters), big enough to learn to copy a tag or title words from the
# retrieved items: the demo's personalized cells beat `none` with it.
TINY_CONFIG = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4,
               "relative_attention_num_buckets": 16, "dropout_rate": 0.0, "feed_forward_proj": "relu",
               "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": True}
TOKENIZER_VOCAB = 4000  # at most: a small data set may give fewer
# Its schedule: a high rate, no weight decay, a few epochs, prompts of half the study's 512 tokens, greedy
# decoding with a repetition penalty that keeps a title from repeating a word.
TINY_TRAINING = {"epochs": 3, "lr": 3e-3, "weight_decay": 0, "batch_size": 16, "beams": 1,
                 "max_prompt_tokens": 256, "repetition_penalty": 1.3}


def training_texts(data_dir, tasks):
    """Every text the model will read or write: inputs, outputs, profile items,
    and the prompt templates' own words."""
    for split in find_splits(data_dir, tasks):
        spec = get_task(split.task)
        for example in read_examples(split):
            yield example.input
            if example.output is not None:
                yield example.output
            for item in example.profile:
                yield document_text(split.task, item)
        yield from spec.labels or ()
        yield from (spec.item_template.format(input="x", output="y"), spec.output_lead, spec.input_lead,
                    f"x{spec.profile_joiner or ''}y{ITEM_SEPARATOR}z")


def train_tokenizer(texts, vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer (GPT-2's) with T5's special tokens, trained on the texts.

    Byte-level: any text can be encoded. GPT-2's pre-tokenizer splits quotes off
    words, so a tag quoted in a prompt ('"violence"') and the same tag as the
    answer ('violence') share a token, which a tiny model can then copy."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    # T5 ends every sequence with </s>.
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_config(vocab_size: int = TOKENIZER_VOCAB):
    """The tiny model's T5 config; by default at the tokenizer's largest vocabulary
    (what a grid's memory estimate reads before the model is built)."""
    from transformers import T5Config  # heavy: only where the tiny model is sized or built

    return T5Config(vocab_size=vocab_size, **TINY_CONFIG)


def tiny_model(data_dir, tasks, models_dir, log=print) -> Path:
    """The tiny model of a grid's tasks and data directory, built once into models_dir:
    one per set of tasks and data, since its tokenizer is trained on their texts."""
    folder = Path(models_dir) / f"tiny-{digest(sorted(tasks), data_dir, sorted(TINY_CONFIG.items()))}"
    if not (folder / "config.json").exists():
        log(f"building the tiny model into {folder}")
    return build_tiny_model(data_dir, tasks, folder)


def build_tiny_model(data_dir, tasks, out_dir) -> Path:
    """Writes the tiny model folder once (atomically) and returns its path."""
    def build(tmp: Path) -> None:
        import torch  # heavy: only where a tiny model is built
        from transformers import T5ForConditionalGeneration

        tokenizer = train_tokenizer(training_texts(data_dir, tasks))
        torch.manual_seed(0)  # the same weights from the same data, every time
        T5ForConditionalGeneration(tiny_config(len(tokenizer))).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lamp_grid.json").write_text(json.dumps({"built_from": str(data_dir), "tasks": list(tasks)}))

    out_dir = Path(out_dir)
    build_atomically(out_dir, build)
    return out_dir


# A small BERT encoder, for dense retrieval (Contriever, grid/embed.py) without a hub.
TINY_ENCODER_CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "max_position_embeddings": 128}
ENCODER_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's, in its order


def train_wordpiece(texts, vocab_size: int = TOKENIZER_VOCAB, max_length: int = 128):
    """A WordPiece tokenizer (BERT's: lower-cased, [CLS] text [SEP]) trained on the texts;
    it truncates to max_length tokens, what the encoder's positions hold."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                                                 special_tokens=ENCODER_SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(token, backend.token_to_id(token)) for token in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_length)


def build_tiny_encoder(data_dir, tasks, out_dir, seed: int = 0) -> Path:
    """Writes a small BERT encoder folder (weights drawn with `seed`, a WordPiece
    tokenizer trained on the data) once, atomically, and returns its path."""
    def build(tmp: Path) -> None:
        import torch  # heavy: only where an encoder is built
        from transformers import BertConfig, BertModel

        tokenizer = train_wordpiece(training_texts(data_dir, tasks),
                                    max_length=TINY_ENCODER_CONFIG["max_position_embeddings"])
        torch.manual_seed(seed)
        BertModel(BertConfig(vocab_size=len(tokenizer), **TINY_ENCODER_CONFIG)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    out_dir = Path(out_dir)
    build_atomically(out_dir, build)
    return out_dir
