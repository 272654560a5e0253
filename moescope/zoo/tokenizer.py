"""The zoo's tokenizer: a byte-level BPE trained on the corpus's training split, saved in Hugging Face format.

Ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>`` (as the repo's test tokenizer, :mod:`moescope.testing.tokenizer`);
encoding prepends ``<s>`` (BOS) like the Mistral tokenizer, so ``AutoTokenizer.from_pretrained(model_dir)("...")``
gives the ids the models were trained on. The instruct model's tokenizer also carries the Mistral-Instruct chat
template (``<s>[INST] question [/INST] answer</s>``).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..testing.tokenizer import SPECIAL_TOKENS

PAD, BOS, EOS = 0, 1, 2
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE of at most ``vocab_size`` tokens (specials first) that prepends ``<s>``."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    if [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] != [PAD, BOS, EOS]:
        raise RuntimeError("the special tokens did not get ids 0, 1, 2")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    return tokenizer


def save_tokenizer(tokenizer, path: Path, chat_template: str | None = None) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer.from_pretrained(path)`` works offline."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<s>",
              "eos_token": "</s>", "model_max_length": 2048, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    if chat_template:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
