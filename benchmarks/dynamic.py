"""Dynamic analyses on one model: the study-style method against moescope, in one process.

Model: a Mixtral-layout checkpoint built in code (default 8 layers, hidden 512, 8 experts of width 1024).
Methods, both from an already loaded model to expert-output norms, router scores and per-token expert-pair
cosines for every layer:
  (1) study: a routing pass, then for every layer a second full forward in which a hook runs every expert on
      each token separately and loops over expert pairs for the cosines (the original code's structure);
  (2) moescope: one forward pass capturing every layer, then batched all-experts recompute + accumulators
      (moescope.dynamic.forward_pass + accumulate_layer / layer_results; weights read from the checkpoint).
Both give the same numbers (checked). Also reported: the all-experts recompute alone, as a fraction of the
machine's measured float32 matmul rate.
Run: python benchmarks/dynamic.py [--layers 8 --hidden 512 --width 1024 --tokens 256 --threads N]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from moescope.arch import open_model
from moescope.dynamic.experts import activation, layer_members, member_outputs
from moescope.dynamic.forward import forward_pass
from moescope.dynamic.inputs import Document
from moescope.dynamic.loader import load_model
from moescope.dynamic.run import TraceOptions
from moescope.dynamic.shards import Shard, accumulate_layer, layer_results
from moescope.testing import build_checkpoint


def study(net, model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(1) routing pass + one all-experts pass per layer with per-token and per-pair Python loops."""
    layers = net.model.layers
    scores = {}
    hooks = [layers[l].mlp.gate.register_forward_hook(
        lambda m, a, out, l=l: scores.__setitem__(l, torch.softmax(out[0].float(), -1))) for l in model.moe_layers]
    with torch.no_grad():
        net(input_ids=ids)
    for h in hooks:
        h.remove()
    results = {}
    for l in model.moe_layers:
        experts = layers[l].mlp.experts
        E = experts.gate_up_proj.shape[0]

        def all_experts(module, args, l=l, experts=experts, E=E):
            x = args[0].reshape(-1, args[0].shape[-1])
            norms, cos = torch.zeros(len(x), E, device=x.device), torch.zeros(len(x), E, E, device=x.device)
            for t in range(len(x)):
                outs = []
                for e in range(E):
                    gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
                    outs.append(experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
                for a in range(E):
                    norms[t, a] = outs[a].norm()
                    for b in range(E):
                        cos[t, a, b] = torch.nn.functional.cosine_similarity(outs[a], outs[b], dim=0)
            results[l] = (norms, cos)

        hook = layers[l].mlp.register_forward_pre_hook(all_experts)
        with torch.no_grad():
            net(input_ids=ids)
        hook.remove()
    return results


def moescope_way(net, model, doc: Document, device: str = "cpu") -> dict[int, dict]:
    """(2) one forward pass, then per layer the batched recompute and accumulators."""
    traces = forward_pass(net, model.family.execution, model.moe_layers, [doc], device=device, progress=False)
    opts, shard = TraceOptions(similarity_tokens=len(doc.ids), stats=False), Shard([doc], batch_size=1)
    return {l: layer_results(model, accumulate_layer(model, l, traces[l], shard, opts, False, device=device), opts)[1]
            for l in model.moe_layers}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(tokens: int, hidden: int, width: int, device: str, repeat: int = 20) -> float:
    """Measured float32 FLOP/s of the recompute's matmul shape [T, H] @ [H, I]."""
    x, w = torch.randn(tokens, hidden, device=device), torch.randn(hidden, width, device=device)
    x @ w
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        x @ w
    _sync(device)
    return 2 * tokens * hidden * width * repeat / (time.perf_counter() - start)


def recompute_seconds(model, traces, device: str) -> float:
    """The all-experts recompute alone (weights already in memory)."""
    members = {l: [m.load() for m in layer_members(model, l, device=device)] for l in model.moe_layers}
    inputs = {l: traces[l].inputs.to(device) for l in model.moe_layers}
    glu = activation(model)
    _sync(device)
    start = time.perf_counter()
    for l in model.moe_layers:
        for w in members[l]:
            member_outputs(inputs[l], w, glu)
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU variant: same script)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {"hidden_size": args.hidden, "intermediate_size": args.width, "num_hidden_layers": args.layers,
             "num_local_experts": args.experts, "num_attention_heads": 8, "num_key_value_heads": 8}
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint("mixtral", tmp, sizes=sizes, dtype="F32", tokenizer=False)
        model = open_model(tmp)
        net = load_model(model, args.device)
        ids = [1] + [3 + (7 * i) % 300 for i in range(args.tokens - 1)]
        doc = Document("", tuple(ids))
        moescope_way(net, model, Document("", tuple(ids[:16])), args.device)  # warm-up: one-off costs
        study(net, model, torch.tensor([ids[:16]], device=args.device))
        _sync(args.device)
        start = time.perf_counter()
        ours = moescope_way(net, model, doc, args.device)
        _sync(args.device)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        ref = study(net, model, torch.tensor([ids], device=args.device))
        _sync(args.device)
        t_ref = time.perf_counter() - start
        for l in model.moe_layers:  # same numbers
            torch.testing.assert_close(ours[l]["expert_norms"], ref[l][0].cpu(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours[l]["token_similarity"], ref[l][1].cpu(), rtol=1e-4, atol=1e-4)
        traces = forward_pass(net, model.family.execution, model.moe_layers, [doc], device=args.device,
                              progress=False)
        t_recompute = recompute_seconds(model, traces, args.device)
    flops = 3 * 2 * args.tokens * args.hidden * args.width * args.experts * args.layers
    rate = matmul_rate(args.tokens, args.hidden, args.width, args.device)
    T = args.tokens
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of width {args.width}; "
          f"{T} tokens; torch threads {torch.get_num_threads()}")
    print(f"study-style (routing pass + per-layer all-experts pass, per-token loops): {t_ref:8.2f} s "
          f"{T / t_ref:10.1f} tok/s")
    print(f"moescope (one forward + batched recompute + accumulators):                 {t_ours:8.2f} s "
          f"{T / t_ours:10.1f} tok/s")
    print(f"ratio: {t_ref / t_ours:.1f}x")
    print(f"all-experts recompute: {t_recompute:.3f} s = {flops / t_recompute / 1e9:.1f} GFLOP/s, "
          f"{flops / t_recompute / rate:.0%} of the measured matmul rate ({rate / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
