# livemig's walk guest: a 512-byte x86 boot sector (GNU as, AT&T syntax).
#
# The same program QEMU's migration tests run as their x86 guest, written
# anew: from real mode at 0000:7c00 it enables A20 (port 0x92), loads a GDT
# with flat 4 GiB code and data segments, enters 32-bit protected mode,
# writes 'A' to COM1 (0x3f8), zeroes the first byte of every 4 KiB page in
# [walk_start, walk_end), then forever increments the first byte of each
# page in turn, writing 'B' to COM1 every 64 full passes (8-bit pass counter
# masked with 0x3f).
#
# Ticks and pace (both off by default, so the default image behaves as
# above): in the incrementing passes only (the zeroing pass is silent and
# unpaced), after each page it writes '.' to COM1 once every tick_pages pages
# (a countdown in %ebp, kept across passes, so the first '.' follows page
# tick_pages of the first pass), then busy-waits until rdtsc has advanced
# pace cycles (low 32 bits, so pace < 2^32 cycles, ~1.6 s at 2.6 GHz).
# Under KVM the TSC runs at the host's rate: pages/s ~ tsc_hz / (pace + the
# per-page cost).
#
# It needs no BIOS: it works both under SeaBIOS (QEMU, from a raw drive) and
# when a VMM loads it at 0x7c00 and starts the vCPU at CS:IP 0000:7c00.
# Interrupts stay disabled from the first instruction on (there is no IDT).
#
# Patchable words (little-endian u32, byte offsets in the 512-byte image;
# livemig.machine.kvm.WALK_TICK_OFFSET / WALK_PACE_OFFSET / WALK_START_OFFSET /
# WALK_END_OFFSET, checked by build.sh against the symbol table):
#   0x1e8  tick_pages   default 0: write '.' to COM1 after every N pages walked
#   0x1ec  pace         default 0: TSC cycles to busy-wait (rdtsc) after each page
#   0x1f4  walk_start   default 0x00100000 (1 MiB)
#   0x1f8  walk_end     default 0x06400000 (100 MiB), exclusive
# walk_start and walk_end must be 4 KiB aligned with walk_start < walk_end
# <= 4 GiB - 4 KiB. Code and GDT end at 0xde: 266 bytes free below 0x1e8.
# Offset 0x1f0 holds the tag "LMWK" so a patcher can check it has the right
# image. Build: guest/build.sh.

        .set    COM1, 0x3f8
        .set    PAGE_SIZE, 4096
        .set    CODE_SEL, 0x08
        .set    DATA_SEL, 0x10

        .text
        .code16
        .globl  _start
_start:
        cli
        cld
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp
        ljmp    $0, $norm_cs            # CS=0, whether the BIOS jumped to 07c0:0000 or 0000:7c00

norm_cs:
        # Fast A20 gate: set bit 1 of System Control Port A, never bit 0
        # (that one resets the machine).
        inb     $0x92, %al
        orb     $0x02, %al
        andb    $0xfe, %al
        outb    %al, $0x92

        lgdtl   gdt_desc
        movl    %cr0, %eax
        orl     $1, %eax                # CR0.PE
        movl    %eax, %cr0
        ljmpl   $CODE_SEL, $pm32        # load CS, flush the prefetch queue

        .code32
pm32:
        movw    $DATA_SEL, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %fs
        movw    %ax, %gs
        movw    %ax, %ss
        movl    $0x7c00, %esp

        movw    $COM1, %dx
        movb    $'A', %al
        outb    %al, %dx

        movl    walk_start, %esi        # first page (bytes)
        movl    walk_end, %edi          # end (bytes, exclusive)

        # Zero the first byte of every page of the range.
        movl    %esi, %eax
1:      cmpl    %edi, %eax
        jae     2f
        movb    $0, (%eax)
        addl    $PAGE_SIZE, %eax
        jmp     1b
2:
        # The walk: esi = page, edi = end, bl = pass counter (mod 64), ebp = pages
        # to the next tick; eax/ecx/edx are scratch (rdtsc writes edx:eax).
        xorl    %ebx, %ebx
        movl    tick_pages, %ebp
pass:   movl    walk_start, %esi
3:      cmpl    %edi, %esi
        jae     4f
        incb    (%esi)
        addl    $PAGE_SIZE, %esi
        movl    tick_pages, %ecx        # a '.' every tick_pages pages (0: none)
        jecxz   6f
        decl    %ebp
        jg      6f
        movl    %ecx, %ebp
        movw    $COM1, %dx
        movb    $'.', %al
        outb    %al, %dx
6:      movl    pace, %ecx              # then busy-wait pace TSC cycles (0: none)
        jecxz   3b
        rdtsc
        movl    %eax, %ecx
7:      rdtsc
        subl    %ecx, %eax              # cycles since the page (mod 2^32)
        cmpl    pace, %eax
        jb      7b
        jmp     3b
4:      incb    %bl
        andb    $0x3f, %bl
        jnz     pass
        movw    $COM1, %dx
        movb    $'B', %al
        outb    %al, %dx
        jmp     pass

        # GDT: null, flat 32-bit code (0x08), flat 32-bit data (0x10).
        .p2align 3
gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      # base 0, limit 4 GiB, 4 KiB granular, exec/read, D=1
        .quad   0x00cf92000000ffff      # base 0, limit 4 GiB, 4 KiB granular, read/write, B=1
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt

        # Fixed-offset parameter block, then the boot signature.
        .org    0x1e8
        .globl  tick_pages, pace
tick_pages:
        .long   0                       # a '.' to COM1 every N pages; 0: off
pace:
        .long   0                       # TSC cycles to busy-wait after each page; 0: off
        .ascii  "LMWK"
        .globl  walk_start, walk_end
walk_start:
        .long   0x00100000              # 1 MiB
walk_end:
        .long   0x06400000              # 100 MiB
        .org    0x1fe
        .byte   0x55, 0xaa
