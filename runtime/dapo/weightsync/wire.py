"""The wire format of one sync: headers, bucket manifests, packing and checksums (see dapo.weightsync)."""

from __future__ import annotations

import zlib
from typing import Iterable

import torch

from dapo.weightsync.config import ALIGN, WeightSyncError

MAGIC = 0x44415057  # "DAPW": guards against a peer that speaks another protocol
KIND_BUCKET = 1
KIND_END = 2

def align(offset: int, alignment: int = ALIGN) -> int:
    """Smallest multiple of ``alignment`` that is >= ``offset``."""
    return (offset + alignment - 1) // alignment * alignment

def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of ``str(dtype)`` ('torch.bfloat16' -> torch.bfloat16)."""
    attr = name.removeprefix("torch.")
    dtype = getattr(torch, attr, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"manifest names unknown dtype {name!r}")
    return dtype


def nbytes_of(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a contiguous tensor: prod(shape) * itemsize."""
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * torch.empty((), dtype=dtype).element_size()


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of a contiguous tensor's bytes."""
    return tensor.reshape(-1).view(torch.uint8)


def crc32(byte_tensor: torch.Tensor) -> int:
    """CRC-32 (zlib) of a uint8 tensor's bytes; copies to host memory when on a GPU."""
    host = byte_tensor.detach().cpu().contiguous()
    return zlib.crc32(memoryview(host.numpy())) & 0xFFFFFFFF

def header_tensor(version: int, kind: int, manifest: bytes, device: torch.device) -> torch.Tensor:
    return torch.tensor([MAGIC, version, kind, len(manifest)], dtype=torch.int64, device=device)


def manifest_tensor(manifest: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(manifest), dtype=torch.uint8).to(device)

def check_item(name, tensor, seen: set[str]) -> None:
    if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
        raise TypeError(f"send() expects (str, Tensor) pairs, got ({type(name).__name__}, "
                        f"{type(tensor).__name__})")
    if name in seen:
        raise ValueError(f"tensor name {name!r} is sent twice in one sync")
    seen.add(name)

def unpack(manifest: dict, data: torch.Tensor, want_checksums: bool,
            sender: str) -> list[tuple[str, torch.Tensor]]:
    """Views of each tensor in a received bucket, validated against the manifest:
    offsets inside the bucket and non-overlapping, nbytes = prod(shape) * itemsize, and
    CRC-32 equal to the sender's when it sent checksums."""
    nbytes = int(manifest["nbytes"])
    if data.numel() != nbytes:
        raise WeightSyncError(f"bucket has {data.numel()} bytes, manifest says {nbytes}")
    batch, end_of_previous = [], 0
    for name, dtype_name, shape, offset, size, crc in manifest["tensors"]:
        dtype = dtype_from_name(dtype_name)
        if size != nbytes_of(shape, dtype):
            raise WeightSyncError(f"{name!r}: {size} bytes do not fit shape {shape} {dtype_name}")
        if offset < end_of_previous or offset + size > nbytes:
            raise WeightSyncError(f"{name!r}: bytes [{offset}, {offset + size}) overlap or leave "
                                  f"the {nbytes}-byte bucket")
        end_of_previous = offset + size
        piece = data[offset:offset + size]
        if crc is None and want_checksums:
            raise WeightSyncError(
                f"this receiver verifies checksums but {sender} sends none; set "
                "verify_checksums=True on the sender too")
        if crc is not None:
            got = crc32(piece)
            if got != crc:
                raise WeightSyncError(
                    f"checksum mismatch for {name!r}: crc32 {got:#010x} received, {crc:#010x} "
                    f"sent by {sender}")
        batch.append((name, piece.view(dtype).view(shape)))
    return batch
