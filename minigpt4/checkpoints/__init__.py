"""Checkpoint I/O: every weight file the project reads or writes goes through here.

    keys.py     the one key map: official / Hugging Face / our names, and which part owns a key
    read.py     the one reader: TensorFiles (any file or directory, lazily), the one torch.load
    formats.py  the one format detector: what a path is (layout) and which file it is (tensor_kind)
    bundle.py   our own format: the one versioned writer and reader of bundles (minigpt4.json)
    write.py    the one atomic writer (complete or absent, usual permissions); safetensors shards

build.load_model assembles a model from these; the weight tools (minigpt4/weights/) convert and
inspect with them. See docs/WEIGHTS.md.
"""

from minigpt4.checkpoints.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_JSON,
    BUNDLE_WEIGHTS,
    BundleInfo,
    is_bundle,
    llm_arch,
    read_bundle,
    read_bundle_info,
    write_bundle,
)
from minigpt4.checkpoints.formats import (
    layout,
    projection_size_name,
    tensor_kind,
    uses_our_names,
)
from minigpt4.checkpoints.keys import (
    PART_NAMES,
    PART_PREFIXES,
    hf_name,
    is_known_extra,
    official_to_ours,
    part_of,
    parts_in,
)
from minigpt4.checkpoints.read import (
    TensorFiles,
    load_pickle,
    read_config,
    weight_files,
)
from minigpt4.checkpoints.write import (
    GB,
    atomic_write,
    check_target,
    clone_aliases,
    save_official_projection,
    save_shards,
    save_tensors,
)

__all__ = [
    "BUNDLE_FORMAT", "BUNDLE_JSON", "BUNDLE_WEIGHTS", "GB", "PART_NAMES", "PART_PREFIXES", "BundleInfo", "TensorFiles", "atomic_write", "check_target",
    "clone_aliases", "hf_name", "is_bundle", "is_known_extra", "layout", "llm_arch", "load_pickle", "official_to_ours",
    "part_of", "parts_in", "projection_size_name", "read_bundle", "read_bundle_info", "read_config", "save_official_projection",
    "save_shards", "save_tensors", "tensor_kind", "uses_our_names", "weight_files", "write_bundle",
]  # fmt: skip
