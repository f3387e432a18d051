#!/usr/bin/env python3
"""Break a podman-delta delta down by new-tar member: which files make it big, and why.

Walks the delta's ops, tracks the output offset, and charges every op to the new-tar member
whose bytes it produces: DATA bytes inside a member's header blocks count as "header", other
DATA as "literal", ADD payloads as "add" (bsdiff), ZSTD_DICT frames as "zdict" (already
compressed). The per-member payload is then compressed alone with zstd to estimate what each
member costs in the delta; estimates do not sum exactly to the delta size (the real stream is
compressed as one, with a long window).

``--oracle`` also tries, for the costliest members, bsdiff4 and a zstd raw-content dictionary
frame against the OPEN source the differ chose (and against the same path in old.tar when
different), and plain zstd without a source, to show what a better per-file choice would save.

    python3 bench/analyze.py DELTA OLD.tar NEW.tar [--top 25] [--oracle] [--json OUT]
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from podman_delta.tardiff import tarindex
from podman_delta.tardiff.format import DeltaReader, Op, encode_varint

LEVEL = 19


class Member:
    __slots__ = (
        "add",
        "add_nonzero",
        "bs_ctrl",
        "bs_est",
        "bs_extra",
        "bs_nonzero",
        "bs_payload",
        "bs_sources",
        "copy",
        "entry",
        "est",
        "header",
        "literal",
        "ops_raw",
        "payload",
        "sources",
        "zdict",
        "zdict_out",
    )

    def __init__(self, entry: tarindex.TarEntry | None) -> None:
        self.entry = entry
        self.header = self.literal = self.add = self.add_nonzero = self.copy = 0
        self.zdict = self.zdict_out = self.est = 0
        self.payload = bytearray()
        self.sources: set[bytes] = set()
        self.bs_est = self.bs_extra = self.bs_nonzero = self.bs_ctrl = self.ops_raw = 0
        self.bs_payload = bytearray()
        self.bs_sources: dict[str, int] = defaultdict(int)


def _charge(members, starts, pos: int, n: int, kind: str, data: bytes | None, source: bytes):
    """Charge output bytes [pos, pos+n) to the members they fall in."""
    end = pos + n
    off = 0
    while pos < end:
        i = bisect.bisect_right(starts, pos) - 1
        m = members[i]
        e = m.entry
        nxt = starts[i + 1] if i + 1 < len(starts) else end
        take = min(end, nxt) - pos
        if kind == "data":
            hdr_end = e.data_offset if e is not None else nxt
            h = max(0, min(pos + take, hdr_end) - pos)
            m.header += h
            m.literal += take - h
            if data is not None and take - h:
                m.payload += data[off + h : off + take]
        elif kind == "add":
            m.add += take
            if data is not None:
                chunk = data[off : off + take]
                m.add_nonzero += take - chunk.count(0)
                m.payload += chunk
            m.sources.add(source)
        elif kind == "copy":
            m.copy += take
            m.sources.add(source)
        pos += take
        off += take


def analyze(delta: Path, new_tar: Path) -> tuple[list[Member], dict]:
    with open(new_tar, "rb") as f:
        entries = list(tarindex.scan(f))
    members = [Member(e) for e in entries]
    starts = [e.header_offset for e in entries]
    # A pseudo-member for the end-of-archive blocks.
    tail = Member(None)
    members.append(tail)
    starts.append(entries[-1].end_offset if entries else 0)
    by_data = {e.data_offset: i for i, e in enumerate(entries)}
    headers_blob = bytearray()
    skeleton = bytearray()  # op codes, varints and OPEN names: the cost of the ops themselves
    # The same stream cut in two, in order: what the format makes every delta carry (tar
    # headers and padding as DATA, op codes, sizes, OPEN names, SEEK offsets) and the rest.
    structure, content = bytearray(), bytearray()
    ops = defaultdict(int)
    pos = 0
    source = b""
    with open(delta, "rb") as f:
        reader = DeltaReader(f)
        for rec in reader:
            ops[rec.op.name] += 1
            piece = bytes([rec.op]) + encode_varint(rec.size) + rec.name
            skeleton += piece
            structure += piece
            if rec.op is not Op.DATA:  # DATA ops mostly carry headers: not the file's fault
                members[bisect.bisect_right(starts, pos) - 1].ops_raw += len(piece)
            if rec.op is Op.OPEN:
                source = rec.name
            elif rec.op is Op.SEEK:
                pass
            elif rec.op is Op.COPY:
                _charge(members, starts, pos, rec.size, "copy", None, source)
                pos += rec.size
            elif rec.op is Op.DATA:
                data = reader.read_payload()
                i = bisect.bisect_right(starts, pos) - 1
                _charge(members, starts, pos, rec.size, "data", data, source)
                for header, body, rest in _member_pieces(members, starts, i, pos, data):
                    headers_blob += header  # for a global compressed estimate
                    structure += header
                    content += body
                    structure += rest
                pos += rec.size
            elif rec.op is Op.ADD:
                data = reader.read_payload()
                _charge(members, starts, pos, rec.size, "add", data, source)
                content += data
                pos += rec.size
            elif rec.op is Op.ZSTD_DICT:
                frame = reader.read_payload()
                content += frame
                size = zstandard.frame_content_size(frame)
                i = bisect.bisect_right(starts, pos) - 1
                if size < 0:
                    idx = by_data.get(pos)
                    size = entries[idx].size if idx is not None else 0
                m = members[i]
                m.zdict += len(frame)
                m.zdict_out += size
                m.sources.add(source)
                pos += size
    stats = {"ops": dict(ops), "output_bytes": pos, "headers_raw": len(headers_blob)}
    cctx = zstandard.ZstdCompressor(level=LEVEL)
    stats["headers_zstd"] = len(cctx.compress(bytes(headers_blob))) if headers_blob else 0
    stats["skeleton_raw"] = len(skeleton)
    stats["skeleton_zstd"] = len(cctx.compress(bytes(skeleton))) if skeleton else 0
    stats["ops_rate"] = stats["skeleton_zstd"] / max(1, len(skeleton))
    params = zstandard.ZstdCompressionParameters.from_level(LEVEL, window_log=25, enable_ldm=True)
    whole = zstandard.ZstdCompressor(compression_params=params)
    stats["structure_raw"], stats["content_raw"] = len(structure), len(content)
    stats["structure_zstd"] = len(whole.compress(bytes(structure)))
    stats["content_zstd"] = len(whole.compress(bytes(content)))
    return members, stats


def _member_pieces(members, starts, i, pos, data):
    """Cut a DATA payload written at ``pos`` (inside member ``i``) at new-tar member bounds.

    Yields, per member it covers, (header, body, rest) slices of ``data``: the bytes before the
    member's content (its header blocks and PAX records; all of the end-of-archive tail), those
    inside a regular file's content, and those after it (padding; everything after the header
    of a non-regular member).
    """
    base, end = pos, pos + len(data)
    while pos < end and i < len(members):
        e = members[i].entry
        nxt = min(end, starts[i + 1] if i + 1 < len(starts) else end)
        if e is None:
            lo = hi = nxt
        else:
            lo = max(pos, min(nxt, e.data_offset))
            hi = max(lo, min(nxt, e.data_offset + e.size)) if e.is_regular else lo
        lo, hi, stop = lo - base, hi - base, nxt - base
        yield data[pos - base : lo], data[lo:hi], data[hi:stop]
        pos = nxt
        i += 1


def bsdiff_attribution(patch: Path, members: list[Member], starts: list[int], old_tar: Path):
    """Charge a whole-tar bsdiff4 patch (BSDIFF40) to the same new-tar members.

    Diff bytes and extra bytes that land in a member's content go to its ``bs_payload`` (what
    bsdiff had to say about it); ``bs_sources`` counts which old members the diff bytes were
    read from, to show cross-file matches our per-file sources missed. Each member also pays
    its share of the compressed control block (per triple that starts in it), as our members
    pay their share of the op skeleton.
    """
    import bsdiff4.format

    with open(old_tar, "rb") as f:
        old_entries = list(tarindex.scan(f))
    old_starts = [e.header_offset for e in old_entries]
    with open(patch, "rb") as f:
        f.seek(8)
        control_bz2 = bsdiff4.core.decode_int64(f.read(8))
        payload_bz2 = patch.stat().st_size - 32 - control_bz2  # diff and extra blocks
        f.seek(0)
        _, control, diff, extra = bsdiff4.format.read_patch(f)
    per_triple = control_bz2 / max(1, len(control) // 24)
    dec = bsdiff4.core.decode_int64
    newpos = oldpos = dpos = epos = 0
    header_blob = bytearray()  # diff/extra bytes that land in tar headers and padding

    def charge(pos: int, data: bytes, is_diff: bool, opos: int) -> None:
        end, off = pos + len(data), 0
        while pos < end:
            i = bisect.bisect_right(starts, pos) - 1
            m = members[i]
            nxt = starts[i + 1] if i + 1 < len(starts) else end
            take = min(end, nxt) - pos
            content_from = m.entry.data_offset if m.entry is not None else nxt
            lo = max(pos, content_from)
            if lo > pos:
                header_blob.extend(data[off : off + min(take, lo - pos)])
            if lo < pos + take:
                chunk = data[off + lo - pos : off + take]
                m.bs_payload += chunk
                if is_diff:
                    m.bs_nonzero += len(chunk) - chunk.count(0)
                    j = bisect.bisect_right(old_starts, opos + lo - pos) - 1
                    if j >= 0:
                        m.bs_sources[old_entries[j].path] += len(chunk)
                else:
                    m.bs_extra += len(chunk)
            pos += take
            off += take
            opos += take

    for k in range(0, len(control), 24):
        owner = members[bisect.bisect_right(starts, newpos) - 1]
        owner.bs_ctrl += per_triple
        x, y, z = (
            dec(control[k : k + 8]),
            dec(control[k + 8 : k + 16]),
            dec(control[k + 16 : k + 24]),
        )
        if x:
            charge(newpos, diff[dpos : dpos + x], True, oldpos)
        newpos += x
        oldpos += x
        dpos += x
        if y:
            charge(newpos, extra[epos : epos + y], False, 0)
        newpos += y
        epos += y
        oldpos += z
    cctx = zstandard.ZstdCompressor(level=LEVEL)
    for m in members:
        m.bs_est = len(cctx.compress(bytes(m.bs_payload))) if m.bs_payload else 0
        m.bs_est += round(m.bs_ctrl)
        m.bs_payload = bytearray()
    return {
        "bsdiff_headers_zstd": len(cctx.compress(bytes(header_blob))),
        "bsdiff_control_bz2": control_bz2,
        "bsdiff_payload_bz2": payload_bz2,
        "bsdiff_triples": len(control) // 24,
    }


def estimate(members: list[Member], ops_rate: float) -> None:
    """Per-member cost: its payload compressed alone, zstd frames, and its share of the ops.

    The compressed op skeleton (codes, sizes, OPEN names) is charged in proportion to the raw
    op bytes of each member.
    """
    cctx = zstandard.ZstdCompressor(level=LEVEL)
    for m in members:
        m.est = (len(cctx.compress(bytes(m.payload))) if m.payload else 0) + m.zdict
        m.est += round(m.ops_raw * ops_rate)


def oracle(m: Member, old_tar: Path, new_tar: Path, old_index: dict) -> dict:
    """Per-file alternatives for one new member against its source(s)."""
    import bsdiff4

    with open(new_tar, "rb") as f:
        new = tarindex.read_at(f, m.entry.data_offset, m.entry.size)
    out = {"plain_zstd19": len(zstandard.ZstdCompressor(level=LEVEL).compress(new))}
    cands = {s.decode(errors="replace") for s in m.sources}
    if m.entry.path in old_index:
        cands.add(m.entry.path)
    with open(old_tar, "rb") as f:
        for name in sorted(cands)[:3]:
            e = old_index.get(name)
            if e is None:
                continue
            old = tarindex.read_at(f, e.data_offset, e.size)
            d = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            params = zstandard.ZstdCompressionParameters.from_level(
                LEVEL,
                source_size=len(new),
                dict_size=len(old),
                window_log=max(10, min(31, (max(len(old), len(new)) - 1).bit_length())),
            )
            z = zstandard.ZstdCompressor(dict_data=d, compression_params=params)
            r = {"zstd_dict": len(z.compress(new))}
            if len(old) + len(new) < 64 << 20:
                r["bsdiff4"] = len(bsdiff4.diff(old, new))
            out[name] = r
    return out


def _compare(members: list[Member]) -> None:
    """Print where the whole-tar bsdiff spends fewer bytes than we do, by group and by member."""
    real = [m for m in members if m.entry is not None]
    ours, theirs = sum(m.est for m in real), sum(m.bs_est for m in real)
    print(
        f"content estimate (zstd -{LEVEL} per member): ours {ours:,}, whole-tar bsdiff {theirs:,}"
    )
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for m in real:
        g = groups[_group(m.entry.path)]
        g[0] += m.est
        g[1] += m.bs_est
    print("\ngroups where we lose most (ours - bsdiff, ours, bsdiff):")
    for name, (a, b) in sorted(groups.items(), key=lambda kv: kv[1][1] - kv[1][0])[:12]:
        print(f"{a - b:>+10,} {a:>10,} {b:>10,}  {name}")
    print(
        "\nmembers where we lose most (ours - bsdiff, ours, bsdiff, bsdiff extra, path, "
        "our sources | bsdiff's main old members):"
    )
    for m in sorted(real, key=lambda m: m.bs_est - m.est)[:25]:
        if m.est <= m.bs_est:
            break
        ours_src = ",".join(sorted(s.decode(errors="replace") for s in m.sources)) or "-"
        top = sorted(m.bs_sources.items(), key=lambda kv: -kv[1])[:3]
        theirs_src = ", ".join(f"{p} ({n:,})" for p, n in top) or "-"
        print(
            f"{m.est - m.bs_est:>+10,} {m.est:>9,} {m.bs_est:>9,} {m.bs_extra:>9,}  "
            f"{m.entry.path}  <- {ours_src[:100]} | {theirs_src[:200]}"
        )
    wins = sum(m.bs_est - m.est for m in real if m.bs_est > m.est)
    losses = sum(m.est - m.bs_est for m in real if m.est > m.bs_est)
    print(f"\nsum over members: we lose {losses:,} where bsdiff is smaller, win {wins:,} elsewhere")


def _group(path: str) -> str:
    """A coarse owner for a path: the Python distribution, or the first three components."""
    if "site-packages/" in path:
        top = path.split("site-packages/", 1)[1].split("/", 1)[0]
        return "site-packages/" + re.sub(r"-[0-9][^/]*\.(dist-info|data)$", "", top)
    return "/".join(path.split("/")[:3])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("delta", type=Path)
    ap.add_argument("old_tar", type=Path)
    ap.add_argument("new_tar", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--oracle", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--bsdiff", type=Path, help="a whole-tar bsdiff4 patch of the same pair, to compare with"
    )
    args = ap.parse_args(argv)

    members, stats = analyze(args.delta, args.new_tar)
    estimate(members, stats["ops_rate"])
    if args.bsdiff:
        with open(args.new_tar, "rb") as f:
            starts = [e.header_offset for e in tarindex.scan(f)]
        starts.append(members[-2].entry.end_offset)
        bs = bsdiff_attribution(args.bsdiff, members, starts, args.old_tar)
        print(
            f"whole-tar bsdiff: {bs['bsdiff_triples']:,} triples, control "
            f"{bs['bsdiff_control_bz2']:,} bytes (bz2); its diff/extra bytes in headers and "
            "padding compress to "
            f"{bs['bsdiff_headers_zstd']:,} (ours: header DATA {stats['headers_zstd']:,})"
        )
        _compare(members)
        print(
            f"whole-tar bsdiff by the same cut: control {bs['bsdiff_control_bz2']:,} (where to "
            f"copy from), diff+extra {bs['bsdiff_payload_bz2']:,} (its header bytes included)"
        )
    delta_size = args.delta.stat().st_size
    print(
        f"format-mandated structure (tar headers and padding as DATA, op codes, sizes, OPEN "
        f"names, SEEK offsets), compressed alone: {stats['structure_zstd']:,} "
        f"(raw {stats['structure_raw']:,}); content (file bytes, ADD diffs, op-5 frames): "
        f"{stats['content_zstd']:,} (raw {stats['content_raw']:,})"
    )
    tot = defaultdict(int)
    for m in members:
        for k in ("header", "literal", "add", "add_nonzero", "copy", "zdict", "zdict_out", "est"):
            tot[k] += getattr(m, k)
    print(f"delta {args.delta}: {delta_size:,} bytes; ops {stats['ops']}")
    print(
        f"output {stats['output_bytes']:,} bytes: copy {tot['copy']:,}, literal {tot['literal']:,}"
        f", add {tot['add']:,} ({tot['add_nonzero']:,} non-zero), zstd-dict frames "
        f"{tot['zdict']:,} -> {tot['zdict_out']:,}, header DATA {tot['header']:,}"
    )
    print(
        f"estimates (zstd -{LEVEL} per member): content {tot['est']:,}; all header DATA "
        f"together {stats['headers_zstd']:,} (raw {stats['headers_raw']:,}); op codes, sizes and "
        f"OPEN names together {stats['skeleton_zstd']:,} (raw {stats['skeleton_raw']:,})"
    )
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for m in members:
        if m.entry is None:
            continue
        g = groups[_group(m.entry.path)]
        g[0] += m.est
        g[1] += 1
        g[2] += m.entry.size if m.entry.is_regular else 0
    tiny = sum(m.est for m in members if m.entry is not None and m.entry.size < 96)
    print(f"members under 96 bytes (always literal): estimated {tiny:,}")
    print("\ncostliest groups (estimated bytes, members, content bytes):")
    for name, (est, n, size) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"{est:>10,} {n:>6} {size:>12,}  {name}")
    ranked = sorted((m for m in members if m.entry is not None), key=lambda m: -m.est)
    old_index = {}
    if args.oracle:
        with open(args.old_tar, "rb") as f:
            old_index = {e.path: e for e in tarindex.scan(f) if e.is_regular}
    rows = []
    print(f"\ntop {args.top} members by estimated cost:")
    print(
        f"{'est':>10} {'size':>11} {'literal':>10} {'add':>10} {'add!=0':>9} {'zdict':>9}  path"
        "  <- sources"
    )
    for m in ranked[: args.top]:
        e = m.entry
        srcs = ",".join(sorted(s.decode(errors="replace") for s in m.sources))[:120]
        print(
            f"{m.est:>10,} {e.size:>11,} {m.literal:>10,} {m.add:>10,} {m.add_nonzero:>9,} "
            f"{m.zdict:>9,}  {e.path}  <- {srcs or '-'}"
        )
        row = {
            "path": e.path,
            "size": e.size,
            "est": m.est,
            "literal": m.literal,
            "add": m.add,
            "add_nonzero": m.add_nonzero,
            "zdict": m.zdict,
            "copy": m.copy,
            "sources": sorted(s.decode(errors="replace") for s in m.sources),
        }
        if args.oracle and e.is_regular and e.size:
            row["oracle"] = oracle(m, args.old_tar, args.new_tar, old_index)
            print(f"{'':>10} oracle: {json.dumps(row['oracle'])}")
        rows.append(row)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"delta_bytes": delta_size, "stats": stats, "totals": tot, "top": rows}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
