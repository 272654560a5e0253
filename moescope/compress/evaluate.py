"""``evaluate``: perplexity of a checkpoint on documents of text (to compare a model with its compressed versions).

Each text is a document encoded on its own with BOS prepended (``moescope.dynamic.inputs.encode_documents``):
texts longer than ``context`` tokens (default: the model's ``max_position_embeddings``) are split, and encoding
stops once ``max_tokens`` tokens are collected. Every token after the first of a document is predicted from the
tokens before it; ``loss`` is the mean negative log-likelihood (nats) over those predicted tokens,
``perplexity = exp(loss)``, ``tokens`` their number.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..arch.adapter import open_model
from ..dynamic.forward import batches
from ..dynamic.inputs import InputError, documents_hash, encode_documents
from ..dynamic.loader import load_model, load_tokenizer, resolve_device, resolve_dtype
from .calibrate import model_context


def evaluate(path: str | Path, texts: Sequence[str], *, max_tokens: int | None = 4096, context: int | None = None,
             batch_size: int = 8, device: str = "auto", dtype: str = "auto", progress: bool = True) -> dict:
    """``{"perplexity", "loss", "tokens", "documents", "documents_sha256"}`` of the checkpoint at ``path``.

    Documents longer than ``context`` tokens (default: the model's ``max_position_embeddings``) are split; give
    the training sequence length for models that never saw longer sequences."""
    model = open_model(path)
    tokenizer = load_tokenizer(model)
    documents = encode_documents(tokenizer, list(texts), model_context(model, context), max_tokens)
    predicted = sum(len(d.ids) - 1 for d in documents)
    if predicted < 1:
        raise InputError("the evaluation text gives no token to predict (each document needs at least one token "
                         "after BOS): give more text")
    device = resolve_device(device)
    net = load_model(model, device, resolve_dtype(dtype, device))
    input_device = "cpu" if device == "map" else device
    nll, count = 0.0, 0
    bar = tqdm(total=predicted, desc="evaluate", unit="tok", disable=not progress)
    with torch.inference_mode():
        for group in batches(documents, batch_size):
            width = max(len(d.ids) for d in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, doc in enumerate(group):
                ids[row, :len(doc.ids)] = torch.tensor(doc.ids)
                mask[row, :len(doc.ids)] = 1
            logits = net(input_ids=ids.to(input_device), attention_mask=mask.to(input_device),
                         use_cache=False).logits
            for row, doc in enumerate(group):
                n = len(doc.ids) - 1
                if n < 1:
                    continue
                target = ids[row, 1:n + 1].to(logits.device)
                nll += float(F.cross_entropy(logits[row, :n].float(), target, reduction="sum").double())
                count += n
            bar.update(sum(len(d.ids) - 1 for d in group))
    bar.close()
    del net
    loss = nll / count
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": count, "documents": len(documents),
            "documents_sha256": documents_hash(documents)}
