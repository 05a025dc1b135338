"""Mutations of a bake folder through its manifests: JSON trees, paths that lead out, symlinks.

The subject is a :class:`Folder` holding ``bake/...`` (the input folder's contents). Beside the
input lies ``bait/``: a copy of the same bake and a ``secret`` file, so a path or a link that
leads out of the bake finds files of the right size with the right checksums there, and would
load if prebake followed it; nothing may ever open them. Mutations: a tree mutation of one
manifest; one path field (a shard, a copied file, a component, a variant's config) pointed at
the bait, at a system file, at the folder itself; a file or folder of the bake replaced by a
symbolic link (to the bait, to a system file, to another file of the bake, to nowhere, to
itself); a shard's bytes damaged.
"""

from __future__ import annotations

import json
import os
from random import Random

from tests.fuzz.mutators.base import NO_CONTEXT, Folder, NotApplicable
from tests.fuzz.mutators.json_tree import dumps, mutate_tree

ROOT = "bake"
SYSTEM = ["/etc/passwd", "/etc/hostname", "/proc/self/environ", "/dev/zero", "/"]


def to_bait(rel: str) -> str:
    """A relative link target, from ``rel``'s folder, to the bait copy of ``rel``."""
    return "../" * rel.count("/") + "../bait/" + rel[len(ROOT) + 1:]


def _manifests(folder: Folder) -> list[str]:
    found = sorted(p for p in folder.files if p.endswith("/manifest.json"))
    if not found:
        raise NotApplicable("no manifest")
    return found


def _load(folder: Folder, path: str) -> dict:
    try:
        d = json.loads(folder.files[path])
    except ValueError:
        raise NotApplicable("manifest is not JSON") from None
    if not isinstance(d, dict):
        raise NotApplicable("manifest is not an object")
    return d


def manifest_tree(folder: Folder, rng: Random, ctx=NO_CONTEXT) -> tuple[Folder, str]:
    path = rng.choice(_manifests(folder))
    tree, what = mutate_tree(_load(folder, path), rng)
    out = folder.copy()
    out.files[path] = dumps(tree)
    return out, f"{path}: {what}"


def _path_fields(d: dict) -> list[tuple[object, object, str]]:
    """(holder, key, label) of every path field in a manifest."""
    found = []
    for i, s in enumerate(d.get("shards") or []):
        if isinstance(s, dict):
            found.append((s, "file", f"shards[{i}].file"))
    for i, f in enumerate(d.get("files") or []):
        if isinstance(f, dict):
            found.append((f, "path", f"files[{i}].path"))
    for name, c in (d.get("components") or {}).items():
        if isinstance(c, dict):
            found.append((c, "path", f"components[{name!r}].path"))
    for name, v in (d.get("variants") or {}).items():
        if isinstance(v, dict) and "config" in v:
            found.append((v, "config", f"variants[{name!r}].config"))
    return found


def manifest_path(folder: Folder, rng: Random, ctx=NO_CONTEXT) -> tuple[Folder, str]:
    path = rng.choice(_manifests(folder))
    d = _load(folder, path)
    fields = _path_fields(d)
    if not fields:
        raise NotApplicable("no path fields")
    holder, key, label = rng.choice(fields)
    old = holder[key]
    here = os.path.dirname(path)  # "bake" or "bake/c"
    up = "../" * here.count("/") + "../../"
    bait = up + "bait/" + (here[len(ROOT) + 1:] + "/" if "/" in here else "") + str(old)
    new = rng.choice([bait, bait, rng.choice(SYSTEM), f"{old}/../../{os.path.basename(here)}/{old}",
                      f"./{old}", f"{old}/", ".", "", "..", "/" + str(old), f"x/../{old}", "manifest.json"])
    holder[key] = new
    if key != "path" or "components" not in label:
        size = _size(new, folder, here)
        if size is not None and "size" in holder:
            holder["size"] = size
    out = folder.copy()
    out.files[path] = dumps(d)
    return out, f"{path}: {label} {old!r} -> {new!r}"


def _size(target: str, folder: Folder, here: str) -> int | None:
    if target.startswith("/"):
        try:
            return os.path.getsize(target)
        except OSError:
            return None
    own = folder.files.get(os.path.normpath(os.path.join(here, target)))
    if own is not None:
        return len(own)
    name = target.rsplit("bait/", 1)[-1]
    found = folder.files.get(f"{ROOT}/{name}")
    return len(found) if found is not None else None


def manifest_link(folder: Folder, rng: Random, ctx=NO_CONTEXT) -> tuple[Folder, str]:
    """A file (or a component's folder) of the bake replaced by a symbolic link."""
    dirs = sorted({os.path.dirname(p) for p in folder.files} - {ROOT})
    choices = sorted(folder.files) + dirs
    victim = rng.choice(choices)
    files = [p for p in folder.files if p != victim]
    target = rng.choice([to_bait(victim), to_bait(victim), rng.choice(SYSTEM),
                         os.path.relpath(rng.choice(files), os.path.dirname(victim)) if files else "nowhere",
                         "nowhere", os.path.basename(victim)])
    out = Folder({p: b for p, b in folder.files.items() if p != victim and not p.startswith(victim + "/")},
                 {**folder.links, victim: target})
    return out, f"{victim} -> symlink to {target!r}"


def manifest_shard(folder: Folder, rng: Random, ctx=NO_CONTEXT) -> tuple[Folder, str]:
    shards = sorted(p for p in folder.files if p.endswith(".safetensors"))
    if not shards:
        raise NotApplicable("no shards")
    path = rng.choice(shards)
    data = folder.files[path]
    roll = rng.randrange(3)
    if roll == 0 and data:
        at = rng.randrange(len(data))
        new, what = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:], f"byte {at} flipped"
    elif roll == 1 and data:
        keep = rng.randrange(len(data))
        new, what = data[:keep], f"truncated to {keep}"
    else:
        new, what = data + bytes(rng.choice([1, 4096])), "extended"
    out = folder.copy()
    out.files[path] = new
    return out, f"{path}: {what}"


MANIFEST_OPS = {f.__name__: f for f in (manifest_tree, manifest_path, manifest_link, manifest_shard)}
