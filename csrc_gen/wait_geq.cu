// flashoverlap: spin-wait fallback for a stream front-end wait (rendered by csrc_gen/generate.py).
//
// Blocks the stream it is launched on until *counter >= target, with the same wrap-safe
// compare as CU_STREAM_WAIT_VALUE_GEQ: (int32_t)(*counter - target) >= 0, so epoch targets
// keep working after the 32-bit counter wraps.  Used where cuStreamWaitValue32 is not
// available.  Launch with one CTA of one thread: it holds one SM slot while it spins, so
// the producer (a GEMM that leaves SMs free for communication) is never starved.
//
// The acquire load pairs with the producer's release atomic (after its CTA barrier): every
// store of the signalled tiles is visible GPU-wide before the kernel exits, and the kernel
// boundary orders all later work on this stream after it.  __nanosleep backoff keeps the
// polling from competing for memory bandwidth with the GEMM.

extern "C" __global__ void ${kernel_name}(const unsigned int* __restrict__ counter,
                                          unsigned int target) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  unsigned int backoff_ns = ${min_backoff_ns};
  while (true) {
    unsigned int value;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(counter) : "memory");
    // Unsigned subtraction wraps (defined); the signed view gives the GEQ-modulo-2^32 test.
    if (static_cast<int>(value - target) >= 0) break;
    __nanosleep(backoff_ns);
    if (backoff_ns < ${max_backoff_ns}) backoff_ns *= 2;
  }
}
