# livemig's walk guest as firmware: a 64 KiB image for `-bios` (GNU as).
#
# A PC starts its first vCPU in real mode at the reset vector, 16 bytes below
# 4 GiB (CS selector 0xf000, base 0xffff0000, IP 0xfff0). QEMU's x86 machines
# map a `-bios` file so that it ends at 4 GiB ("pc.bios") and alias its last
# 128 KiB (here: all 64 KiB) just below 1 MiB, at 0xf0000 ("isa-bios"); the
# size must be a multiple of 64 KiB. microvm does so too, so with
# x-option-roms=off nothing but this image runs before the walk.
#
# The image is the walk boot sector, byte for byte, then a loader, then the
# reset vector:
#   0x0000  walk-bootsector.bin (guest/walk.S): the same program and the same
#           patchable words at the same offsets (tick_pages 0x1e8, pace 0x1ec,
#           tag "LMWK" 0x1f0, walk_start 0x1f4, walk_end 0x1f8)
#   0x0200  loader: copies those 512 bytes to 0000:7c00 and jumps there, as a
#           BIOS does with a boot sector (the program is linked for 0x7c00)
#   0xfff0  reset vector: a far jump to the loader through the 0xf0000 alias,
#           which leaves CS with an ordinary real-mode base
#   0xfff5  tag "LMWB", then zeros to 64 KiB
# Build: guest/build.sh (it assembles the boot sector first and includes it).

        .set    BIOS_SEG, 0xf000        # real-mode segment of the 0xf0000 alias
        .set    BOOT_ADDR, 0x7c00

        .text
        .code16
        .globl  _start
_start:
        .incbin "walk-bootsector.bin"

        .org    0x200
loader:
        cli
        cld
        movw    $BIOS_SEG, %ax
        movw    %ax, %ds                # ds:si = the boot sector in the image
        xorw    %ax, %ax
        movw    %ax, %es                # es:di = 0000:7c00
        xorw    %si, %si
        movw    $BOOT_ADDR, %di
        movw    $256, %cx               # 512 bytes
        rep movsw
        ljmp    $0, $BOOT_ADDR

        .org    0xfff0
        .globl  reset_vector
reset_vector:
        ljmp    $BIOS_SEG, $loader
        .ascii  "LMWB"
        .org    0x10000
