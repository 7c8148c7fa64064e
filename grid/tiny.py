"""The `tiny` model: a small T5 built from a config, with a tokenizer trained on
the data, saved as a local Hugging Face model folder.

It is loaded through the same `from_pretrained` path as google/flan-t5-base, so
tests and the demo exercise the real code and never touch a hub.
"""

import json
import os
import shutil
import string
import tempfile
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

from lamp.data import find_splits, read_examples
from lamp.retrieval import document_text
from lamp.tasks import get_task

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0 (also the decoder start), eos 1, unk 2
TINY_CONFIG = dict(d_model=128, d_ff=512, d_kv=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=16, dropout_rate=0.0, feed_forward_proj="relu",
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)


def training_texts(data_dir, tasks):
    """Every text the model will read or write: inputs, outputs and profile items."""
    for split in find_splits(data_dir, tasks):
        spec = get_task(split.task)
        for example in read_examples(split):
            yield example.input
            if example.output is not None:
                yield example.output
            for item in example.profile:
                yield document_text(split.task, item)
        yield from spec.labels or ()


def train_tokenizer(texts, vocab_size: int = 4000):
    """A byte-pair tokenizer with T5's special tokens, trained on the texts."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    # Every printable character gets a token: prompts quote and bracket things
    # that the raw data may never show.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False, initial_alphabet=list(string.printable.strip()))
    backend.train_from_iterator(texts, trainer)
    # T5 ends every sequence with </s>.
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def build_tiny_model(data_dir, tasks, out_dir) -> Path:
    """Writes the tiny model folder once (atomically) and returns its path."""
    from transformers import T5Config, T5ForConditionalGeneration

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = train_tokenizer(training_texts(data_dir, tasks))
    config = T5Config(vocab_size=len(tokenizer), **TINY_CONFIG)
    model = T5ForConditionalGeneration(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lamp_grid.json").write_text(json.dumps({"built_from": str(data_dir), "tasks": list(tasks)}))
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
