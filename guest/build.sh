#!/bin/sh
# Build livemig's walk guest: the boot sector from guest/walk.S and the
# firmware image from guest/walk-bios.S (which includes the boot sector).
#
# Usage: guest/build.sh [OUTPUT [BIOS_OUTPUT]]
#   OUTPUT defaults to src/livemig/machine/walk-bootsector.bin and BIOS_OUTPUT
#   to src/livemig/machine/walk-bios.bin (the checked-in images that
#   livemig.machine.kvm loads). Needs GNU binutils only (as, ld, objcopy, nm);
#   no nasm, no C compiler.
#
# Reproducible: the output is a flat binary of the .text section (no
# timestamps, paths or build ids), so the same binutils give the same bytes.
# The script checks what the loader relies on and fails otherwise:
#   - exactly 512 bytes, ending in the boot signature 0x55 0xAA;
#   - walk_start at byte offset 0x1f4, walk_end at 0x1f8, tick_pages at 0x1e8
#     and pace at 0x1ec (the WALK_*_OFFSET constants in src/livemig/machine/kvm.py);
#   - the firmware: exactly 64 KiB, starting with the boot sector, its reset
#     vector at 0xfff0.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/../src/livemig/machine/walk-bootsector.bin"}
bios_out=${2:-"$here/../src/livemig/machine/walk-bios.bin"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
export LC_ALL=C

LOAD_ADDR=0x7c00
WALK_START_OFFSET=0x1f4
WALK_END_OFFSET=0x1f8
WALK_TICK_OFFSET=0x1e8
WALK_PACE_OFFSET=0x1ec

# ld >= 2.39 warns about the single RWX segment a flat boot sector has.
quiet=""
if ld --help 2>/dev/null | grep -q -- --no-warn-rwx-segments; then
    quiet="--no-warn-rwx-segments"
fi
as --32 -o "$tmp/walk.o" "$here/walk.S"
ld -m elf_i386 -N -e _start -Ttext="$LOAD_ADDR" --build-id=none $quiet \
    -o "$tmp/walk.elf" "$tmp/walk.o"
objcopy -O binary -j .text "$tmp/walk.elf" "$tmp/walk.bin"

size=$(wc -c < "$tmp/walk.bin" | tr -d ' ')
if [ "$size" -ne 512 ]; then
    echo "build.sh: image is $size bytes, expected 512" >&2
    exit 1
fi
sig=$(od -An -tx1 -j510 -N2 "$tmp/walk.bin" | tr -d ' \n')
if [ "$sig" != "55aa" ]; then
    echo "build.sh: boot signature is '$sig', expected 55aa" >&2
    exit 1
fi

# Offsets of the patchable words, from the symbol table.
check_offset() {  # symbol expected-offset
    addr=$(nm "$tmp/walk.elf" | awk -v s="$1" '$3 == s { print $1 }')
    if [ -z "$addr" ]; then
        echo "build.sh: symbol $1 not found" >&2
        exit 1
    fi
    got=$(( 0x$addr - LOAD_ADDR ))
    if [ "$got" -ne $(( $2 )) ]; then
        printf 'build.sh: %s is at offset 0x%x, expected %s\n' "$1" "$got" "$2" >&2
        exit 1
    fi
}
check_offset walk_start "$WALK_START_OFFSET"
check_offset walk_end "$WALK_END_OFFSET"
check_offset tick_pages "$WALK_TICK_OFFSET"
check_offset pace "$WALK_PACE_OFFSET"

# The firmware: the boot sector included at offset 0, linked at 0 (flat image).
cp "$tmp/walk.bin" "$tmp/walk-bootsector.bin"
as --32 -I "$tmp" -o "$tmp/bios.o" "$here/walk-bios.S"
ld -m elf_i386 -N -e _start -Ttext=0 --build-id=none $quiet \
    -o "$tmp/bios.elf" "$tmp/bios.o"
objcopy -O binary -j .text "$tmp/bios.elf" "$tmp/bios.bin"
size=$(wc -c < "$tmp/bios.bin" | tr -d ' ')
if [ "$size" -ne 65536 ]; then
    echo "build.sh: firmware is $size bytes, expected 65536" >&2
    exit 1
fi
if ! cmp -s -n 512 "$tmp/walk.bin" "$tmp/bios.bin"; then
    echo "build.sh: the firmware does not start with the boot sector" >&2
    exit 1
fi
addr=$(nm "$tmp/bios.elf" | awk '$3 == "reset_vector" { print $1 }')
if [ "$(( 0x$addr ))" -ne $(( 0xfff0 )) ]; then
    echo "build.sh: reset_vector is at 0x$addr, expected 0xfff0" >&2
    exit 1
fi

cp "$tmp/walk.bin" "$out"
chmod 644 "$out"
echo "built $out (512 bytes, sha256 $(sha256sum "$out" | cut -d' ' -f1))"
cp "$tmp/bios.bin" "$bios_out"
chmod 644 "$bios_out"
echo "built $bios_out (65536 bytes, sha256 $(sha256sum "$bios_out" | cut -d' ' -f1))"
