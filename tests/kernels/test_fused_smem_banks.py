"""Shared-memory bank conflicts of the fused kernel's compression stage, emulated on the host.

``kernels/cuda/tile_layout.cuh`` holds every shared-memory index of the compression stage: which row
and k32 step a thread compresses (``compress_role``), where it reads them in the X tile, where it
stores its 8 packed words and 2 metadata half-words (``a_step_word`` + ``a_store_offset``,
``meta_store_half``), and where the MMA warps load them back (``a_load_word``, ``meta_load_word``). The
kernel uses these functions for those accesses (checked below in its source). The header is built here for the
host with the same -D defines as the NVRTC build, and the wrapper lists, for each access instruction
of a warp, the byte offset from ``SharedTiles`` that each of its 32 lanes touches, with the kernel's
own index expressions (the kernel issues the same store instructions in another order, which a count
per instruction does not see).

The bank model (sm_80 / sm_90): 32 banks of 4 bytes. An access is split into phases of 128 bytes
(32 lanes for 1-, 2- and 4-byte accesses, 16 for 8-byte, 8 for 16-byte); a phase needs as many
wavefronts as the largest number of distinct 4-byte words it touches in one bank (the same word is a
broadcast, or a merged store, and costs nothing). ``SharedTiles`` starts 128-byte aligned (the wgmma
build aligns it to 1024 bytes; the mma build's dynamic shared memory starts at the window's base).
"""

from __future__ import annotations

import collections
import ctypes
import re
import shutil
import subprocess

import pytest
import torch

from lynx_compile.kernels import fused_cuda

WRAPPER = r"""
#include <cstddef>
#include "nm_compress.cuh"
#include "tile_layout.cuh"

static SharedTiles sh;  // only its addresses are used
static long long offset(const void* p) { return (long long)((const char*)p - (const char*)&sh); }

// The compression stage of warp `warp` of cluster CTA `rank`, for compressed buffer `buf`, as the
// kernel's compress_fast / compress_finish run it: per access, 32 lane offsets (-1: no access).
// Accesses 0-3: the 16-byte reads of the thread's X chunk (stage 0), 4-11: the stores of packed
// words j = 0..7, 12-13: the stores of metadata half-words h = 0, 1, 14: the norm-scale store.
extern "C" void compression_accesses(int warp, int rank, int buf, long long* out) {
  for (int lane = 0; lane < 32; ++lane) {
    const CompressRole c = compress_role(warp * 32 + lane, rank);
    for (int i = 0; i < 4; ++i)
      out[i * 32 + lane] = c.active ? offset(&sh.x[0][0][0] + x_chunk_element(c.crow, c.cstep)) + 16 * i : -1;
    for (int j = 0; j < 8; ++j)
      out[(4 + j) * 32 + lane] =
          c.active ? offset(&sh.a[a_step_word(buf, c.cslab, c.cstep)] + a_store_offset(c.cr16, j)) : -1;
    for (int h = 0; h < 2; ++h)
      out[(12 + h) * 32 + lane] = c.active ? offset(&sh.meta[meta_store_half(buf, c.cslab, c.cstep, c.cr16, h)]) : -1;
    out[14 * 32 + lane] = c.active && c.cstep == 0 ? offset(&sh.scale[c.trow]) : -1;
  }
}

// The fragment loads of one slab and k32 step: the 16-byte A chunk, then the metadata word.
extern "C" void fragment_loads(int buf, int slab, int step, long long* out) {
  for (int lane = 0; lane < 32; ++lane) {
    out[lane] = offset(&sh.a[a_load_word(buf, slab, step, lane)]);
    out[32 + lane] = offset(&reinterpret_cast<const u32*>(sh.meta)[meta_load_word(buf, slab, step, lane)]);
  }
}

extern "C" long long tiles_bytes() { return (long long)sizeof(SharedTiles); }
extern "C" long long field_offset(int which) {
  return which == 0 ? offset(&sh.a[0]) : which == 1 ? offset(&sh.meta[0]) : offset(&sh.scale[0]);
}
extern "C" int geometry(int which) { return which == 0 ? SLABS : which == 1 ? KSTEPS : which == 2 ? X_ROWS : CLUSTER; }
"""

STORES = [f"A word {j}" for j in range(8)] + ["metadata 0", "metadata 1"]
ACCESSES = [(f"X read {i}", 16) for i in range(4)] + [(name, 4) for name in STORES[:8]] + \
           [(name, 2) for name in STORES[8:]] + [("scale", 4)]
CONFIGS = fused_cuda.TILE_CONFIGS


def wavefronts(offsets, width: int) -> int:
    """Shared-memory wavefronts of one warp-wide access of ``width`` bytes per lane (-1: lane idle)."""
    lanes_per_phase = 32 if width <= 4 else 128 // width
    total = 0
    for first in range(0, 32, lanes_per_phase):
        words_by_bank = collections.defaultdict(set)
        for address in offsets[first:first + lanes_per_phase]:
            if address < 0:
                continue
            assert address % width == 0, f"misaligned {width}-byte access at {address}"
            for word in range(address // 4, (address + width - 1) // 4 + 1):
                words_by_bank[word % 32].add(word)
        total += max((len(words) for words in words_by_bank.values()), default=0)
    return total


def _claim(memory: dict, address: int, size: int, what: tuple) -> None:
    """Mark ``size`` bytes at ``address`` as written by ``what``; a byte written twice is an overlap."""
    for byte in range(size):
        assert address + byte not in memory, f"store over {memory[address + byte]}"
        memory[address + byte] = (*what, byte)


def test_wavefront_model():
    assert wavefronts(list(range(0, 128, 4)), 4) == 1                   # 32 consecutive words
    assert wavefronts([0] * 32, 4) == 1                                 # broadcast
    assert wavefronts([128 * lane for lane in range(32)], 4) == 32     # one bank, 32 words
    assert wavefronts([2 * lane for lane in range(32)], 2) == 1         # 16 words, halves merged
    assert wavefronts(list(range(0, 512, 16)), 16) == 4                 # 512 bytes: 4 phases
    assert wavefronts([256 * (lane % 2) + 16 * (lane // 2) for lane in range(32)], 16) == 8
    assert wavefronts([-1] * 32, 4) == 0


def test_the_layout_before_the_swizzle_was_8_and_2_way():
    """The review's numbers, from the kernel's former index expressions (plain fragment order:
    ``sh.a[buf][cslab][cstep][(cr16 % 8) * 4 + j % 4][cr16 / 8 + 2 * (j / 4)]`` and
    ``sh.meta[buf][cslab][cstep][(cr16 % 8) * 4 + h][cr16 / 8]``) for warp 0, with the same model:
    8 wavefronts per packed-word store and 2 per metadata store, 68 per warp per K tile."""
    rows = [(lane // 2 % 16, lane % 2) for lane in range(32)]  # (cr16, cstep) of each lane
    a = [[4 * ((step * 32 + (r16 % 8) * 4 + j % 4) * 4 + r16 // 8 + 2 * (j // 4)) for r16, step in rows]
         for j in range(8)]
    meta = [[2 * ((step * 32 + (r16 % 8) * 4 + h) * 2 + r16 // 8) for r16, step in rows] for h in range(2)]
    assert [wavefronts(offsets, 4) for offsets in a] == [8] * 8
    assert [wavefronts(offsets, 2) for offsets in meta] == [2, 2]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One host build of tile_layout.cuh per tile configuration, with the NVRTC build's defines."""
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "a C++ compiler is needed (Inductor's CPU backend needs one too)"
    folder = tmp_path_factory.mktemp("tile_layout")
    for name in ("nm_compress.cuh", "tile_layout.cuh"):
        (folder / name).write_text(fused_cuda.cuda_file(name))
    (folder / "wrapper.cpp").write_text(WRAPPER)
    built = {}
    for config in CONFIGS:
        defines = config.defines(torch.bfloat16, True)
        library = folder / f"layout_{config.name}.so"
        subprocess.run([compiler, "-O1", "-std=c++17", "-shared", "-fPIC", "-DLYNX_HOST",
                        *(f"-D{key}={value}" for key, value in sorted(defines.items())), f"-I{folder}",
                        str(folder / "wrapper.cpp"), "-o", str(library)], check=True, capture_output=True, text=True)
        lib = ctypes.CDLL(str(library))
        lib.tiles_bytes.restype = lib.field_offset.restype = ctypes.c_longlong
        built[config] = lib
    return built


def compression_accesses(lib, warp: int, rank: int, buf: int) -> list[list[int]]:
    out = (ctypes.c_longlong * (len(ACCESSES) * 32))()
    lib.compression_accesses(warp, rank, buf, out)
    return [list(out[i * 32:(i + 1) * 32]) for i in range(len(ACCESSES))]


def fragment_loads(lib, buf: int, slab: int, step: int) -> tuple[list[int], list[int]]:
    out = (ctypes.c_longlong * 64)()
    lib.fragment_loads(buf, slab, step, out)
    return list(out[:32]), list(out[32:])


def warp_report(lib, warp: int, rank: int, buf: int) -> dict[str, int]:
    """Wavefronts of each access of the compression stage for one warp."""
    return {name: wavefronts(offsets, width)
            for (name, width), offsets in zip(ACCESSES, compression_accesses(lib, warp, rank, buf))}


def test_the_kernel_reaches_the_compressed_tile_only_through_the_layout_functions():
    """What the emulation counts is what the kernel does: every index of the compressed tile, and
    the compressor's reads of the X tile, go through tile_layout.cuh."""
    source = fused_cuda.source()
    assert "tile_layout.cuh" in fused_cuda.HEADERS and '#include "tile_layout.cuh"' in source
    assert "struct SharedTiles" not in source
    a_uses = re.findall(r"sh\.a\b(.{0,60})", source)
    meta_uses = re.findall(r"sh\.meta\b(.{0,40})", source)
    assert a_uses and all(re.match(r"\[a_load_word\(|\[a_step_word\([^)]*\)\] \+ a_store_offset\(", use)
                          for use in a_uses), a_uses
    assert meta_uses and all(re.match(r"(\[meta_store_half\(|\)\[meta_load_word\()", use) for use in meta_uses), \
        meta_uses
    assert "compress_role(tid, rank)" in source and "x_chunk_element(crow, cstep)" in source


# Wavefronts per store instruction of a compressing warp, per K tile. Before the swizzle of
# tile_layout.cuh: 8 per packed word and 2 per metadata half-word, 68 in all; the minimum is 10.
EXPECTED_STORE_WAVEFRONTS = dict.fromkeys(STORES[:8], 2) | dict.fromkeys(STORES[8:], 1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_compression_stores_are_at_most_two_way(layouts, config):
    """Every store of the compression stage is at most 2-way bank-conflicted, for every compressing
    warp, rank and buffer: 2 wavefronts per packed word (the two k32 steps share 16 banks), 1 per
    metadata half-word, 18 per warp per K tile."""
    lib = layouts[config]
    cluster = lib.geometry(3)
    for rank in range(cluster):
        for warp in range(fused_cuda.THREADS // 32):
            for buf in (0, 1):
                report = warp_report(lib, warp, rank, buf)
                stores = {name: report[name] for name in STORES}
                if cluster == 2 and warp >= 4:  # warps 4-7 of a cluster CTA do not compress
                    assert set(stores.values()) == {0}, stores
                    continue
                assert max(stores.values()) <= 2, (config.name, rank, warp, buf, stores)
                assert stores == EXPECTED_STORE_WAVEFRONTS, (config.name, rank, warp, buf, stores)
                # Unchanged by the swizzle, and at their minimum: 4 x 16-byte X reads of 128 bytes
                # per phase, and the 64 bytes of the norm scales (half the lanes store one).
                assert [report[f"X read {i}"] for i in range(4)] == [4] * 4
                assert report["scale"] == 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_fragment_loads_are_conflict_free(layouts, config):
    """The MMA warps' loads of the compressed tile (both main loops load A and the metadata the same
    way, one 16-byte and one 4-byte load per slab and k32 step) stay at their minimum: 4 wavefronts
    for the 512 bytes of A, 1 for the metadata."""
    lib = layouts[config]
    for buf in (0, 1):
        for slab in range(lib.geometry(0)):
            for step in range(lib.geometry(1)):
                a, meta = fragment_loads(lib, buf, slab, step)
                assert (wavefronts(a, 16), wavefronts(meta, 4)) == (4, 1), (buf, slab, step)


def fragment_spec(slab: int, step: int, lane: int, reg: int) -> tuple[int, int, int]:
    """(row of the tile, k32 step, group of 8) of A register ``reg`` of ``lane``: the PTX ISA's sparse
    m16n8k32 A fragment (the dense m16n8k16 A layout on the 16 x 16 compressed matrix)."""
    g, t = lane // 4, lane % 4
    return 16 * slab + g + 8 * (reg % 2), step, t + 4 * (reg // 2)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_every_fragment_register_is_the_word_its_compressor_stored(layouts, config):
    """Round trip through the layout: each compressing thread stores its words and metadata as the
    kernel does (labels instead of values); each lane of each MMA warp then loads its A chunk (registers
    0..3 in order) and its metadata word as the kernel does. Every A register must be the
    word the PTX fragment layout puts there, and lanes t = 0, 1 of each quad must get the metadata
    of groups 4t..4t+3 of rows g (low half) and g + 8 (high half). No two stores may overlap, and
    none may leave the two buffers."""
    lib = layouts[config]
    slabs, ksteps, x_rows, cluster = (lib.geometry(i) for i in range(4))
    a_base, meta_base, scale_base = (lib.field_offset(i) for i in range(3))
    assert a_base % 128 == 0 and meta_base % 128 == 0  # the bank arithmetic assumes it
    assert a_base + 2 * slabs * ksteps * 512 <= meta_base and meta_base + 2 * slabs * ksteps * 128 <= scale_base
    for buf in (0, 1):
        memory: dict[int, tuple] = {}  # byte offset -> label of the byte stored there
        for rank in range(cluster):
            for warp in range(fused_cuda.THREADS // 32):
                accesses = compression_accesses(lib, warp, rank, buf)
                for lane in range(32):
                    tid = warp * 32 + lane
                    row, step = rank * x_rows + tid // ksteps, tid % ksteps
                    # (what, first access, stores, bytes each, base, bytes per slab and step)
                    for what, first, stores, size, base, span in (("A", 4, 8, 4, a_base, 512),
                                                                  ("meta", 12, 2, 2, meta_base, 128)):
                        for j in range(stores):
                            address = accesses[first + j][lane]
                            if address < 0:
                                continue
                            assert buf * slabs * ksteps * span <= address - base < (buf + 1) * slabs * ksteps * span
                            _claim(memory, address, size, (what, row, step, j))
        assert len(memory) == slabs * 16 * ksteps * (8 * 4 + 2 * 2)  # every row, step and word of this buffer
        for slab in range(slabs):
            for step in range(ksteps):
                a, meta = fragment_loads(lib, buf, slab, step)
                for lane in range(32):
                    chunk = [tuple(memory.get(a[lane] + 4 * word + byte) for byte in range(4)) for word in range(4)]
                    for reg in range(4):
                        row, k32, group = fragment_spec(slab, step, lane, reg)
                        assert chunk[reg] == tuple(("A", row, k32, group, b) for b in range(4)), \
                            (buf, slab, step, lane, reg)
                    g, t = lane // 4, lane % 4
                    if t < 2:  # sparsity selector 0: lanes t = 0, 1 supply the metadata
                        got = tuple(memory.get(meta[lane] + byte) for byte in range(4))
                        want = tuple(("meta", 16 * slab + g + 8 * (byte // 2), step, t, byte % 2) for byte in range(4))
                        assert got == want, (buf, slab, step, lane)


def test_shared_tiles_size_matches_the_launch(layouts):
    """The host build lays SharedTiles out as the kernel does (its size is what the launch reserves)."""
    for config, lib in layouts.items():
        align_slack = 1024 - 16 if config.mainloop == "wgmma" else 0
        assert lib.tiles_bytes() + align_slack == config.smem_bytes, config.name
