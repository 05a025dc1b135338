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


def test_biases_between_weights_cost_at_most_one_pad_per_layer():
    tensors = [info("embeddings.word_embeddings.weight", (1000, 768))]
    layers = 6
    for i in range(layers):
        for part in ("query", "key", "value", "output"):
            tensors += [info(f"encoder.layer.{i}.{part}.weight", (768, 768)),
                        info(f"encoder.layer.{i}.{part}.bias", (768,))]  # 3072 bytes: misaligns the next weight
    tensors.append(info("pooler.dense.weight", (768, 768)))
    plan = plan_bake(tensors, Options())
    slots = [s for shard in plan.shards for s in shard.slots]
    pads = [s for s in slots if s.is_padding]
    assert len(pads) <= layers + 1
    names = [s.name for s in slots if not s.is_padding]
    layer_numbers = [layer_of(n)[1][0] for n in names if layer_of(n)]
    assert layer_numbers == sorted(layer_numbers)  # execution order holds layer by layer
    assert names[0].startswith("embeddings") and names[-1].startswith("pooler")
    for s in slots:
        if s.nbytes >= 1 << 20:
            assert s.offset % 4096 == 0


def test_quant_pure_needs_a_single_type():
    import pytest

    assert Options(quant="q4_k", quant_pure=True).policy.pure
    for quant in (None, "q4_k_m"):
        with pytest.raises(ValueError, match="--quant-pure needs --quant with a single type"):
            Options(quant=quant, quant_pure=True)
