# kvm-migrate test guest: a single 512-byte boot sector.
#
# Proves to the migration tests that the guest runs, keeps running across a
# migration, never reboots, and that its RAM arrives intact.  Layout (keep in
# sync with src/guest/image.ts):
#
#   0x9000 u32  magic 'KMGT' (0x4B4D4754)
#   0x9004 u32  boot id (RDTSC at boot; differs per boot, never 0)
#   0x9008 u32  pass counter (0, +1 per pass)
#   0x900C u32  state: 1 = filling, 2 = fill done / passes running
#   0x9010 u32  fillMiB   (echo of the patched parameters)
#   0x9014 u32  hotMiB
#   0x9018 u32  reportEvery
#   0x200000..  fillMiB MiB of pattern:  dword at A = (A * 0x9E3779B1) ^ 0xDEADBEEF
#               hot set (first hotMiB MiB): 4 dwords per 4 KiB page (page
#               offsets 0/1K/2K/3K) rewritten each pass n as pattern ^ (n << 2)
#
# Both values have their low two bits set, so no dword (and no page) is zero:
# zero pages migrate almost for free, and we want real payload.
#
# Interrupts stay off forever and there is no IDT: any fault triple-faults,
# which is a reset (a new boot id / boot line, or an exit with -no-reboot).

	.set MARK,        0x9000
	.set MARK_MAGIC,  0x4B4D4754
	.set FILL_BASE,   0x200000
	.set PAT_MUL,     0x9E3779B1
	.set PAT_XOR,     0xDEADBEEF
	.set DELAY_TSC,   0x400000   # ~1-2 ms on a 2-4 GHz TSC (TCG uses host TSC)
	.set COM1,        0x3f8

	.code16
	.globl _start
_start:
	cli
	ljmp	$0, $norm		# some BIOSes enter at 07c0:0000
norm:
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	$0x7c00, %sp
	in	$0x92, %al		# fast A20 gate (PIIX/ICH port 0x92);
	or	$2, %al			# bit 0 would reset the machine
	and	$0xfe, %al
	out	%al, $0x92
	lgdtl	gdtr
	mov	%cr0, %eax
	or	$1, %eax
	mov	%eax, %cr0
	ljmpl	$0x08, $pm32

	.code32
pm32:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	%ax, %fs
	mov	%ax, %gs
	mov	$0x7c00, %esp
	cld

	# UART 115200 8N1, FIFO on, no interrupts: (port - 0x3f8, value) pairs
	mov	$uart_init, %esi
	mov	$7, %ecx
1:	lodsw
	movzbl	%al, %edx
	add	$COM1, %edx
	mov	%ah, %al
	out	%al, %dx
	loop	1b

	# marker: state=1 first, so a half-written marker is recognisable
	mov	$MARK, %edi
	movl	$1, 0xc(%edi)
	rdtsc
	xor	%edx, %eax		# fold the high half in; never report 0
	jnz	2f
	inc	%eax
2:	mov	%eax, %ebp		# keep the boot id for the boot line
	mov	$MARK_MAGIC, %eax
	stosl				# 0x9000 magic
	mov	%ebp, %eax
	stosl				# 0x9004 boot id
	xor	%eax, %eax
	stosl				# 0x9008 pass counter
	add	$4, %edi
	mov	$prm_fill, %esi
	movsl				# 0x9010 fillMiB
	movsl				# 0x9014 hotMiB
	movsl				# 0x9018 reportEvery

	mov	$s_boot, %esi
	mov	%ebp, %eax
	call	report

	# fill: one dword per address, the pattern makes every page unique
	mov	$FILL_BASE, %edi
	mov	prm_fill, %ecx
	shl	$18, %ecx		# MiB -> dwords
	jecxz	3f
4:	imul	$PAT_MUL, %edi, %eax
	xor	$PAT_XOR, %eax
	stosl
	loop	4b
3:	movl	$2, MARK+0xc

pass:
	mov	MARK+8, %ebx
	inc	%ebx			# ebx = number of this pass
	mov	prm_hot, %ecx
	shl	$10, %ecx		# MiB -> 1 KiB strides (4 writes per page)
	jecxz	idle
	mov	$FILL_BASE, %edi
	lea	(,%ebx,4), %edx		# n << 2 keeps the low two bits set
5:	imul	$PAT_MUL, %edi, %eax
	xor	$PAT_XOR, %eax
	xor	%edx, %eax
	mov	%eax, (%edi)
	add	$1024, %edi
	loop	5b
	jmp	count

	# no hot set: spin on the TSC so the counter grows at ~hundreds/s, not
	# millions; any TSC jump (e.g. after migration) just ends one wait early
idle:	rdtsc
	mov	%eax, %esi
6:	pause
	rdtsc
	sub	%esi, %eax
	cmp	$DELAY_TSC, %eax
	jb	6b

count:	mov	%ebx, MARK+8
	mov	prm_report, %ecx
	jecxz	pass			# reportEvery 0: never print
	mov	%ebx, %eax
	xor	%edx, %edx
	div	%ecx
	test	%edx, %edx
	jnz	pass
	mov	$s_pass, %esi
	mov	%ebx, %eax
	call	report
	jmp	pass

# report: print string at %esi, %eax as 8 hex digits, CRLF.  Clobbers eax-edx, esi.
report:
	mov	%eax, %ebx
7:	lodsb
	test	%al, %al
	jz	8f
	call	putc
	jmp	7b
8:	mov	$8, %ecx
9:	rol	$4, %ebx
	mov	%bl, %al
	and	$0xf, %al
	add	$48, %al		# '0'
	cmp	$57, %al		# '9'
	jbe	10f
	add	$39, %al		# 'a' - '9' - 1
10:	call	putc
	loop	9b
	mov	$13, %al		# CR
	call	putc
	mov	$10, %al		# LF
	# fall through

# putc: %al to COM1, waiting for THR empty (LSR bit 5).  Clobbers edx.
putc:
	push	%eax
	mov	$COM1+5, %dx
11:	in	%dx, %al
	test	$0x20, %al
	jz	11b
	pop	%eax
	mov	$COM1, %dx
	out	%al, %dx
	ret

uart_init:
	.byte 1, 0x00		# IER: no interrupts
	.byte 3, 0x80		# LCR: DLAB on
	.byte 0, 0x01		# DLL: 115200 baud
	.byte 1, 0x00		# DLM
	.byte 3, 0x03		# LCR: 8N1, DLAB off
	.byte 2, 0xc7		# FCR: FIFO on + clear
	.byte 4, 0x03		# MCR: DTR|RTS

s_boot:	.asciz "KMGT boot "
s_pass:	.asciz "KMGT pass "

	.p2align 3
gdt:	.quad 0
	.quad 0x00cf9a000000ffff	# 0x08: flat 4 GiB code, 32-bit
	.quad 0x00cf92000000ffff	# 0x10: flat 4 GiB data
gdtr:	.word gdtr - gdt - 1
	.long gdt

	# parameter block, patched by image.ts (writeGuestImage)
	.org 0x1ec
	.ascii "KPRM"
prm_fill:	.long 32	# fillMiB
prm_hot:	.long 4		# hotMiB
prm_report:	.long 256	# reportEvery
	.org 0x1fe
	.byte 0x55, 0xaa
