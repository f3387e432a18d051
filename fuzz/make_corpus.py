"""Write the seed corpus (fuzz/corpus/): small valid deltas against the sandbox tree, plus a few
hostile ones. Re-run after changing harness.TREE: ``python3 -m fuzz.make_corpus``.

Each seed exists in both input modes of the harness: as an op stream (mode byte 0 or 2) and as a
whole delta file (mode byte 1).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from fuzz.harness import TREE
from podman_delta.tardiff.format import DeltaWriter, WriterOptions, encode_varint

CORPUS = Path(__file__).resolve().parent / "corpus"


def rec(code: int, size: int, payload: bytes = b"") -> bytes:
    return bytes((code,)) + encode_varint(size) + payload


def op(name: str, version: int = 1) -> bytes:
    """A tiny DeltaWriter program as a whole delta file."""
    buf = io.BytesIO()
    w = DeltaWriter(buf, version, WriterOptions(level=3, window_log=20, long_distance=False))
    tool, lib = TREE["usr/bin/tool"], TREE["usr/lib/libx.so.1"]
    if name == "literal":
        w.data(b"hello world\n" * 10)
    elif name == "copy":
        w.data(b"head")
        w.open(b"usr/bin/tool")
        w.copy(len(tool))
        w.data(b"tail")
    elif name == "add_seek":
        w.open(b"usr/lib/libx.so.1")
        w.add(bytes((i * 7) & 0xFF for i in range(300)))
        w.data(b"extra")
        w.seek(1000)
        w.copy(100)
        w.open(b"etc/os-release")
        w.copy(5, at=0)
        w.seek(0)
    elif name == "zstd_dict":
        import zstandard

        zd = zstandard.ZstdCompressionDict(lib, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        frame = zstandard.ZstdCompressor(dict_data=zd).compress(lib[:500] + b"new" + lib[500:])
        w.open(b"usr/lib/libx.so.1")
        w.zstd_dict(frame, len(lib))
    elif name == "multi":
        for path in ("usr/bin/tool", "etc/os-release", "usr/lib/libx.so.1"):
            w.open(path.encode())
            w.copy(min(64, len(TREE[path])), at=1)
            w.data(path.encode())
    w.close()
    return buf.getvalue()


def raw_seeds() -> dict[str, bytes]:
    """Op streams (mode byte + body), including the hostile shapes the tests cover."""
    return {
        "ops-open-copy": bytes([0]) + rec(1, 12, b"usr/bin/tool") + rec(2, 100),
        "ops-add": bytes([0]) + rec(1, 14, b"etc/os-release") + rec(3, 4, b"\x01\x02\x03\x04"),
        "ops-dict-v2": bytes([2]) + rec(1, 12, b"usr/bin/tool") + rec(5, 3, b"abc"),
        "ops-escape": bytes([0]) + rec(1, 6, b"escape") + rec(2, 8),
        "ops-dotdot": bytes([0]) + rec(1, 9, b"../secret") + rec(2, 8),
        "ops-dirlink": bytes([0]) + rec(1, 12, b"lib64/lib.so") + rec(2, 8),
        "ops-fifo": bytes([0]) + rec(1, 4, b"fifo") + rec(2, 1),
        "ops-seek-far": bytes([0]) + rec(1, 12, b"usr/bin/tool") + rec(4, 2**63) + rec(2, 1),
        "ops-huge-data": bytes([0]) + rec(0, 2**63) + b"x",
        "ops-varint": bytes([0]) + bytes((4,)) + b"\xff" * 10 + b"\x01",
    }


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    seeds = dict(raw_seeds())
    for name in ("literal", "copy", "add_seek", "multi"):
        seeds[f"file-{name}"] = bytes([1]) + op(name)
    seeds["file-zstd_dict"] = bytes([1]) + op("zstd_dict", version=2)
    for data in seeds.values():
        (CORPUS / hashlib.sha1(data).hexdigest()).write_bytes(data)
    print(f"{len(seeds)} seeds in {CORPUS}")


if __name__ == "__main__":
    main()
