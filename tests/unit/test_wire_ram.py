"""RAM record encoders against a naive per-page reference, and the run scanner.

The reference encoder below is the obvious loop over QEMU's
``save_page_header`` + page; the vectorised encoders must produce the same
bytes for every input.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.wire import (
    TARGET_PAGE_SIZE,
    VfioMigFlag,
    encode_blob,
    encode_ram_block_list,
    encode_ram_eos,
    encode_ram_page_headers,
    encode_ram_pages,
    encode_ram_zero_pages,
    encode_tagged_data,
    encode_tagged_end,
    encode_tagged_marker,
)
from livemig.wire.ram import PAGE_CONTINUE, ZERO_CONTINUE, scan_continue_run

pytestmark = pytest.mark.timeout(60)

PAGE = TARGET_PAGE_SIZE


def reference_records(block: str, offsets, payloads, flag: int, first_has_block_name: bool):
    out = b""
    for i, (off, payload) in enumerate(zip(offsets, payloads, strict=True)):
        if i == 0 and first_has_block_name:
            name = block.encode()
            out += struct.pack(">Q", off | flag) + bytes([len(name)]) + name
        else:
            out += struct.pack(">Q", off | flag | 0x20)
        out += payload
    return out


names = st.text(min_size=0, max_size=30).filter(lambda s: len(s.encode()) <= 255)


@settings(max_examples=100, deadline=None)
@given(names, st.lists(st.integers(0, 2**40), max_size=12), st.booleans(), st.integers(0, 2**32))
def test_encode_ram_pages_matches_reference(block, page_numbers, first_has_block_name, seed):
    offsets = np.array(page_numbers, dtype=np.int64) * PAGE
    pages = np.random.default_rng(seed).integers(0, 256, (len(offsets), PAGE), dtype=np.uint8)
    got = encode_ram_pages(block, offsets, pages, first_has_block_name=first_has_block_name)
    assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and got.ndim == 1
    expected = reference_records(block, offsets.tolist(), [p.tobytes() for p in pages], 0x08,
                                 first_has_block_name)
    assert got.tobytes() == expected


@settings(max_examples=100, deadline=None)
@given(names, st.lists(st.integers(0, 2**40), max_size=12), st.booleans(), st.integers(0, 2**32),
       st.booleans())
def test_page_headers_interleaved_with_pages_equal_encode_ram_pages(
        block, page_numbers, first_has_block_name, seed, use_scratch):
    """The gathered write (headers from encode_ram_page_headers, pages from RAM)
    puts exactly encode_ram_pages' bytes on the wire."""
    offsets = np.array(page_numbers, dtype=np.int64) * PAGE
    pages = np.random.default_rng(seed).integers(0, 256, (len(offsets), PAGE), dtype=np.uint8)
    scratch = np.zeros(4096, dtype=np.uint8) if use_scratch else None
    headers, first_len = encode_ram_page_headers(block, offsets,
                                                 first_has_block_name=first_has_block_name,
                                                 scratch=scratch)
    wire = b""
    for i, page in enumerate(pages):
        lo = 0 if i == 0 else first_len + 8 * (i - 1)
        hi = first_len if i == 0 else lo + 8
        wire += headers[lo:hi].tobytes() + page.tobytes()
    assert headers.size == (first_len + 8 * (len(offsets) - 1) if len(offsets) else 0)
    assert wire == encode_ram_pages(block, offsets, pages,
                                    first_has_block_name=first_has_block_name).tobytes()


@settings(max_examples=100, deadline=None)
@given(names, st.lists(st.integers(0, 2**40), max_size=30), st.booleans())
def test_encode_ram_zero_pages_matches_reference(block, page_numbers, first_has_block_name):
    offsets = [n * PAGE for n in page_numbers]
    got = encode_ram_zero_pages(block, offsets, first_has_block_name=first_has_block_name)
    expected = reference_records(block, offsets, [b"\0"] * len(offsets), 0x02,
                                 first_has_block_name)
    assert got.tobytes() == expected


def test_encode_ram_pages_takes_any_strided_pages():
    ram = np.random.default_rng(0).integers(0, 256, (16, PAGE), dtype=np.uint8)
    idx = np.array([9, 2, 5])
    got = encode_ram_pages("pc.ram", idx * PAGE, ram[idx], first_has_block_name=True)
    got2 = encode_ram_pages("pc.ram", idx * PAGE, ram[::-1][15 - idx], first_has_block_name=True)
    assert got.tobytes() == got2.tobytes()
    assert b"".join([b"x", got]) == b"x" + got.tobytes()  # bytes-like


@pytest.mark.parametrize(("offsets", "shape"), [
    ([1], (1, PAGE)),                 # unaligned
    ([-PAGE], (1, PAGE)),             # negative
    ([1 << 63], (1, PAGE)),           # does not fit int64
    ([0, PAGE], (1, PAGE)),           # count mismatch
    ([0], (1, 100)),                  # not a page
])
def test_encode_ram_pages_rejects_bad_input(offsets, shape):
    with pytest.raises(ValueError):
        encode_ram_pages("pc.ram", np.array(offsets, dtype=np.uint64 if offsets[0] >= 0 else
                                            np.int64),
                         np.zeros(shape, dtype=np.uint8), first_has_block_name=True)


def test_encoders_reject_long_block_names_and_bad_lengths():
    with pytest.raises(ValueError):
        encode_ram_zero_pages("x" * 256, [0], first_has_block_name=True)
    with pytest.raises(ValueError):
        encode_ram_block_list([("pc.ram", 100)])
    with pytest.raises(ValueError):
        encode_ram_pages("pc.ram", [0], np.zeros((1, PAGE), dtype=np.int16),
                         first_has_block_name=True)


def test_empty_runs_encode_to_nothing():
    assert encode_ram_pages("a", [], np.zeros((0, PAGE), np.uint8),
                            first_has_block_name=True).size == 0
    assert encode_ram_zero_pages("a", [], first_has_block_name=True).size == 0


def test_block_list_and_eos_layout():
    raw = encode_ram_block_list([("a", PAGE), ("bc", 3 * PAGE)])
    assert raw == (struct.pack(">Q", 4 * PAGE | 4) + b"\x01a" + struct.pack(">Q", PAGE)
                   + b"\x02bc" + struct.pack(">Q", 3 * PAGE))
    assert encode_ram_block_list([]) == struct.pack(">Q", 4)
    assert encode_ram_eos() == struct.pack(">Q", 0x10)


def test_tagged_and_blob_layout():
    assert encode_tagged_data(b"ab") == struct.pack(">QQ", 0xFFFFFFFFEF100004, 2) + b"ab"
    assert encode_tagged_end() == struct.pack(">Q", 0xFFFFFFFFEF100001)
    assert encode_tagged_end(VfioMigFlag.DEV_INIT_DATA_SENT) == struct.pack(">Q",
                                                                            0xFFFFFFFFEF100005)
    assert encode_tagged_marker(VfioMigFlag.DEV_SETUP_STATE) == struct.pack(">Q",
                                                                             0xFFFFFFFFEF100003)
    assert encode_blob(b"xyz") == b"\0\0\0\3xyz"
    with pytest.raises(ValueError):
        encode_tagged_end(VfioMigFlag.DEV_DATA_STATE)
    with pytest.raises(ValueError):
        encode_tagged_marker(VfioMigFlag.END_OF_STATE)


# --- scanner --------------------------------------------------------------------------


def test_scan_finds_the_longest_valid_prefix_across_windows():
    n = 1000  # spans several growing windows (64, 256, 1024)
    offsets = np.arange(n, dtype=np.int64) * PAGE
    raw = encode_ram_zero_pages("b", offsets, first_has_block_name=False)
    buf = raw.copy()
    for bad in (0, 1, 63, 64, 65, 319, 320, 999):
        trial = buf.copy()
        trial[bad * 9 + 7] = 0x02  # flags: ZERO without CONTINUE
        got = scan_continue_run(trial, 0, trial.size, 9, ZERO_CONTINUE, n * PAGE, zero_byte=True)
        assert got.tolist() == offsets[:bad].tolist(), bad
    full = scan_continue_run(buf, 0, buf.size, 9, ZERO_CONTINUE, n * PAGE, zero_byte=True)
    assert full.tolist() == offsets.tolist()
    # limit and zero byte are checked per record
    assert scan_continue_run(buf, 0, buf.size, 9, ZERO_CONTINUE, 10 * PAGE).size == 10
    trial = buf.copy()
    trial[500 * 9 + 8] = 1
    assert scan_continue_run(trial, 0, trial.size, 9, ZERO_CONTINUE, n * PAGE,
                             zero_byte=True).size == 500


def test_scan_ignores_a_partial_last_record():
    pages = np.zeros((3, PAGE), dtype=np.uint8)
    raw = encode_ram_pages("b", [0, PAGE, 2 * PAGE], pages, first_has_block_name=False)
    got = scan_continue_run(raw, 0, raw.size - 1, PAGE + 8, PAGE_CONTINUE, 1 << 40)
    assert got.tolist() == [0, PAGE]
    assert scan_continue_run(raw, 0, 7, PAGE + 8, PAGE_CONTINUE, 1 << 40).size == 0
