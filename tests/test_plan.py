"""The plan is pure data: layout order and padding checked without touching the disk."""

from __future__ import annotations

from prebake.convert.order import layer_of
from prebake.convert.plan import Options, plan_bake
from prebake.formats.tensor import TensorInfo


def info(name: str, shape) -> TensorInfo:
    n = 1
    for d in shape:
        n *= d
    return TensorInfo(name, "F32", tuple(shape), 4 * n, "x", lambda: None)


def test_biases_fill_the_alignment_gaps_no_padding_entries():
    tensors = [info("embeddings.word_embeddings.weight", (1000, 768))]
    layers = 6
    for i in range(layers):
        for part in ("query", "key", "value", "output"):
            tensors += [info(f"encoder.layer.{i}.{part}.weight", (768, 768)),
                        info(f"encoder.layer.{i}.{part}.bias", (768,))]  # 3072 bytes: misaligns the next weight
    tensors.append(info("pooler.dense.weight", (768, 768)))
    plan = plan_bake(tensors, Options())
    slots = [s for shard in plan.shards for s in shard.slots]
    assert [s for s in slots if s.is_padding] == []
    names = [s.name for s in slots if not s.is_padding]
    weights = [layer_of(n)[1][0] for n in names if layer_of(n) and n.endswith("weight")]
    assert weights == sorted(weights)  # the big tensors keep execution order
    for i, n in enumerate(names):  # a bias moves at most a layer ahead of its weights
        if layer_of(n) and n.endswith("bias"):
            before = [layer_of(m)[1][0] for m in names[:i] if layer_of(m) and m.endswith("weight")]
            assert before and before[-1] >= layer_of(n)[1][0] - 1, n
    assert names[0].startswith("embeddings") and names[-1].startswith("pooler")
    for s in slots:
        if s.nbytes >= 1 << 20:
            assert s.offset % 4096 == 0
    ends = [s.offset + s.nbytes for s in slots]
    assert [s.offset for s in slots[1:]] == ends[:-1]  # no holes


def test_a_gap_nothing_fills_keeps_one_padding_entry():
    tensors = [info("a.weight", (512, 513)), info("b.weight", (512, 512))]  # 1,050,624 bytes: 2048 short
    plan = plan_bake(tensors, Options())
    pads = [s for s in plan.shards[0].slots if s.is_padding]
    assert len(pads) == 1 and pads[0].nbytes == 2048


def test_quant_pure_needs_a_single_type():
    import pytest

    assert Options(quant="q4_k", quant_pure=True).policy.pure
    for quant in (None, "q4_k_m"):
        with pytest.raises(ValueError, match="--quant-pure needs --quant with a single type"):
            Options(quant=quant, quant_pure=True)
