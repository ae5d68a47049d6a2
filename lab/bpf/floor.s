# An empty TC classifier: returns TC_ACT_UNSPEC (-1) and does nothing else.
# `cargo xtask bench` assembles it with llvm-mc and the bench attaches it
# beside tracegap's programs: its run time under the kernel's BPF statistics
# is what any program costs there, the floor tracegap's per-packet figures
# are read against. Two empty raw tracepoint programs do the same for the
# thread programs' hooks (each socket send and receive).
	.section	classifier/tracegap_floor,"ax",@progbits
	.globl	tracegap_floor
	.type	tracegap_floor,@function
tracegap_floor:
	r0 = -1
	exit
.Lfunc_end0:
	.size	tracegap_floor, .Lfunc_end0-tracegap_floor

	.section	raw_tracepoint/sock_send_length,"ax",@progbits
	.globl	tracegap_floor_send
	.type	tracegap_floor_send,@function
tracegap_floor_send:
	r0 = 0
	exit
.Lfunc_end1:
	.size	tracegap_floor_send, .Lfunc_end1-tracegap_floor_send

	.section	raw_tracepoint/sock_recv_length,"ax",@progbits
	.globl	tracegap_floor_recv
	.type	tracegap_floor_recv,@function
tracegap_floor_recv:
	r0 = 0
	exit
.Lfunc_end2:
	.size	tracegap_floor_recv, .Lfunc_end2-tracegap_floor_recv

	.section	license,"aw",@progbits
	.globl	_license
_license:
	.asciz	"GPL"
	.size	_license, 4
