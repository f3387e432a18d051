"""Round trips through the differ and the real patcher, on generated PAX tars."""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podman_delta.cli import main
from podman_delta.errors import DeltaTooLargeError
from podman_delta.tardiff.differ import DiffOptions, diff, diff_file
from podman_delta.tardiff.format import DeltaReader, Op
from podman_delta.tardiff.patcher import apply
from podman_delta.tardiff.sources import open_source

# An entry: (name, kind, payload, extra) with kind in file/dir/symlink/hardlink/whiteout.
Entry = tuple


def make_tar(path: Path, entries: list[Entry]) -> Path:
    """Write a PAX tar with the given entries, in order."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload, extra in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_600_000_000
            info.mode = extra.get("mode", 0o644 if kind != "dir" else 0o755)
            info.uid, info.gid = extra.get("uid", 0), extra.get("gid", 0)
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in extra.get("xattrs", {}).items()}
            if kind == "file":
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tf.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, payload
                tf.addfile(info)
    return path


def rebuilt(delta: Path, olds: list[Path]) -> bytes:
    """What the real patcher makes of ``delta`` with the old tars (stacked) as the source."""
    out = io.BytesIO()
    source = open_source(olds)
    try:
        with open(delta, "rb") as f:
            apply(f, source, out)
    finally:
        source.close()
    return out.getvalue()


def roundtrip(olds: list[Path], new: Path, tmp: Path, **opts) -> tuple[int, list]:
    """Diff, apply with the real patcher against the old tars, return (delta size, records)."""
    delta = tmp / "delta"
    options = DiffOptions(check_size=False, threads=2, **opts)
    stats = diff_file(olds, new, delta, options)
    assert stats.delta_size == delta.stat().st_size
    assert rebuilt(delta, olds) == new.read_bytes()
    with open(delta, "rb") as f:
        reader = DeltaReader(f)
        records = list(reader)
        assert reader.version == stats.version
    return stats.delta_size, records


def text(seed: int, lines: int) -> bytes:
    rnd = random.Random(seed)
    words = [f"w{rnd.randrange(10**6)}" for _ in range(200)]
    return "".join(
        f"def f{i}({rnd.choice(words)}):  # {' '.join(rnd.choices(words, k=6))}\n"
        for i in range(lines)
    ).encode()


def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- properties

_names = st.sampled_from(["a", "b", "c", "lib/x.so.1.2", "lib/x.so.1.3", "d/e/f", "g" * 120])
_content = st.one_of(
    st.binary(max_size=300),
    st.integers(0, 50).map(lambda s: text(s, 40)),
    st.integers(0, 50).map(lambda s: rand(s, 3000)),
)
_meta = st.fixed_dictionaries(
    {
        "mode": st.sampled_from([0o644, 0o600, 0o755, 0o4755]),
        "uid": st.integers(0, 70000),
        "xattrs": st.dictionaries(st.sampled_from(["user.a", "user.b"]), st.text(max_size=8)),
    }
)


@st.composite
def trees(draw) -> list[Entry]:
    entries: list[Entry] = [
        ("d", "dir", None, {}),
        ("d/e", "dir", None, {}),
        ("lib", "dir", None, {}),
    ]
    files = draw(st.dictionaries(_names, st.tuples(_content, _meta), max_size=6))
    for name, (payload, meta) in files.items():
        entries.append((name, "file", payload, meta))
    if files:
        first = sorted(files)[0]
        entries.append(("link-" + str(len(files)), "hardlink", first, {}))
    entries.append(("sym", "symlink", draw(_names), {}))
    return entries


def _mutate(entries: list[Entry], rnd: random.Random) -> list[Entry]:
    out = []
    for name, kind, payload, meta in entries:
        if kind == "file":
            choice = rnd.randrange(5)
            if choice == 0:
                continue  # removed
            if choice == 1:
                payload = payload + payload[: len(payload) // 2]  # grown
            elif choice == 2:
                payload = payload[: len(payload) // 2]  # shrunk
            elif choice == 3:
                name = name + ".moved"  # renamed
        out.append((name, kind, payload, meta))
    return out


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(old=trees(), seed=st.integers(0, 1000), fmt=st.sampled_from(["auto", "tardf1"]))
def test_random_trees_roundtrip(tmp_path: Path, old: list[Entry], seed: int, fmt: str) -> None:
    base = tmp_path / str(seed)
    base.mkdir(exist_ok=True)
    new_entries = _mutate(old, random.Random(seed))
    # hardlinks must point at something present in the same tar
    present = {n for n, k, _, _ in new_entries if k == "file"}
    new_entries = [e for e in new_entries if e[1] != "hardlink" or e[2] in present]
    old_tar = make_tar(base / "old.tar", old)
    new_tar = make_tar(base / "new.tar", new_entries)
    _, records = roundtrip([old_tar], new_tar, base, format=fmt)
    if fmt == "tardf1":
        assert all(r.op is not Op.ZSTD_DICT for r in records)


# --------------------------------------------------------------------------- matching


def test_identical_content_is_copied_from_anywhere(tmp_path: Path) -> None:
    blob = rand(1, 200_000)
    old = make_tar(tmp_path / "old.tar", [("usr/share/a.bin", "file", blob, {})])
    new = make_tar(tmp_path / "new.tar", [("opt/elsewhere.bin", "file", blob, {})])
    size, records = roundtrip([old], new, tmp_path)
    assert size < 2_000
    assert any(r.op is Op.COPY and r.size == len(blob) for r in records)


def test_versioned_rename_is_found(tmp_path: Path) -> None:
    blob = rand(2, 300_000)
    changed = blob[:1000] + b"patched!" + blob[1008:150_000] + rand(3, 500) + blob[150_000:]
    old = make_tar(tmp_path / "old.tar", [("usr/lib/libfoo.so.1.2", "file", blob, {})])
    new = make_tar(tmp_path / "new.tar", [("usr/lib/libfoo.so.1.3", "file", changed, {})])
    size, records = roundtrip([old], new, tmp_path, format="tardf1")
    assert size < 5_000
    assert any(r.op is Op.OPEN and r.name == b"usr/lib/libfoo.so.1.2" for r in records)


def test_dist_info_rename_is_found(tmp_path: Path) -> None:
    old_meta = text(4, 400)
    new_meta = old_meta.replace(b"def f1(", b"def g1(")
    old = make_tar(tmp_path / "old.tar", [("pkg-1.0.dist-info/RECORD", "file", old_meta, {})])
    new = make_tar(tmp_path / "new.tar", [("pkg-1.1.dist-info/RECORD", "file", new_meta, {})])
    size, _ = roundtrip([old], new, tmp_path)
    assert size < len(new_meta) // 20


def test_code_moved_between_files_is_found(tmp_path: Path) -> None:
    a, b = text(5, 600), text(6, 600)
    # a package reorganises: the new module holds half of each old module
    merged = a[: len(a) // 2] + b"# glue\n" + b[len(b) // 2 :]
    old = make_tar(
        tmp_path / "old.tar", [("pkg/alpha.py", "file", a, {}), ("pkg/beta.py", "file", b, {})]
    )
    new = make_tar(tmp_path / "new.tar", [("pkg/core/merged.py", "file", merged, {})])
    literal = len(zstandard.ZstdCompressor(level=19).compress(merged))
    size, records = roundtrip([old], new, tmp_path, format="tardf1")
    opened = {r.name for r in records if r.op is Op.OPEN}
    assert opened == {b"pkg/alpha.py", b"pkg/beta.py"}
    assert size < literal // 10


def test_unreadable_and_whited_out_files_are_never_sources(tmp_path: Path) -> None:
    secret, gone, kept = rand(7, 50_000), rand(8, 50_000), rand(9, 50_000)
    old1 = make_tar(
        tmp_path / "old1.tar",
        [
            ("etc/shadow", "file", secret, {"mode": 0o600}),
            ("opt/gone", "file", gone, {}),
            ("var/o", "dir", None, {}),
            ("var/o/inside", "file", kept, {}),
        ],
    )
    old2 = make_tar(
        tmp_path / "old2.tar",
        [
            ("opt/.wh.gone", "file", b"", {}),
            ("var/o/.wh..wh..opq", "file", b"", {}),
            ("var/o/new", "file", kept + b"x", {}),
        ],
    )
    new = make_tar(
        tmp_path / "new.tar",
        [
            ("etc/shadow", "file", secret, {}),
            ("opt/gone", "file", gone, {}),
            ("var/o/inside", "file", kept, {}),
            ("var/o/new", "file", kept + b"y", {}),
        ],
    )
    _, records = roundtrip([old1, old2], new, tmp_path)
    opened = {r.name for r in records if r.op is Op.OPEN}
    assert opened == {b"var/o/new"}


def test_hardlink_name_used_when_original_is_overwritten(tmp_path: Path) -> None:
    blob = rand(10, 40_000)
    old1 = make_tar(
        tmp_path / "old1.tar", [("a/orig", "file", blob, {}), ("a/link", "hardlink", "a/orig", {})]
    )
    old2 = make_tar(tmp_path / "old2.tar", [("a/orig", "file", b"replaced" * 20, {})])
    new = make_tar(tmp_path / "new.tar", [("b/copy", "file", blob, {})])
    _, records = roundtrip([old1, old2], new, tmp_path)
    assert [r.name for r in records if r.op is Op.OPEN] == [b"a/link"]


def test_tardf1_has_no_op5_and_tardf2_may(tmp_path: Path) -> None:
    base = text(11, 3000)
    changed = base.replace(b"def f1", b"def F1").replace(b"w", b"W", 200)
    old = make_tar(tmp_path / "old.tar", [("big.txt", "file", base, {})])
    new = make_tar(tmp_path / "new.tar", [("big.txt", "file", changed, {})])
    _, records = roundtrip([old], new, tmp_path, format="tardf1")
    assert not any(r.op is Op.ZSTD_DICT for r in records)
    _, records2 = roundtrip([old], new, tmp_path, format="tardf2")
    assert records2  # a valid tardf2 delta (op 5 only where it pays)


# --------------------------------------------------------------------------- size check, CLI


def test_incompressible_new_layer_is_refused(tmp_path: Path) -> None:
    old = make_tar(tmp_path / "old.tar", [("a", "file", b"hello" * 100, {})])
    new = make_tar(tmp_path / "new.tar", [("b", "file", rand(12, 300_000), {})])
    delta = tmp_path / "delta"
    with pytest.raises(DeltaTooLargeError):
        diff_file([old], new, delta)
    assert not delta.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".podman-delta")]
    assert main(["diff", str(old), str(new), str(delta)]) == 6
    assert not delta.exists()
    assert main(["diff", "--no-size-check", str(old), str(new), str(delta)]) == 0
    assert delta.exists()


def test_size_check_compresses_only_until_the_delta_is_known_smaller(tmp_path: Path) -> None:
    """A small delta of a big layer: the layer is compressed only until it outgrows the delta."""
    blobs = [rand(30 + i, 1_000_000) for i in range(6)]
    old = make_tar(tmp_path / "old.tar", [(f"f{i}", "file", b, {}) for i, b in enumerate(blobs)])
    new = make_tar(
        tmp_path / "new.tar", [(f"f{i}", "file", b + b"!", {}) for i, b in enumerate(blobs)]
    )
    stats = diff_file([old], new, tmp_path / "delta", DiffOptions())
    assert not stats.compressed_exact
    assert stats.delta_size < stats.compressed_new_size < 3_000_000  # stopped early
    assert "zstd over" in stats.compressed_text()
    # compressing the whole layer gives more than the early stop measured
    whole = len(zstandard.ZstdCompressor(level=3).compress(new.read_bytes()))
    assert whole > 5_000_000


def test_cli_diff_and_compressed_inputs(tmp_path: Path) -> None:
    blob = text(13, 2000)
    old = make_tar(tmp_path / "old.tar", [("x.py", "file", blob, {})])
    new = make_tar(tmp_path / "new.tar", [("x.py", "file", blob + b"# more\n", {})])
    old_gz = tmp_path / "old.tar.gz"
    old_gz.write_bytes(gzip.compress(old.read_bytes()))
    new_zst = tmp_path / "new.tar.zst"
    new_zst.write_bytes(zstandard.ZstdCompressor().compress(new.read_bytes()))
    delta = tmp_path / "d.tardiff"
    assert (
        main(
            ["diff", "--format", "tardf1", "--threads", "1", str(old_gz), str(new_zst), str(delta)]
        )
        == 0
    )
    assert delta.read_bytes()[:8] == b"tardf1\n\x00"
    out = io.BytesIO()
    with open(delta, "rb") as f:
        apply(f, open_source([old]), out)
    assert out.getvalue() == new.read_bytes()


def test_diff_to_unseekable_stream(tmp_path: Path) -> None:
    blob = rand(14, 10_000)
    old = make_tar(tmp_path / "old.tar", [("a", "file", blob, {})])
    new = make_tar(tmp_path / "new.tar", [("a", "file", blob[:5000] + b"!" + blob[5001:], {})])
    buf = io.BytesIO()

    class Pipe(io.RawIOBase):
        """A write-only, unseekable sink like stdout on a pipe."""

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[override]
            return buf.write(b)

    stats = diff([old], new, Pipe(), DiffOptions(check_size=False))
    assert len(buf.getvalue()) == stats.delta_size
    out = io.BytesIO()
    apply(io.BytesIO(buf.getvalue()), open_source([old]), out)
    assert out.getvalue() == new.read_bytes()


# --------------------------------------------------------------------------- big files


@pytest.mark.parametrize("huge", [False, True])
def test_big_files_are_diffed_in_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, huge: bool
) -> None:
    from podman_delta.tardiff import differ

    if huge:  # stream the file from the writer thread instead of holding it
        monkeypatch.setattr(differ, "HUGE", 200_000)
    blob = rand(15, 600_000)
    changed = blob[:100_000] + rand(16, 3000) + blob[100_000:400_000] + b"tail" + blob[400_000:]
    same = rand(17, 300_000)
    old = make_tar(
        tmp_path / "old.tar", [("big.bin", "file", blob, {}), ("same.bin", "file", same, {})]
    )
    new = make_tar(
        tmp_path / "new.tar", [("big.bin", "file", changed, {}), ("copy.bin", "file", same, {})]
    )
    size, records = roundtrip([old], new, tmp_path, format="tardf1", max_bsdiff_size=128 << 10)
    assert size < 12_000
    assert any(r.op is Op.COPY and r.size == len(same) for r in records)


@pytest.mark.parametrize("huge", [False, True])
def test_unchanged_windows_of_big_files_are_copied_without_bsdiff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, huge: bool
) -> None:
    from podman_delta.tardiff import differ

    if huge:
        monkeypatch.setattr(differ, "HUGE", 200_000)
    calls = []
    real = differ.bsdiff_ops
    monkeypatch.setattr(differ, "bsdiff_ops", lambda *a: calls.append(1) or real(*a))
    blob = rand(20, 1_000_000)
    changed = blob[:700_000] + b"patched" + blob[700_007:]
    old = make_tar(tmp_path / "old.tar", [("big.bin", "file", blob, {})])
    new = make_tar(tmp_path / "new.tar", [("big.bin", "file", changed, {})])
    size, records = roundtrip([old], new, tmp_path, format="tardf1", max_bsdiff_size=128 << 10)
    assert size < 2_000
    windows = -(-len(changed) // (64 << 10))
    assert len(calls) == 1, f"bsdiff ran on {len(calls)} of {windows} windows"
    assert sum(r.size for r in records if r.op is Op.COPY) >= len(changed) - (64 << 10)


def test_short_diff_blocks_between_jumps_become_data(tmp_path: Path) -> None:
    """Short matches scattered in inserted data would each cost a SEEK: they go out as DATA."""
    rnd = random.Random(21)
    old_data = bytes(rnd.randrange(256) for _ in range(200_000))
    pieces = []
    for _ in range(400):  # many 20-byte matches scattered over the old file, with new bytes
        start = rnd.randrange(len(old_data) - 20)
        pieces.append(old_data[start : start + 20] + bytes(rnd.randrange(256) for _ in range(30)))
    new_data = old_data[:100_000] + b"".join(pieces) + old_data[100_000:]
    old = make_tar(tmp_path / "old.tar", [("f.bin", "file", old_data, {})])
    new = make_tar(tmp_path / "new.tar", [("f.bin", "file", new_data, {})])
    _, records = roundtrip([old], new, tmp_path, format="tardf1")
    seeks = sum(r.op is Op.SEEK for r in records)
    assert seeks < 40, f"{seeks} SEEKs for 400 short scattered matches"


def test_compiled_module_follows_its_moved_source(tmp_path: Path) -> None:
    source = text(22, 500)

    def compile_(src: bytes) -> bytes:  # binary, and without the source's lines
        return b"\xa7\r\r\0\0\0\0\0" + src.replace(b"def ", b"\xe3\0\x01").replace(b"\n", b"\0")

    compiled = compile_(source)
    new_src = source[len(source) // 2 :]
    new_compiled = compile_(new_src)
    old = make_tar(
        tmp_path / "old.tar",
        [
            ("pkg/cursor.py", "file", source, {}),
            ("pkg/__pycache__/cursor.cpython-311.pyc", "file", compiled, {}),
        ],
    )
    new = make_tar(
        tmp_path / "new.tar",
        [
            ("pkg/_cursor_base.py", "file", new_src, {}),
            ("pkg/__pycache__/_cursor_base.cpython-311.pyc", "file", new_compiled, {}),
        ],
    )
    size, records = roundtrip([old], new, tmp_path, format="tardf1")
    opened = {r.name for r in records if r.op is Op.OPEN}
    assert b"pkg/__pycache__/cursor.cpython-311.pyc" in opened
    assert size < len(zstandard.ZstdCompressor(level=19).compress(new_compiled)) // 5


def test_overwritten_paths_are_never_sources(tmp_path: Path) -> None:
    first, second = rand(18, 30_000), rand(19, 30_000)
    old1 = make_tar(
        tmp_path / "old1.tar",
        [
            ("a", "file", first, {}),
            ("a", "file", second, {}),
            ("d", "dir", None, {}),
            ("d/inner", "file", first, {}),
        ],
    )
    old2 = make_tar(tmp_path / "old2.tar", [("d", "symlink", "elsewhere", {})])
    new = make_tar(tmp_path / "new.tar", [("x", "file", first, {}), ("y", "file", second, {})])
    _, records = roundtrip([old1, old2], new, tmp_path)
    assert [r.name for r in records if r.op is Op.OPEN] == [b"a"]
    assert sum(r.size for r in records if r.op is Op.DATA) > len(first)


@pytest.mark.parametrize("raw_literals", [True, False])
def test_op5_frames_with_and_without_libzstd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw_literals: bool
) -> None:
    """Op-5 frames declare no content size; without libzstd they keep Huffman literals."""
    from podman_delta.tardiff import rawframe

    if not raw_literals:
        monkeypatch.setattr(rawframe, "_lib", lambda: None)  # as on a machine without libzstd
    rng = random.Random(5)
    blocks = [text(i, 400) for i in range(60)]
    base = b"".join(blocks)
    rng.shuffle(blocks)  # code moved around within the file: a dictionary frame's strength
    inserts = [bytes(rng.choices(b"abcdefgh ", k=30)) for _ in blocks]
    changed = b"".join(b + i for b, i in zip(blocks, inserts, strict=True))
    old = make_tar(tmp_path / "old.tar", [("mod.py", "file", base, {})])
    new = make_tar(tmp_path / "new.tar", [("mod.py", "file", changed, {})])
    roundtrip([old], new, tmp_path, format="tardf2")
    with open(tmp_path / "delta", "rb") as f:
        reader = DeltaReader(f)
        frames = [reader.read_payload() for r in reader if r.op is Op.ZSTD_DICT]
    assert frames, "op 5 should win on shuffled blocks"
    for frame in frames:
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
    # Raw literals leave the inserted text readable to the op stream's compressor.
    readable = sum(i in f for i in inserts for f in frames)
    assert (readable > 0) if raw_literals else readable == 0


def test_same_inputs_give_the_same_delta_in_every_process(tmp_path: Path) -> None:
    """Reproducible deltas: two publishers (or two runs) get byte-identical output, so the same
    delta has the same digest. Python's salted hash() once made the moved-code search differ
    from run to run."""
    import subprocess
    import sys

    parts = [text(20 + i, 300) for i in range(6)]
    old = make_tar(
        tmp_path / "old.tar", [(f"pkg/m{i}.py", "file", p, {}) for i, p in enumerate(parts)]
    )
    merged = b"".join(p[: len(p) // 3] for p in parts)
    new = make_tar(tmp_path / "new.tar", [("pkg/all.py", "file", merged + b"# new\n", {})])
    outputs = []
    for seed in ("1", "2", "3"):
        delta = tmp_path / f"d{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        cmd = [sys.executable, "-m", "podman_delta", "diff", "--no-size-check", str(old), str(new)]
        subprocess.run([*cmd, str(delta)], check=True, env=env)
        outputs.append(delta.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    assert rebuilt(tmp_path / "d1", [old]) == new.read_bytes()
