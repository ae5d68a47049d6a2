//! Heap allocations per event and per gRPC call, counted, not timed: a
//! count holds on any machine (issue 33). The lab's binary and its tests
//! install [`Counting`] as the global allocator; it counts each thread's
//! allocations, so work on other threads (a test harness, the runtime)
//! does not show in a figure.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

/// The system allocator, counting allocations (and reallocations, which
/// may move) per thread.
pub struct Counting;

thread_local! {
    // `const`: no lazy initialisation, which could itself allocate.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // try_with: a thread's allocations while its locals are torn down are
    // not counted rather than a panic.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations this thread made so far (0 when [`Counting`] is not the
/// global allocator: [`installed`] says).
pub fn so_far() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Whether [`Counting`] is the global allocator of this binary.
pub fn installed() -> bool {
    let before = so_far();
    std::hint::black_box(Box::new(0u64));
    so_far() > before
}

/// `f`'s allocations on this thread.
pub fn during<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = so_far();
    let out = f();
    (out, so_far() - before)
}
