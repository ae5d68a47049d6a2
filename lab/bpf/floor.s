# An empty TC classifier: returns TC_ACT_UNSPEC (-1) and does nothing else.
# `cargo xtask bench` assembles it with llvm-mc and the bench attaches it
# beside tracegap's programs: its run time under the kernel's BPF statistics
# is what any program costs there, the floor tracegap's per-packet figures
# are read against.
	.section	classifier/tracegap_floor,"ax",@progbits
	.globl	tracegap_floor
	.type	tracegap_floor,@function
tracegap_floor:
	r0 = -1
	exit
.Lfunc_end0:
	.size	tracegap_floor, .Lfunc_end0-tracegap_floor

	.section	license,"aw",@progbits
	.globl	_license
_license:
	.asciz	"GPL"
	.size	_license, 4
