# Two classifiers the verifier must refuse: they return r5, which is never
# written (R5 !read_ok). Assembled by llvm-mc in the loader test.
	.section	classifier/tracegap_ingress,"ax",@progbits
	.globl	tracegap_ingress
	.type	tracegap_ingress,@function
tracegap_ingress:
	r0 = r5
	exit
.Lfunc_end0:
	.size	tracegap_ingress, .Lfunc_end0-tracegap_ingress

	.section	classifier/tracegap_egress,"ax",@progbits
	.globl	tracegap_egress
	.type	tracegap_egress,@function
tracegap_egress:
	r0 = r5
	exit
.Lfunc_end1:
	.size	tracegap_egress, .Lfunc_end1-tracegap_egress

	.section	license,"aw",@progbits
	.globl	_license
_license:
	.asciz	"GPL"
	.size	_license, 4
