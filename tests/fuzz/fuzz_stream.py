"""Coverage-guided fuzzing of livemig.wire's decoders, run by hand (not by pytest).

    pip install atheris
    python tests/fuzz/fuzz_stream.py --write-seeds /tmp/wire-corpus   # optional seeds
    python tests/fuzz/fuzz_stream.py /tmp/wire-corpus -atheris_runs=1000000

Contract checked: on any bytes, cut into any chunks, ``StreamDecoder`` and
``ReturnPathDecoder`` raise nothing but their own error type, with an offset
inside the data, and never through their "decoder bug" safety net.
"""

from __future__ import annotations

import os
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["livemig"]):
    from livemig.wire import (
        NEED_DATA,
        Closed,
        MigCmd,
        PayloadKind,
        ReturnPathDecoder,
        ReturnPathError,
        SectionType,
        StreamDecoder,
        StreamError,
        encode_blob,
        encode_command,
        encode_eof,
        encode_footer,
        encode_pong,
        encode_ram_eos,
        encode_ram_pages,
        encode_ram_zero_pages,
        encode_section_header,
        encode_shut,
        encode_switchover_ack,
        encode_tagged_data,
        encode_tagged_end,
        encode_vmdesc,
        encode_x_error,
    )

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests/
from streams import ram_stream_start  # noqa: E402

KINDS = {"ram": PayloadKind.RAM, "vfio": PayloadKind.TAGGED, "serial": PayloadKind.BLOB}
BLOCKS = [("pc.ram", 16 * 4096), ("pc.bios", 2 * 4096)]
# A valid prefix so that mutations also reach the RAM and section states quickly.
PREFIX = ram_stream_start(BLOCKS, sid=1)
INTERNAL_PREFIXES = ("Malformed migration stream (decoder", "Malformed return path message")


def seed_stream() -> bytes:
    pages = np.arange(2 * 4096, dtype=np.uint8).reshape(2, 4096)
    return b"".join([
        PREFIX, encode_ram_eos(), encode_footer(1), encode_command(MigCmd.OPEN_RETURN_PATH),
        encode_section_header(SectionType.SECTION_PART, 1),
        bytes(encode_ram_zero_pages("pc.ram", [0, 4096], first_has_block_name=True)),
        bytes(encode_ram_pages("pc.ram", [8192, 3 * 4096], pages, first_has_block_name=False)),
        encode_ram_eos(), encode_footer(1),
        encode_section_header(SectionType.SECTION_START, 2, "vfio", 0, 1),
        encode_tagged_data(b"abc"), encode_tagged_end(), encode_footer(2),
        encode_section_header(SectionType.SECTION_FULL, 3, "serial", 0, 1),
        encode_blob(b"uart"), encode_footer(3), encode_eof(), encode_vmdesc(b"{}"),
    ])


def check(exc: Exception, size: int) -> None:
    assert 0 <= exc.offset <= size, exc  # type: ignore[attr-defined]
    assert not str(exc).startswith(INTERNAL_PREFIXES), exc


def run(decoder: StreamDecoder | ReturnPathDecoder, error: type[Exception], raw: bytes,
        chunk: int) -> None:
    try:
        for pos in range(0, len(raw), chunk):
            decoder.receive_data(raw[pos:pos + chunk])
            while decoder.next_event() is not NEED_DATA:
                pass
        decoder.receive_data(b"")
        for _ in range(len(raw) + 10):
            if isinstance(decoder.next_event(), Closed):
                return
        raise AssertionError("decoder did not finish")
    except error as exc:
        check(exc, len(raw))


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' name)
    fdp = atheris.FuzzedDataProvider(data)
    with_prefix = fdp.ConsumeBool()
    chunk = fdp.ConsumeIntInRange(1, 9000)
    buffer_size = fdp.ConsumeIntInRange(16, 1 << 16)
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    raw = PREFIX + body if with_prefix else body
    run(StreamDecoder(KINDS, buffer_size=buffer_size, max_payload=1 << 20), StreamError, raw,
        chunk)
    run(ReturnPathDecoder(buffer_size=16), ReturnPathError, body, chunk)


def write_seeds(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    rp = encode_switchover_ack() + encode_pong(1) + encode_x_error("boom") + encode_shut(0)
    # Leading bytes feed FuzzedDataProvider (prefix flag, chunk, buffer size); the
    # seeds are only a starting point, libFuzzer mutates from there.
    for name, body in [("stream", seed_stream()), ("rp", rp)]:
        with open(os.path.join(directory, name), "wb") as f:
            f.write(b"\x00" + b"\x00\x10" * 8 + body)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        write_seeds(sys.argv[2])
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
