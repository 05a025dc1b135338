"""Finding what a source path holds: one checkpoint file or a Hugging Face style folder.

Formats are told by their first bytes, not their extension: a zip is a torch checkpoint, a
pickle is a legacy torch checkpoint, ``GGUF`` is GGUF, an 8-byte length followed by ``{`` is
safetensors. A folder is the model: its weight files are read (through an index when there is
one) and its other files (config.json, tokenizer, ...) are copied to the bake.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from prebake.formats.errors import FormatError, UnsupportedError
from prebake.formats.tensor import SourceFile

WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".safetensors", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx"}
# What transformers' Trainer saves beside the weights: pickles, but not of the model.
TRAINER_FILES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"}
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
               "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


@dataclass
class Source:
    """A checkpoint to bake: the files read, their tensors, and the small files to copy.

    ``writers`` make small files of the bake's own (a GGUF's config.json and tokenizer): each
    is called with the bake folder and the plan, and returns the files it wrote.
    ``blocks_dtype`` is what GGML blocks dequantize to when no ``--dtype`` is asked for;
    ``notes`` are one-line remarks for the user (what the bake could not do, and why).
    """

    path: str
    format: str
    files: list[SourceFile]
    copy: list[Path] = field(default_factory=list)
    stem: str = "model"  # shard file names: diffusers folders use diffusion_pytorch_model
    writers: list = field(default_factory=list)
    blocks_dtype: str = "F16"
    notes: list[str] = field(default_factory=list)

    @property
    def tensors(self):
        return [t for f in self.files for t in f.tensors]

    @property
    def skipped(self):
        return [s for f in self.files for s in f.skipped]

    @property
    def model_type(self) -> str | None:
        """``config.json``'s ``model_type``, when the source is a model folder that has one."""
        config = next((p for p in self.copy if p.name == "config.json"), None)
        try:
            value = json.loads(config.read_text()).get("model_type") if config else None
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    @property
    def metadata(self) -> dict:
        out: dict = {}
        for f in self.files:
            out.update(f.metadata)
        return out


def sniff(path: str) -> str:
    """The format of one checkpoint file from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except IsADirectoryError:
        raise FormatError("is a folder", path) from None
    except OSError as e:
        raise FormatError(f"cannot read ({e.strerror})", path) from None
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle's PROTO opcode
        return "torch-legacy"
    if not head:
        raise FormatError("file is empty", path)
    raise UnsupportedError("not a recognised checkpoint (expected a torch .bin/.pth/.pt, .safetensors or "
                           ".gguf file, or a Hugging Face model folder)", path)


def read_file(path: str) -> SourceFile:
    """Reads one checkpoint file with the reader its first bytes call for."""
    kind = sniff(path)
    if kind == "torch-zip":
        from prebake.formats.torch_zip import read_torch_zip
        return read_torch_zip(path)
    if kind == "torch-legacy":
        from prebake.formats.torch_legacy import read_torch_legacy
        return read_torch_legacy(path)
    if kind == "gguf":
        from prebake.formats.gguf_reader import read_gguf
        return read_gguf(path)
    from prebake.formats.safetensors_reader import read_safetensors
    return read_safetensors(path)


def open_source(path: str | os.PathLike, names: str = "hf", gguf_metadata: bool = False) -> Source:
    """Reads the descriptions of every tensor at ``path`` (a file or a model folder).

    A single GGUF file (alone, or the one weight file of a folder) is baked as a Hugging Face
    model folder under transformers' names (``names="hf"``) or under its own (``"gguf"``); see
    :mod:`prebake.convert.gguf_source`. ``gguf_metadata`` also keeps its metadata as JSON.
    """
    p = Path(path)
    if not p.exists():
        raise FormatError("no such file or folder", p)
    if not p.is_dir():
        if sniff(str(p)) == "gguf":
            return _gguf(p, names, gguf_metadata)
        f = read_file(str(p))
        return Source(str(p), f.format, [f])
    index = find_index(p)
    weights = weight_files(p, index)
    if index is None and len(weights) == 1 and sniff(str(weights[0])) == "gguf":
        return _gguf(weights[0], names, gguf_metadata, folder=p)
    files = [read_file(str(w)) for w in weights]
    if index is not None:
        _check_index(index, files)
    copy = _small_files(p)
    diffusers = any(w.name.startswith("diffusion_pytorch_model") for w in weights) or \
        any((p / i).exists() for i in INDEX_FILES if i.startswith("diffusion_pytorch_model"))
    stem = "diffusion_pytorch_model" if diffusers else "model"
    return Source(str(p), "hf-folder", files, copy, stem)


def _small_files(folder: Path) -> list[Path]:
    """The files of a model folder copied as they are (config, tokenizer, README, ...)."""
    return sorted(c for c in folder.iterdir() if c.is_file() and c.suffix not in WEIGHT_SUFFIXES
                  and c.name not in INDEX_FILES and c.name != "manifest.json" and not c.name.startswith("."))


def _gguf(path: Path, names: str, gguf_metadata: bool, folder: Path | None = None) -> Source:
    from prebake.convert.gguf_source import gguf_source

    g = gguf_source(path, names, gguf_metadata)
    if folder is None:
        return Source(str(path), "gguf", [g.file], writers=g.writers, blocks_dtype=g.blocks_dtype, notes=g.notes)
    return Source(str(folder), "hf-folder", [g.file], _small_files(folder), writers=g.writers,
                  blocks_dtype=g.blocks_dtype, notes=g.notes)


def component_folders(path: Path) -> dict[str, Path]:
    """The components of a multi-model folder (diffusers layout), or {} for anything else.

    A folder is one of components when it holds no weights of its own and some of its
    sub-folders are model folders; sub-folders without weights (scheduler, tokenizer) are not
    components and are copied as they are.
    """
    if not path.is_dir() or _has_weights(path):
        return {}
    return {p.name: p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")
            and _has_weights(p)}


def _has_weights(folder: Path) -> bool:
    return any(p.is_file() and p.suffix in {".bin", ".pt", ".pth", ".safetensors", ".gguf"}
               for p in folder.iterdir())


Index = tuple[Path, dict[str, str]]  # an index file and its weight map (tensor name -> file name)


def find_index(folder: Path) -> Index | None:
    """The folder's sharding index (``*.index.json``) and its checked weight map, if it has one."""
    for name in INDEX_FILES:
        ip = folder / name
        if ip.exists():
            return ip, _weight_map(ip)
    return None


def weight_files(folder: Path, index: Index | None = None) -> list[Path]:
    """The weight files of a model folder: from its index, else every file of the best format."""
    if index is not None:
        ip, weight_map = index
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FormatError(f"the index names {missing[0]}, which is not in the folder", ip)
        return [folder / n for n in names]
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.gguf"):
        found = sorted(p for p in folder.glob(pattern) if p.name not in TRAINER_FILES)
        if found:
            return found
    raise FormatError("folder holds no checkpoint files (.safetensors, .bin, .pt, .pth, .gguf)", folder)


def _weight_map(index: Path) -> dict[str, str]:
    """The index's weight map; every file it names is a plain file name in the index's folder."""
    try:
        wm = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError):
        wm = None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise FormatError("malformed index (expected a weight_map object of tensor name -> file name)", index)
    folder = os.path.realpath(index.parent)
    for file in set(wm.values()):
        if "/" in file or "\\" in file or file in ("", ".", "..") or \
                os.path.dirname(os.path.realpath(index.parent / file)) != folder:
            raise FormatError(f"the index names {file!r}, which is not a file in the index's folder", index)
    return wm


def _check_index(index: Index, files: list[SourceFile]) -> None:
    ip, weight_map = index
    have = {t.name: Path(f.path).name for f in files for t in f.tensors}
    for name, file in weight_map.items():
        if have.get(name) != file:
            raise FormatError(f"the index places {name!r} in {file}, but it is not there", ip)


def fingerprint(path: str | os.PathLike) -> dict:
    """Size, mtime and a hash of the first and last MiB: cheap, and changes when the file does."""
    st = os.stat(path)
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "fingerprint": h.hexdigest()}


def describe_source(src: Source) -> dict:
    """The manifest's ``source`` record."""
    root = Path(src.path)
    files = []
    for f in src.files:
        rel = os.path.relpath(f.path, root) if root.is_dir() else Path(f.path).name
        files.append({"path": rel, **fingerprint(f.path)})
    whole = xxhash.xxh3_128(json.dumps([(f["path"], f["size"], f["fingerprint"]) for f in files]).encode())
    return {"path": str(root.resolve()), "format": src.format, "files": files, "fingerprint": whole.hexdigest()}
