"""A small byte-level BPE tokenizer for tiny checkpoints, so text can be traced through them."""
from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 (the builder sets the config's token ids to match)

_TEXT = """As an open source alternative to Chat GPT, I do not have personal opinions. However, I can provide
objective information about Chat GPT's capabilities and limitations based on its architecture and training data.
Mixture of experts models route every token to a few experts chosen by a router. The experts are feed forward
networks; the router is a linear layer followed by a softmax. Neurons act like fine grained experts, and the
router usually selects experts with larger output norms. Expert diversity increases with depth, while the last
layer is an outlier. The quick brown fox jumps over the lazy dog. Valkyria Chronicles is a tactical role playing
game developed by Sega. The river flows through the valley towards the sea, and the town grew along its banks.
"""


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """Train a byte-level BPE of at most ``vocab_size`` tokens and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_TEXT.split("\n"), trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<s>",
              "eos_token": "</s>", "model_max_length": 4096, "add_bos_token": True}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
