"""Train the zoo: tiny causal LMs of the study's families on the shipped corpus, saved in their real layouts.

    python -m moescope.zoo.train --out moescope/zoo/models --threads 1    # what ships (~17 CPU-minutes)
    python -m moescope.zoo.train --out ./zoo-build --steps 5 --only mixtral-tiny   # + its parent mistral-tiny

``--threads`` defaults to 2 (the cores of the reference machine); the shipped models were trained with one thread
per process, two processes side by side (see ``models/README.md``), because two threads stall each other badly
when the machine is busy with other work. Results are reproducible for a given thread count.

Every model is a row of :data:`MODELS` (family, config sizes, how it is initialised, what it is trained on,
steps, learning rate); every family a row of :data:`FAMILIES` (how its tensors map to the on-disk names).
Deterministic from ``--seed``: the tokenizer, model initialisation, upcycling noise and data order depend on
nothing else (bit-identical reruns need the same machine and thread count).

Each model directory holds the family's real ``config.json`` (the published config with tiny sizes), the weights
in bfloat16 under the real tensor names and shard naming (checked against the layout of
``moescope/arch/families/<family>.json`` and by loading with ``from_pretrained``), the tokenizer, and
``zoo.json`` (what was trained, how, and the validation losses). ``training.json`` and ``README.md`` in ``--out``
summarise all models.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import data as corpus
from ..arch.adapter import MoEModel
from ..arch.registry import get_family
from ..arch.spec import MATRICES
from ..checkpoint import Checkpoint
from ..testing.builder import build_checkpoint, tiny_config
from ..writer import atomic_write_json, write_checkpoint
from .tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, save_tokenizer, train_tokenizer

VOCAB_SIZE = 2048
SEQ_LEN = 256
_BASE = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 2048}


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class ModelSpec:
    """One zoo model. ``init``: "scratch", "upcycle:<parent>" (every expert a copy of the parent's dense FFN plus
    ``noise`` × its std, router random, other tensors and :data:`INHERITED` config values copied) or
    "finetune:<parent>" (the parent's weights and config). ``data``: "corpus" or "instruct"."""

    name: str
    family: str
    sizes: Mapping[str, Any]
    init: str
    data: str
    steps: int
    lr: float
    warmup: int
    description: str
    batch: int = 8
    seq_len: int = SEQ_LEN
    aux_loss: float = 0.01      # router load-balancing loss coefficient (MoE models), E * sum_e f_e * P_e
    noise: float = 0.01         # upcycling: relative std of the noise added to each expert copy
    num_shards: int = 1
    weight_decay: float = 0.1

    @property
    def parent(self) -> str | None:
        return self.init.split(":", 1)[1] if ":" in self.init else None


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("mistral-tiny", "mistral",
              {**_BASE, "intermediate_size": 256, "num_key_value_heads": 2},
              init="scratch", data="corpus", steps=1200, lr=3e-3, warmup=50,
              description="dense Mistral layout, the study's dense reference F"),
    ModelSpec("mixtral-tiny", "mixtral",
              {**_BASE, "intermediate_size": 256, "num_key_value_heads": 2, "num_local_experts": 8,
               "num_experts_per_tok": 2},
              init="upcycle:mistral-tiny", data="corpus", steps=600, lr=1.5e-3, warmup=30, num_shards=2,
              description="Mixtral layout, 8 experts top-2, upcycled from mistral-tiny"),
    ModelSpec("mixtral-tiny-instruct", "mixtral",
              {**_BASE, "intermediate_size": 256, "num_key_value_heads": 2, "num_local_experts": 8,
               "num_experts_per_tok": 2},
              init="finetune:mixtral-tiny", data="instruct", steps=100, lr=5e-4, warmup=10, num_shards=2,
              description="mixtral-tiny fine-tuned on the instruction pairs"),
    ModelSpec("deepseek-tiny", "deepseek",
              {**_BASE, "intermediate_size": 256, "num_key_value_heads": 4, "moe_intermediate_size": 64,
               "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 2, "first_k_dense_replace": 1},
              init="scratch", data="corpus", steps=800, lr=3e-3, warmup=50, num_shards=2,
              description="DeepSeekMoE layout: 16 fine-grained routed experts top-4 (not renormalised) "
                          "+ 2 shared, layer 0 dense"),
    ModelSpec("grok1-tiny", "grok1",
              {**_BASE, "intermediate_size": 256, "num_key_value_heads": 2, "num_experts": 8,
               "num_experts_per_tok": 2, "embedding_multiplier_scale": 8.0, "attn_output_multiplier": 0.25},
              init="scratch", data="corpus", steps=800, lr=3e-3, warmup=50, num_shards=2,
              description="Grok-1 layout (.bin shards), 8 experts top-2 (not renormalised), GELU experts"),
)


def _mixtral_to_disk(state: dict[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """transformers 5 Mixtral (router ``mlp.gate``, fused ``mlp.experts.gate_up_proj [E, 2I, H]`` and
    ``down_proj [E, H, I]``) -> the published names (``block_sparse_moe.gate``, per expert ``w1``/``w3``/``w2``)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts"
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = gate[e], up[e]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts"
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = value[e]
        else:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value
    return out


def _same_names(state: dict[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    return dict(state)


@dataclass(frozen=True)
class FamilyIO:
    """How a family's model class is found and how its ``state_dict`` maps to the published tensor names."""

    classes: Callable[[], tuple[type, type]]
    to_disk: Callable[[dict, Mapping], dict] = _same_names


def _transformers_classes(config_name: str, model_name: str) -> Callable[[], tuple[type, type]]:
    def get():
        import transformers
        return getattr(transformers, config_name), getattr(transformers, model_name)
    return get


def _moescope_classes(family: str) -> Callable[[], tuple[type, type]]:
    def get():
        from ..modeling import MODELING
        return MODELING[family]
    return get


FAMILIES: dict[str, FamilyIO] = {
    "mistral": FamilyIO(_transformers_classes("MistralConfig", "MistralForCausalLM")),
    "mixtral": FamilyIO(_transformers_classes("MixtralConfig", "MixtralForCausalLM"), _mixtral_to_disk),
    "deepseek": FamilyIO(_moescope_classes("deepseek")),
    "grok1": FamilyIO(_moescope_classes("grok1")),
}


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class Data:
    """Tokenised corpus and instruction data (built once per run)."""

    tokenizer: Any
    train: torch.Tensor                 # [N] token stream: <s> document </s> ...
    validation: torch.Tensor
    instruct_train: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt ids, answer ids)
    instruct_validation: list[tuple[list[int], list[int]]] = field(default_factory=list)
    unigram: torch.Tensor | None = None  # [V] log-probabilities from the training stream (add-one)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def _slice(texts: list[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return texts
    out, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        out.append(text[: max_chars - total])
        total += len(out[-1])
    return out


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):  # the post-processor prepends <s>
        ids.extend(enc.ids)
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def is_instruct_validation(question: str) -> bool:
    return int(hashlib.sha1(question.encode()).hexdigest(), 16) % 10 == 0


def load_data(vocab_size: int = VOCAB_SIZE, max_chars: int | None = None) -> Data:
    """Train the tokenizer on the training split and tokenise everything (``max_chars`` slices each split)."""
    train_texts = _slice([d.text for d in corpus.documents("train")], max_chars)
    val_texts = _slice([d.text for d in corpus.documents("validation")], None if max_chars is None else max_chars // 10)
    tokenizer = train_tokenizer(train_texts, vocab_size)
    data = Data(tokenizer, _stream(tokenizer, train_texts), _stream(tokenizer, val_texts))
    pairs = corpus.instruct_pairs()
    if max_chars is not None:
        pairs = pairs[: max(20, max_chars // 2000)]
    for question, answer in pairs:
        prompt = tokenizer.encode(f"[INST] {question} [/INST]").ids
        reply = tokenizer.encode(" " + answer, add_special_tokens=False).ids + [EOS]
        (data.instruct_validation if is_instruct_validation(question) else data.instruct_train).append((prompt, reply))
    counts = torch.bincount(data.train, minlength=data.vocab_size).double() + 1.0
    data.unigram = (counts / counts.sum()).log()
    return data


def corpus_rows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def instruct_rows(pairs: list[tuple[list[int], list[int]]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily pack ``<s>[INST] q [/INST] a</s>`` examples into rows; labels are -100 except on the answers."""
    rows, labels, row, lab = [], [], [], []
    for prompt, reply in pairs:
        ids, mask = prompt + reply, [-100] * len(prompt) + reply
        ids, mask = ids[:seq_len], mask[:seq_len]
        if len(row) + len(ids) > seq_len:
            rows.append(row + [PAD] * (seq_len - len(row)))
            labels.append(lab + [-100] * (seq_len - len(lab)))
            row, lab = [], []
        row, lab = row + ids, lab + mask
    if row:
        rows.append(row + [PAD] * (seq_len - len(row)))
        labels.append(lab + [-100] * (seq_len - len(lab)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def training_set(spec: ModelSpec, data: Data, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    if spec.data == "instruct":
        return instruct_rows(data.instruct_train if split == "train" else data.instruct_validation, spec.seq_len)
    rows = corpus_rows(data.train if split == "train" else data.validation, spec.seq_len)
    return rows, rows


# -------------------------------------------------------------------------------------------------- models
def model_config(spec: ModelSpec, vocab_size: int) -> dict:
    """The family's published config.json with the tiny sizes, this tokenizer's vocabulary and special ids."""
    config = tiny_config(spec.family, sizes={**spec.sizes, "vocab_size": vocab_size})
    for key, token_id in (("pad_token_id", PAD), ("bos_token_id", BOS), ("eos_token_id", EOS)):
        if key in config:
            config[key] = token_id
    return config


def build_model(spec: ModelSpec, config: Mapping) -> torch.nn.Module:
    config_class, model_class = FAMILIES[spec.family].classes()
    return model_class(config_class(**config)).float()


def expected_layout(spec: ModelSpec, config: Mapping) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the family's real layout for this config, from the repo's layout builder."""
    sizes = {k: v for k, v in config.items() if k in set(spec.sizes) | {"vocab_size"}}
    return dict(_layout(spec.family, json.dumps(sizes, sort_keys=True)))


@lru_cache(maxsize=32)
def _layout(family: str, sizes: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(family, tmp, sizes=json.loads(sizes), num_shards=1, tokenizer=False, seed=0)
        with Checkpoint(tmp) as ckpt:
            return tuple((name, tuple(ckpt.info(name).shape)) for name in ckpt)


def disk_tensors(spec: ModelSpec, model: torch.nn.Module, config: Mapping) -> dict[str, torch.Tensor]:
    """The trained weights under the published names, checked against the family's layout."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = FAMILIES[spec.family].to_disk(state, config)
    expected = expected_layout(spec, config)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in expected:
        tensors.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight, not stored (as published)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors) if tuple(tensors[n].shape) != expected[n])
    if missing or extra or wrong:
        raise RuntimeError(f"{spec.name}: tensors do not match the {spec.family} layout: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}, wrong shape {wrong[:5]}")
    return {name: tensors[name] for name in expected}


def save_model(spec: ModelSpec, tensors: Mapping[str, torch.Tensor], config: Mapping, path: Path,
               dtype: torch.dtype = torch.bfloat16, tokenizer=None) -> None:
    layout = get_family(spec.family).layout
    path.mkdir(parents=True, exist_ok=True)
    for old in list(path.glob("*.safetensors")) + list(path.glob("*.bin")) + list(path.glob("*.index.json")):
        old.unlink()
    write_checkpoint(path, config, {k: v.to(dtype).contiguous() for k, v in tensors.items()},
                     fmt=layout.get("format", "safetensors"), num_shards=spec.num_shards,
                     shard_name=layout.get("shard_name", "model-{index:05d}-of-{count:05d}.safetensors"),
                     index_name=layout.get("index_name", "model.safetensors.index.json"))
    if tokenizer is not None:
        save_tokenizer(tokenizer, path, CHAT_TEMPLATE if spec.data == "instruct" else None)


def load_model(spec: ModelSpec, path: Path) -> torch.nn.Module:
    """``from_pretrained`` with every tensor accounted for (no missing, unexpected or mismatched keys)."""
    _, model_class = FAMILIES[spec.family].classes()
    model, info = model_class.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"{spec.name}: loading {path} with {model_class.__name__} reported {problems}")
    return model.float()


def read_disk_tensors(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as ckpt:
        return {name: ckpt.read(name).float() for name in ckpt}


def upcycle(spec: ModelSpec, dense: Mapping[str, torch.Tensor], config: Mapping, seed: int) -> dict[str, torch.Tensor]:
    """The MoE's on-disk tensors from a dense checkpoint's: shared tensors copied, every expert = the dense FFN
    of its layer + ``noise`` × (that matrix's std) Gaussian noise, routers ~ N(0, initializer_range)."""
    fam, dense_fam = get_family(spec.family), get_family(get_spec(spec.parent).family)
    gen = torch.Generator().manual_seed(seed)
    moe = MoEModel.from_config(config, fam)
    out: dict[str, torch.Tensor] = {}
    expected = expected_layout(spec, config)
    experts = {}
    for layer in moe.moe_layers:
        for m in MATRICES:
            src = fam.experts.source(m)
            if src.packing != "per_expert":
                raise NotImplementedError(f"upcycling into {spec.family}: experts are not stored per expert")
            for e in range(moe.num_experts):
                experts[src.name.format(layer=layer, expert=e)] = dense_fam.dense.source(m).name.format(layer=layer)
        out[fam.router.name.format(layer=layer)] = torch.randn(
            expected[fam.router.name.format(layer=layer)], generator=gen) * float(config.get("initializer_range", 0.02))
    for name, shape in expected.items():
        if name in experts:
            base = dense[experts[name]]
            out[name] = base + spec.noise * base.std() * torch.randn(base.shape, generator=gen)
        elif name not in out:
            if name not in dense:
                raise KeyError(f"upcycling {spec.name}: {name} has no counterpart in {spec.parent}")
            out[name] = dense[name].clone()
        if tuple(out[name].shape) != tuple(shape):
            raise ValueError(f"upcycling {spec.name}: {name} has shape {tuple(out[name].shape)}, expected {shape}")
    return out


def router_modules(spec: ModelSpec, model: torch.nn.Module, config: Mapping) -> list[torch.nn.Module]:
    fam = get_family(spec.family)
    if not fam.is_moe:
        return []
    moe = MoEModel.from_config(config, fam)
    ex = fam.execution
    return [model.get_submodule(f"{ex.layers}.{layer}.{ex.router}") for layer in moe.moe_layers]


class RouterLoss:
    """Switch-style load balancing ``E * sum_e f_e P_e`` averaged over MoE layers, from the routers' own logits."""

    def __init__(self, routers: Sequence[torch.nn.Module], top_k: int, logits_at: int | None):
        self.top_k, self.logits_at, self.logits = top_k, logits_at, []
        self.handles = [r.register_forward_hook(self._hook) for r in routers]

    def _hook(self, module, args, output):
        logits = output if self.logits_at is None else output[self.logits_at]
        self.logits.append(logits.reshape(-1, logits.shape[-1]))

    def pop(self) -> torch.Tensor | None:
        if not self.logits:
            return None
        losses = []
        for logits in self.logits:
            probs = logits.float().softmax(-1)
            chosen = probs.topk(self.top_k, dim=-1).indices
            frac = torch.zeros_like(probs[0]).scatter_add_(0, chosen.flatten(), torch.ones(chosen.numel()))
            frac = frac / chosen.numel()
            losses.append(probs.shape[-1] * (frac * probs.mean(0)).sum())
        self.logits = []
        return torch.stack(losses).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# -------------------------------------------------------------------------------------------- train / eval
@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: torch.Tensor, labels: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over every labelled target position."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        logits = model(input_ids=rows[i:i + batch]).logits[:, :-1].float()
        target = labels[i:i + batch, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return total / max(count, 1)


def unigram_loss(data: Data, labels: torch.Tensor) -> float:
    target = labels[:, 1:].flatten()
    target = target[target != -100]
    return float(-data.unigram[target].mean())


def lr_at(step: int, spec: ModelSpec, steps: int) -> float:
    warmup = min(spec.warmup, max(steps // 10, 1))
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(spec: ModelSpec, model: torch.nn.Module, config: Mapping, rows: torch.Tensor, labels: torch.Tensor,
          steps: int, seed: int, log: Callable[[str], None]) -> dict:
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95), eps=1e-8)
    fam = get_family(spec.family)
    aux = None
    if fam.is_moe and spec.aux_loss > 0:
        top_k = MoEModel.from_config(config, fam).routing.top_k
        aux = RouterLoss(router_modules(spec, model, config), top_k, fam.execution.router_outputs.get("logits", 0))
    model.train()
    order, pos, history = torch.randperm(len(rows), generator=gen), 0, []
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(steps):
        if pos + spec.batch > len(order):
            order, pos = torch.randperm(len(rows), generator=gen), 0
        idx = order[pos:pos + spec.batch]
        pos += spec.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec, steps)
        logits = model(input_ids=rows[idx]).logits[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels[idx, 1:].flatten(), ignore_index=-100)
        total = loss
        balance = aux.pop() if aux is not None else None
        if balance is not None:
            total = loss + spec.aux_loss * balance
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(round(loss.item(), 4))
        if step % 50 == 0 or step == steps - 1:
            log(f"  {spec.name} step {step + 1}/{steps} loss {loss.item():.3f}"
                + (f" balance {balance.item():.3f}" if balance is not None else "")
                + f" ({time.perf_counter() - start:.0f} s)")
    if aux is not None:
        aux.remove()
    model.eval()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "loss_history_every_10": history[::10],
            "tokens": steps * spec.batch * spec.seq_len}


def expert_similarity(path: Path) -> dict | None:
    """Mean off-diagonal cosine similarity of the routed experts' flattened gate matrices, per MoE layer."""
    from ..arch import open_model

    model = open_model(path)
    if not model.family.is_moe:
        return None
    out = {}
    for layer in model.moe_layers:
        flat = F.normalize(model.experts(layer, "gate").float().flatten(1), dim=1)
        sim = flat @ flat.T
        n = len(sim)
        out[str(layer)] = round(float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))), 4)
    return out


# ---------------------------------------------------------------------------------------------------- main
def get_spec(name: str) -> ModelSpec:
    for spec in MODELS:
        if spec.name == name:
            return spec
    raise KeyError(f"no zoo model named {name!r}; the table has {', '.join(s.name for s in MODELS)}")


def plan(only: Sequence[str] | None, out: Path) -> list[ModelSpec]:
    """The models to train in table order: ``only`` (default all) plus parents that ``out`` does not hold yet."""
    wanted = {s.name for s in MODELS} if not only else {get_spec(n).name for n in only}
    changed = True
    while changed:
        changed = False
        for spec in MODELS:
            if spec.name in wanted and spec.parent and spec.parent not in wanted \
                    and not (out / spec.parent / "config.json").exists():
                wanted.add(spec.parent)
                changed = True
    return [s for s in MODELS if s.name in wanted]


def param_counts(spec: ModelSpec, tensors: Mapping[str, torch.Tensor], config: Mapping) -> dict:
    total = sum(t.numel() for t in tensors.values())
    fam = get_family(spec.family)
    if not fam.is_moe:
        return {"total": total, "active_per_token": total}
    moe = MoEModel.from_config(config, fam)
    per_expert = 3 * moe.hidden_size * moe.expert_width
    idle = len(moe.moe_layers) * (moe.num_experts - moe.routing.top_k) * per_expert
    return {"total": total, "active_per_token": total - idle}


#: Config values an upcycled model takes from its dense parent, so that it starts computing what the parent does.
INHERITED = ("rope_theta", "rms_norm_eps")


def initial_model(spec: ModelSpec, out: Path, vocab_size: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """The model before training and its config.json, as ``spec.init`` says (parents are read from ``out``)."""
    config = model_config(spec, vocab_size)
    torch.manual_seed(seed)
    if spec.init == "scratch":
        return build_model(spec, config), config
    parent = json.loads((out / spec.parent / "config.json").read_text())
    if spec.init.startswith("finetune:"):
        return load_model(spec, out / spec.parent), parent
    if spec.init.startswith("upcycle:"):
        config.update({k: parent[k] for k in INHERITED if k in parent and k in config})
        tensors = upcycle(spec, read_disk_tensors(out / spec.parent), config, seed)
        with tempfile.TemporaryDirectory() as tmp:
            save_model(spec, tensors, config, Path(tmp), dtype=torch.float32)
            return load_model(spec, Path(tmp)), config
    raise ValueError(f"{spec.name}: unknown init rule {spec.init!r}")


def train_one(spec: ModelSpec, data: Data, out: Path, seed: int, steps: int | None, eval_rows: int,
              log: Callable[[str], None], command: str = "") -> dict:
    steps = spec.steps if steps is None else steps
    model_seed = seed * 1000 + [s.name for s in MODELS].index(spec.name)
    model, config = initial_model(spec, out, data.vocab_size, model_seed)
    rows, labels = training_set(spec, data, "train")
    val_rows, val_labels = training_set(spec, data, "validation")
    val_rows, val_labels = val_rows[:eval_rows], val_labels[:eval_rows]
    init_loss = evaluate(model, val_rows, val_labels)
    log(f"{spec.name}: {spec.description}; {steps} steps, init validation loss {init_loss:.3f}")
    result = train(spec, model, config, rows, labels, steps, model_seed, log)
    path = out / spec.name
    tensors = disk_tensors(spec, model, config)
    save_model(spec, tensors, config, path, tokenizer=data.tokenizer)
    reloaded = load_model(spec, path)  # what users get: bfloat16 weights through from_pretrained
    final_loss = evaluate(reloaded, val_rows, val_labels)
    record = {
        "name": spec.name, "family": spec.family, "description": spec.description, "init": spec.init,
        "data": spec.data, "steps": steps, "batch": spec.batch, "seq_len": spec.seq_len, "lr": spec.lr,
        "aux_loss": spec.aux_loss if get_family(spec.family).is_moe else None, "seed": seed,
        "threads": torch.get_num_threads(), "command": command,
        "tokens_seen": result["tokens"], "train_seconds": round(result["seconds"], 1),
        "train_cpu_seconds": round(result["cpu_seconds"], 1),
        "params": param_counts(spec, tensors, config),
        "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin")),
        "validation": {
            "split": "instruct pairs (answers only)" if spec.data == "instruct" else "corpus validation split",
            "target_tokens": int((val_labels[:, 1:] != -100).sum()),
            "init_loss": round(init_loss, 4), "trained_loss": round(final_loss, 4),
            "unigram_loss": round(unigram_loss(data, val_labels), 4),
            "init_ppl": round(math.exp(init_loss), 2), "trained_ppl": round(math.exp(final_loss), 2),
            "unigram_ppl": round(math.exp(unigram_loss(data, val_labels)), 2)},
        "expert_gate_cosine": expert_similarity(path),
        "loss_history_every_10": result["loss_history_every_10"],
    }
    if spec.data == "instruct":  # how much of the base model's language modelling survives fine-tuning
        rows_c = corpus_rows(data.validation, spec.seq_len)[:eval_rows]
        record["validation"]["corpus_loss_after"] = round(evaluate(reloaded, rows_c, rows_c), 4)
    atomic_write_json(path / "zoo.json", record)
    log(f"{spec.name}: validation loss {init_loss:.3f} -> {final_loss:.3f} (unigram "
        f"{record['validation']['unigram_loss']:.3f}), {result['seconds']:.0f} s")
    return record


def write_summary(out: Path, records: list[dict], meta: dict) -> None:
    old = {}
    if (out / "training.json").exists():
        old = {r["name"]: r for r in json.loads((out / "training.json").read_text()).get("models", [])}
    old.update({r["name"]: r for r in records})
    ordered = [old[s.name] for s in MODELS if s.name in old] + [r for n, r in old.items() if n not in
                                                               {s.name for s in MODELS}]
    atomic_write_json(out / "training.json", {**meta, "models": ordered})
    (out / "README.md").write_text(readme(ordered, meta))


def readme(records: list[dict], meta: dict) -> str:
    intro = (
        "Tiny causal language models of the study's families, trained on CPU by `moescope/zoo/train.py` on the "
        "prose corpus of `moescope/data/` (the Python 3.11 documentation, PSF licence; see "
        "`moescope/data/README.md`). Each directory is a checkpoint in its family's real on-disk layout (published "
        "config.json keys, tensor names and shard naming; weights in bfloat16) with its tokenizer (byte-level BPE, "
        f"{meta.get('vocab_size')} tokens, `<s>` prepended) and `zoo.json` (how it was trained, its losses).")
    header = ("| model | family | init | params (active) | size | steps | tokens | train time: wall (CPU) "
              "| val loss: init | trained | unigram | val ppl: trained | unigram |")
    lines = ["# The moescope zoo: tiny trained models", "", intro, "", header, "|---" * 13 + "|"]
    for r in records:
        v, p = r["validation"], r["params"]
        lines.append(
            f"| `{r['name']}` | {r['family']} | {r['init']} | {p['total'] / 1e6:.2f} M "
            f"({p['active_per_token'] / 1e6:.2f} M) | {r['size_bytes'] / 2**20:.1f} MiB | {r['steps']} | "
            f"{r['tokens_seen'] / 1e6:.2f} M | {r['train_seconds']:.0f} s ({r.get('train_cpu_seconds', 0):.0f} s) | "
            f"{v['init_loss']:.3f} | **{v['trained_loss']:.3f}** | {v['unigram_loss']:.3f} | "
            f"{v['trained_ppl']:.1f} | {v['unigram_ppl']:.1f} |")
    seq = records[0]["seq_len"] if records else SEQ_LEN
    lines += ["", (
        "Validation loss: mean next-token cross-entropy (nats) on the first "
        f"{meta.get('eval_rows')} rows of {seq} tokens of the corpus validation split (instruct model: the "
        "answers of the held-out instruction pairs), for the initialisation, the trained model as shipped "
        "(bfloat16, reloaded with `from_pretrained`) and a unigram model of the training split (add-one). "
        "Initialisations: `scratch` = the model class's random init; `upcycle` = every expert a copy of the dense "
        "model's FFN plus 1 % noise, routers random (so its initial loss is the dense model's); `finetune` = the "
        "parent as shipped. MoE models were trained with a load-balancing loss (coefficient 0.01)."), "",
        "Mean cosine similarity between the routed experts' gate matrices, per MoE layer (1 = identical):", ""]
    for r in records:
        if r.get("expert_gate_cosine"):
            cos = ", ".join(f"layer {k}: {v:.3f}" for k, v in r["expert_gate_cosine"].items())
            lines.append(f"- `{r['name']}`: {cos}")
    for r in records:
        if "corpus_loss_after" in r["validation"]:
            after = r["validation"]["corpus_loss_after"]
            lines += ["", f"`{r['name']}` has a corpus validation loss of {after:.3f} after fine-tuning."]
    commands: dict[str, list[dict]] = {}
    for r in records:
        commands.setdefault(r.get("command", "python -m moescope.zoo.train"), []).append(r)
    lines += ["", ("The models come from these commands, run side by side under `nice -n 10` (a later command "
                   "retrains the models it names; each model's own command is in its `zoo.json`):"), ""]
    lines += [f"    {command}" for command in commands]
    cpu = {c: sum(r.get("train_cpu_seconds", 0) for r in rs) for c, rs in commands.items()}
    lines += ["", (
        f"Seed {meta.get('seed')}, torch {meta.get('torch')}, transformers {meta.get('transformers')}. Training used "
        f"{sum(cpu.values()) / 60:.1f} min of CPU in all ({', '.join(f'{v / 60:.1f}' for v in cpu.values())} min "
        "for the models of each command; tokenizer, evaluation and saving add under a minute per command): about "
        "what one idle core needs for the whole zoo, and about half that on two cores with the commands side by "
        "side. The wall times in the "
        "table are longer because the 2-core machine was shared with other jobs; there one thread per process "
        "runs far faster than two, which stall each other when the cores are busy."), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moescope.zoo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the model directories")
    parser.add_argument("--steps", type=int, default=None, help="override every model's number of steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", default=None,
                        help="train only these models (comma-separated or repeated) and missing parents")
    parser.add_argument("--max-chars", type=int, default=None, help="use only this many training characters")
    parser.add_argument("--eval-rows", type=int, default=96, help="validation rows of 256 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="override every model's batch size (rows)")
    parser.add_argument("--seq-len", type=int, default=None, help="override every model's row length (tokens)")
    parser.add_argument("--summary-only", action="store_true",
                        help="only rewrite README.md / training.json from the zoo.json files in --out")
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m moescope.zoo.train", *(sys.argv[1:] if argv is None else argv)])
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    try:
        return _run(args)
    finally:  # leave the calling process as it was (the tests call main())
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _run(args: argparse.Namespace) -> int:
    if args.summary_only:
        meta = json.loads((args.out / "training.json").read_text()) if (args.out / "training.json").exists() else {}
        meta.pop("models", None)
        records = [json.loads((args.out / s.name / "zoo.json").read_text()) for s in MODELS
                   if (args.out / s.name / "zoo.json").exists()]
        write_summary(args.out, records, meta)
        return 0
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    only = [n for item in args.only for n in item.split(",") if n] if args.only else None
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    overrides = {k: v for k, v in (("batch", args.batch), ("seq_len", args.seq_len)) if v is not None}
    todo = [replace(spec, **overrides) for spec in plan(only, out)]
    log = lambda msg: print(msg, flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    data = load_data(max_chars=args.max_chars)
    log(f"tokenizer: {data.vocab_size} tokens; train {len(data.train)} tokens, validation {len(data.validation)}, "
        f"instruct {len(data.instruct_train)} + {len(data.instruct_validation)} pairs")
    records = [train_one(spec, data, out, args.seed, args.steps, args.eval_rows, log, args.command) for spec in todo]
    import transformers
    meta = {"seed": args.seed, "vocab_size": data.vocab_size, "eval_rows": args.eval_rows,
            "max_chars": args.max_chars, "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "total_seconds": round(time.perf_counter() - start, 1),
            "total_cpu_seconds": round(time.process_time() - cpu_start, 1),
            "train_tokens": len(data.train), "validation_tokens": len(data.validation)}
    write_summary(out, records, meta)
    log(f"done in {meta['total_seconds']:.0f} s: {', '.join(r['name'] for r in records)} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
