"""The readers a campaign fuzzes: their seeds, their mutations, what the child runs, the check.

=============  ==================  =====================  ==========================================
reader         seeds               mutations              prebake runs / checked against
=============  ==================  =====================  ==========================================
torch-zip      torch.save zips     zip headers, members   convert / torch.load(weights_only=True)
torch-pickle   torch.save zips     data.pkl's opcodes     convert / torch.load(weights_only=True)
torch-legacy   torch.save legacy   pickles, counts, keys  convert / torch.load(weights_only=True)
safetensors    save_file           header tree, entries   convert / safetensors.torch.load_file
gguf           GGUFWriter          kv types, counts, ...  convert --names gguf --keep-quant / GGUFReader
gguf-hf        llama.cpp's layout  kv types, counts, ...  convert (a HF folder) / gguf.quants.dequantize
archive        prebake pack        index, chunks, files   unpack / verify + load of the result
manifest       prebake convert     JSON, paths, symlinks  load, verify, pack, inspect, warm / agree
=============  ==================  =====================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.fuzz import reference, targets


@dataclass(frozen=True)
class Reader:
    name: str
    seeds: str  # the seed kind (a folder of the seeds)
    table: str  # the mutation table (tests.fuzz.mutators.TABLES)
    bake: Callable  # (src, out, stage) -> dict, in the child
    check: Callable | None = None  # (src, out) -> dict, in the child
    entry: str = "model"  # the input's name in the work folder's in/
    bait_bake: bool = False  # lay the seed out under bait/ too (inputs that may point outside)
    warm: bool = False  # bake a seed in the campaign process first (transformers' lazy imports and caches)


READERS = {r.name: r for r in (
    Reader("torch-zip", "torch-zip", "zip", targets.convert_target(), reference.torch_check, "model.bin"),
    Reader("torch-pickle", "torch-zip", "pickle", targets.convert_target(), reference.torch_check, "model.bin"),
    Reader("torch-legacy", "torch-legacy", "legacy", targets.convert_target(), reference.torch_check, "model.pt"),
    Reader("safetensors", "safetensors", "safetensors", targets.convert_target(), reference.safetensors_check,
           "model.safetensors"),
    Reader("gguf", "gguf", "gguf", targets.convert_target(names="gguf", keep_quant=True), reference.gguf_check,
           "model.gguf"),
    Reader("gguf-hf", "gguf-hf", "gguf", targets.convert_target(tokenizer_sample=(16, 8)), reference.gguf_hf_check,
           "model.gguf",
           warm=True),
    Reader("archive", "archive", "archive", targets.unpack_target, None, "model.pbk"),
    Reader("manifest", "bake", "manifest", targets.manifests_target, None, "bake", bait_bake=True),
)}
