"""A program's weights as safetensors shards stored in the artifact's zip, written one shard at
a time and read back as memory-mapped views.

Writing holds one shard's bytes at a time (SHARD_BYTES), not a copy of every weight.
Reading maps the artifact file (copy-on-write: nothing is written back) and makes each
tensor a view at its offset, so loading a program costs no weight memory until a forward
touches it. The zip is untrusted: each shard's place comes from its local header, checked to
lie inside the file, and its safetensors header is parsed here with every entry checked
(dtype from a fixed table, shape and byte range consistent, ranges inside the shard and not
overlapping) before any view is made.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import struct
import zipfile
from pathlib import Path

import safetensors.torch
import torch

from snncc.errors import ArtifactError

SHARD_BYTES = 512 * 2**20
SHARD_MEMBER = re.compile(r"weights/shard-(\d{5})\.safetensors")
MAX_SHARDS = 4096
MAX_HEADER_BYTES = 64 * 2**20
ALIGNMENT = 64  # shard data starts on a 64-byte boundary of the file: aligned views
_PADDING_ID = 0xD935  # the zip extra-field id zipalign pads with; readers skip unknown ids
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... file name length, extra length
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def shard_name(index: int) -> str:
    return f"weights/shard-{index:05d}.safetensors"


def plan_shards(tensors: dict[str, torch.Tensor]) -> tuple[list[list[str]], dict[str, str]]:
    """Unique tensors in shards of at most SHARD_BYTES (a bigger tensor alone), in order, and
    aliases: names of tensors that are views of one already placed."""
    shards: list[list[str]] = [[]]
    size = 0
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in tensors.items():
        key = storage_key(tensor)
        if key in seen and tensor.numel():
            aliases[name] = seen[key]
            continue
        seen[key] = name
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return [s for s in shards if s], aliases


def storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for two names of one tensor (the same view of the same storage)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def write_shard(archive: zipfile.ZipFile, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write one shard member, its data aligned to ALIGNMENT; returns its SHA-256."""
    data = safetensors.torch.save({k: t.detach().cpu().contiguous() for k, t in tensors.items()})
    with _aligned_member(archive, name, len(data)) as member:
        member.write(data)
    return hashlib.sha256(data).hexdigest()


def _aligned_member(archive: zipfile.ZipFile, name: str, size: int):
    """A stored member open for writing whose data starts at a multiple of ALIGNMENT."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size >= zipfile.ZIP64_LIMIT
    start = archive.fp.tell() + _LOCAL_HEADER.size + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -start % ALIGNMENT
    info.extra = struct.pack("<HH", _PADDING_ID, pad) + bytes(pad)
    return archive.open(info, "w", force_zip64=zip64)


def member_sha256(path: Path, info: zipfile.ZipInfo) -> str:
    """SHA-256 of a stored member, read in chunks (a shard is never held whole)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        file.seek(_data_offset(file, info))
        left = info.file_size
        while left:
            chunk = file.read(min(left, 16 * 2**20))
            if not chunk:
                raise ArtifactError(f"the artifact '{path}' is truncated inside '{info.filename}'")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _data_offset(file, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, which is read, not trusted."""
    header = b""
    if info.header_offset >= 0:
        file.seek(info.header_offset)
        header = file.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise ArtifactError(f"the artifact's member '{info.filename}' has no valid local header")
    fields = _LOCAL_HEADER.unpack(header)
    return info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]


def map_shards(path: Path, infos: list[zipfile.ZipInfo]) -> dict[str, torch.Tensor]:
    """Every tensor of the shard members, as views of the mapped artifact file."""
    tensors: dict[str, torch.Tensor] = {}
    with path.open("rb") as file:
        size = path.stat().st_size
        if not size:
            return tensors
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        for info in infos:
            start = _data_offset(file, info)
            if start + info.file_size > size:
                raise ArtifactError(f"the artifact's member '{info.filename}' runs past the end of the file")
            where = f"the artifact's weight shard '{info.filename}'"
            for name, tensor in _shard_tensors(mapped, start, info.file_size, where).items():
                if name in tensors:
                    raise ArtifactError(f"the artifact's tensor '{name[:60]}' is stored in two shards")
                tensors[name] = tensor
    return tensors


def _shard_tensors(mapped: mmap.mmap, start: int, length: int, where: str) -> dict[str, torch.Tensor]:
    """Views of one safetensors shard at `start`, its header checked entry by entry."""
    if length < 8:
        raise ArtifactError(f"{where} is not a safetensors shard")
    (header_bytes,) = struct.unpack("<Q", mapped[start:start + 8])
    if header_bytes > min(MAX_HEADER_BYTES, length - 8):
        raise ArtifactError(f"{where}: its header is larger than the shard")
    try:
        header = json.loads(mapped[start + 8:start + 8 + header_bytes].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ArtifactError(f"{where}: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: its header is not a table of tensors")
    header.pop("__metadata__", None)
    data_start, data_bytes = start + 8 + header_bytes, length - 8 - header_bytes
    spans, tensors = [], {}
    for name, entry in header.items():
        dtype, shape, (begin, end) = _entry(entry, name, where, data_bytes)
        spans.append((begin, end))
        count = end - begin
        tensors[name] = (torch.frombuffer(mapped, dtype=dtype, count=count // dtype.itemsize,
                                          offset=data_start + begin).view(shape)
                         if count else torch.empty(shape, dtype=dtype))
    spans.sort()
    if any(b < a_end for (_, a_end), (b, _) in zip(spans, spans[1:], strict=False)):
        raise ArtifactError(f"{where}: two tensors share bytes")
    return tensors


def _entry(entry, name: str, where: str, data_bytes: int) -> tuple[torch.dtype, list[int], tuple[int, int]]:
    """One header entry's dtype, shape and byte range, all consistent and inside the data."""
    bad = ArtifactError(f"{where}: the entry of tensor '{str(name)[:60]}' is malformed")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad
    dtype, shape, offsets = _DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
    if dtype is None or not isinstance(shape, list) or len(shape) > 8 or not isinstance(offsets, list) \
            or len(offsets) != 2:
        raise bad
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, *offsets]):
        raise bad
    numel = 1
    for dim in shape:
        numel *= dim
    begin, end = offsets
    if not begin <= end <= data_bytes or end - begin != numel * dtype.itemsize:
        raise bad
    return dtype, shape, (begin, end)
