"""One bake for any tensor-parallel degree: real 2- and 4-rank forward passes on the CPU.

Each rank is a process (``torch.distributed``, gloo) that loads only
``load_from_manifest(OUT, tp_rank=r, tp_size=k)``: its slices of the column-parallel (Q, K, V,
gate, up, experts' w1/w3), row-parallel (O, down, experts' w2) and vocabulary-parallel
(embeddings, head) weights, and the replicated rest. The ranks run a tiny Llama and a tiny
Mixtral the Megatron way (an all-reduce after each row-parallel layer and the vocab-parallel
embedding, an all-gather of the head's logits); rank 0's logits must equal the full model's, for
a lossless and a ``q8_0`` bake (packed slices: QuantLinear on each rank) of a ``--tp-layout 4``
bake and a plain one. Each rank's eager load reads about 1/k of the split bytes.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from prebake.cache.load import load_from_manifest
from prebake.cache.module import load_module
from prebake.convert.bake import convert
from prebake.convert.plan import Options
from prebake.formats.manifest import read_manifest

BAKES = {"plain": {}, "tp4": {"tp_layout": 4}, "tp4-q8_0": {"tp_layout": 4, "quant": "q8_0"}}


def llama() -> transformers.PreTrainedModel:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4))


def mixtral() -> transformers.PreTrainedModel:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2))


TOKENS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    expected = {}
    for name, make in (("llama", llama), ("mixtral", mixtral)):
        torch.manual_seed(0)
        model = make().eval()
        model.save_pretrained(root / name)
        with torch.no_grad():
            expected[name] = model(TOKENS).logits
        for bake, options in BAKES.items():
            convert(root / name, root / f"{name}-{bake}", Options(**options))
    return root, expected


def local_config(config, k: int):
    """The model one rank holds: 1/k of the heads, the MLP's width and the vocabulary."""
    c = copy.deepcopy(config)
    c.head_dim = config.hidden_size // config.num_attention_heads
    c.num_attention_heads //= k
    c.num_key_value_heads //= k
    c.intermediate_size //= k
    c.vocab_size //= k
    return c


def all_reduce_output(module, inputs, output):
    dist.all_reduce(output)
    return output


def vocab_parallel(model, rank: int, k: int) -> None:
    """Embeddings and head split by vocabulary: masked lookups summed, logits gathered."""
    embed, head = model.model.embed_tokens, model.lm_head
    n = embed.weight.shape[0]

    def lookup(ids):
        local = ids - rank * n
        outside = (local < 0) | (local >= n)
        out = torch.nn.functional.embedding(local.masked_fill(outside, 0), embed.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(out)
        return out

    def logits(hidden):
        part = head.__class__.forward(head, hidden)
        parts = [torch.empty_like(part) for _ in range(k)]
        dist.all_gather(parts, part.contiguous())
        return torch.cat(parts, dim=-1)

    embed.forward = lookup
    head.forward = logits


def rank_model(kind: str, bake: Path, rank: int, k: int):
    config = local_config(transformers.AutoConfig.from_pretrained(bake), k)
    if kind == "llama":
        model = load_module(lambda: transformers.LlamaForCausalLM(config), bake, tp_rank=rank, tp_size=k)
    else:  # transformers 5 keeps Mixtral's experts fused: the rank's slices are put together
        state = load_from_manifest(bake, tp_rank=rank, tp_size=k, quant=None)
        model = transformers.MixtralForCausalLM(config)
        fused = {}
        for layer in range(config.num_hidden_layers):
            p = f"model.layers.{layer}.block_sparse_moe.experts."
            experts = range(config.num_local_experts)
            fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([state.pop(f"{p}{e}.w1.weight"), state.pop(f"{p}{e}.w3.weight")]) for e in experts])
            fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([state.pop(f"{p}{e}.w2.weight")
                                                                                 for e in experts])
            fused[f"model.layers.{layer}.mlp.gate.weight"] = state.pop(f"model.layers.{layer}.block_sparse_moe.gate.weight")
        model.load_state_dict({**state, **fused}, strict=True)
    if k > 1:
        for layer in model.model.layers:
            layer.self_attn.o_proj.register_forward_hook(all_reduce_output)
            mlp = getattr(layer.mlp, "experts", None) or layer.mlp.down_proj
            mlp.register_forward_hook(all_reduce_output)
        vocab_parallel(model, rank, k)
    return model.eval()


def rank_main(rank: int, k: int, root: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k)
    torch.set_num_threads(1)
    results = {}
    for kind in ("llama", "mixtral"):
        for bake in BAKES:
            path = Path(root) / f"{kind}-{bake}"
            with torch.no_grad():
                logits = rank_model(kind, path, rank, k)(TOKENS).logits
            read = load_from_manifest(path, tp_rank=rank, tp_size=k, mode="eager").report.bytes
            results[f"{kind}-{bake}"] = {"logits": logits.tolist(), "read": read}
    Path(root, f"rank{rank}-of-{k}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("k", [2, 4])
def test_tensor_parallel_forward_equals_the_full_model(models, k):
    root, expected = models
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(rank_main, args=(k, str(root), free_port()), nprocs=k, start_method="spawn")
    ranks = [json.loads((root / f"rank{r}-of-{k}.json").read_text()) for r in range(k)]
    for key, got in ranks[0].items():
        kind, bake = key.split("-", 1)
        reference = expected[kind]
        if "q8_0" in bake:  # packed slices: the same numbers as the whole q8_0 model on one process
            with torch.no_grad():
                reference = rank_model(kind, root / key, 0, 1)(TOKENS).logits
        torch.testing.assert_close(torch.tensor(got["logits"]), reference, atol=1e-4, rtol=1e-4)
    for key in ranks[0]:
        m = read_manifest(root / key)
        total = sum(t.nbytes for t in m.tensors.values())
        split = sum(t.nbytes for t in m.tensors.values() if t.tp)
        reads = [r[key]["read"] for r in ranks]
        bound = split / k + (total - split) + 4096 * len(m.tensors)
        print(f"{key} k={k}: each rank read {max(reads) / total:.2f} of the bake")
        if key.split("-", 1)[1].startswith("tp4"):
            assert max(reads) <= bound, (key, reads, bound)
        else:  # untiled: row-parallel tensors are read whole by every rank
            assert max(reads) > bound


def test_a_tiled_bake_reads_back_whole(models):
    """Loaded without a rank, or read back by the exporter, a --tp-layout bake is the plain one."""
    from prebake.convert.bake_source import bake_tensors
    from prebake.formats.quants import dequantize

    root, _ = models
    for kind in ("llama", "mixtral"):
        plain, tiled = load_from_manifest(root / f"{kind}-plain"), load_from_manifest(root / f"{kind}-tp4")
        assert all(torch.equal(plain[n], tiled[n]) for n in plain)
        back = bake_tensors(read_manifest(root / f"{kind}-tp4"))
        row = f"model.layers.0.{'self_attn.o_proj' if kind == 'llama' else 'block_sparse_moe.experts.1.w2'}.weight"
        assert read_manifest(root / f"{kind}-tp4").tensors[row].tp == "row:4"
        assert torch.equal(torch.from_numpy(back[row].read().view("<f4").copy()), plain[row])
    q = read_manifest(root / "llama-tp4-q8_0")
    blocks = bake_tensors(q)["model.layers.1.mlp.down_proj.weight"]
    whole = load_from_manifest(root / "llama-tp4-q8_0")["model.layers.1.mlp.down_proj.weight"]
    assert (dequantize(blocks.read(), "Q8_0") == whole.dequantize().numpy()).all()
