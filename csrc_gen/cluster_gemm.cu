// flashoverlap: persistent warp-specialized Hopper (sm_90a) GEMM in thread-block clusters,
// with the shared B tile multicast by TMA (rendered by csrc_gen/generate.py, compiled by NVRTC).
//
// C = A[M, K] @ B[K, N] tile by tile in the order of a plan's step table (flashoverlap.plan:
// int32 rows of (row_start, row_stop, col_start, col_stop, dest_row, group, block)): program p
// of P runs steps p, p+P, ...; each 128x256 tile goes to row dest_row of a row-major
// destination and then, with counters, adds one to counters[group] -- the signal GEMM's
// contract (flashoverlap.kernels.signal_gemm).  A row-major, B either K-major (B =
// weight.t()) or row-major [K, N]; fp32 accumulation; bf16 / fp16 out.
//
// Why this kernel exists (issue 14): cuBLAS's Hopper kernels run in clusters of 2-8 CTAs that
// read each B tile from L2 once and multicast it into every CTA of the cluster; under the
// board's power cap that buys clock.  Triton 3.6's Gluon has no multicast load and 3.9's
// lowering adds a loader rendezvous per K step (27-33 % slower, scripts/multicast_probe.py),
// so the lever is measured here in plain CUDA.
//
// Layout of one CTA (384 threads):
//   warpgroup 0  -- warp 0, one thread: the producer, issuing the TMA loads of a STAGES-deep ring
//                   (A box 128x64 from its own tile row; B as B_BOXES boxes -- four 64-wide
//                   ones, or for a K-major B one per CTA -- of which a CTA of a cluster of CL
//                   loads every CL-th and multicasts it to the whole cluster when MULTICAST);
//   warpgroups 1, 2 -- consumers: each owns 64 rows of the 128x256 tile, wgmma m64n256k16,
//                   one wgmma group in flight; a slot is released (a plain arrive on the
//                   "empty" barrier of every CTA that the slot's data was multicast to: the
//                   .release.cluster form compiles to MEMBAR.ALL.GPU, 20-30 % slower) when
//                   the group after the one that read it has been issued and the older one
//                   retired.
//   warpgroup 0  -- warp 1, one thread: the storer (below).
// Epilogue: after c_empty, each consumer warpgroup converts its 64x256 fp32 accumulator and
// writes it to its own 32 KB of shared memory in the 128-byte-swizzled layout of the C tensor
// map (conflict-free 4-byte stores); every consumer thread fences the generic proxy against
// the async one (fence.proxy.async.shared::cta) and arrives on c_ready, then starts the next
// tile.  The storer waits for c_ready, issues eight 64x64 TMA stores, waits until they have
// read shared memory (cp.async.bulk.wait_group.read) and arrives on c_empty; then, with
// counters, the signal: cp.async.bulk.wait_group 0 (the stores' writes performed),
// fence.proxy.async.global (async-proxy writes before the generic operations that follow),
// red.release.gpu.global.add on the group's counter -- the protocol of the Gluon
// warp-specialized kernel (flashoverlap.kernels.ws_signal_gemm), one thread doing all of it.
// HALF_EPILOGUE: each warpgroup stages its 64x256 in two 64x128 halves through 16 KB of its
// own (a c_ready / c_empty pair per warpgroup; the storer takes the halves in the order they
// are written and gives a buffer back once its two boxes have been read), which frees the
// 32 KB that a fourth ring stage needs (4 x 48 + 2 x 16 KB = 224 KB).  Why a fourth stage: a
// slot goes back one K step after it was read (one wgmma group stays in flight) and, with
// multicast, only when every CTA of the cluster has read it; three stages leave about two K
// steps (~1.3 us at 1.5 GHz) for the release, the slowest peer, the TMA read from L2 and
// the multicast write.  Measured (stages-run51, one H200, P = 116): no faster in clusters of 4
// (-0.5..+0.5 % row by row), 1.6-2.6 % slower without clusters -- kept as a knob, off.
//
// Clusters over a step table: cluster c runs the CL consecutive steps c*CL + i*P + [0, CL),
// which must share one tile column (the host checks the table: true when every band of the
// swizzled order has a multiple of CL rows) -- or, with MIXED_COLUMNS, may stand in different
// columns: the CTAs of each column then share that column's B tile among themselves.  A CTA whose step is past the table's end still
// loads (A rows past M: zeros) and multicasts its share of B for its peers, and stores nothing.
//
// Synchronisation in a cluster: the consumers of every CTA arrive on the empty barrier of
// every CTA of the cluster (count 2 * CL), so a producer overwrites a slot -- its own and,
// through multicast, its peers' -- only when all of them have read it.  A full barrier expects
// the whole stage (A + B bytes) from its own producer's expect_tx; peers' multicast bytes may
// arrive before the expect_tx (the transaction count may go negative; the phase needs the
// producer's arrival too).  All CTAs of a cluster walk the same tile sequence; a final
// cluster barrier keeps a CTA resident until no peer can still touch its shared memory.

${defines}

typedef unsigned long long u64;
typedef unsigned int u32;

struct __align__(64) TmaDesc { u64 v[16]; };

constexpr int BM = 128, BN = 256, BK = 64;
constexpr int NUM_THREADS = 384;
constexpr u32 A_STAGE = BM * BK * 2;           // 16 KB
constexpr u32 B_BOX = 64 * 64 * 2;             // 8 KB: one 64x64 box of B
constexpr u32 B_STAGE = 4 * B_BOX;             // 32 KB
constexpr u32 STAGE_BYTES = A_STAGE + B_STAGE; // bytes a full barrier expects per phase
#if HALF_EPILOGUE
constexpr u32 C_WG = 64 * (BN / 2) * 2;        // 16 KB: half a consumer warpgroup's 64x256 at a time
#else
constexpr u32 C_WG = 64 * BN * 2;              // 32 KB of C staging per consumer warpgroup
#endif
constexpr u32 RING = STAGES * STAGE_BYTES;
constexpr u32 BARS = RING + 2 * C_WG;          // offset of the barriers (host: + 16 * STAGES + 16 or 32 + 1 KB slack)
constexpr u32 EMPTY_COUNT = MULTICAST ? 2 * CL : 2;

__device__ __forceinline__ u64 desc_field(u32 x) { return (u64)((x & 0x3FFFF) >> 4); }

// wgmma shared-memory matrix descriptor, 128-byte swizzle
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
  return desc_field(addr) | (desc_field(lbo) << 16) | (desc_field(sbo) << 32) | (1ull << 62);
}

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

// WAIT_HINT_NS > 0: try_wait's suspend-time hint (CUTLASS's barrier wait passes one) -- the
// retry path sleeps (NANOSLEEP.SYNCS) instead of re-polling.  counters-run42 saw this kernel
// issue 1.67x the Gluon kernel's instructions (3.4 % of peak on the branch unit against
// 0.02 %); with the hint 3 % fewer (hint-run43), so the wait loops are not where they go --
// the main loop was ~70-90 SASS instructions per K step per consumer warp (descriptors
// rebuilt through R2UR, modulo-3 stage indices; LEAN_LOOP below: ~40) -- and its time moved
// +0.3 % (median of 8 rows)
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_LOOP:\n"
#if WAIT_HINT_NS
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1, %2;\n"
#else
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
#endif
      "@!p bra WAIT_LOOP;\n"
      "}\n" ::"r"(bar),
      "r"(parity), "n"(WAIT_HINT_NS)
      : "memory");
}

// arrive on the barrier at the same shared offset in CTA `rank` of this cluster
__device__ __forceinline__ void mbar_arrive_rank(u32 bar, u32 rank) {
  asm volatile(
      "{\n"
      ".reg .b32 ra;\n"
      "mapa.shared::cluster.u32 ra, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [ra];\n"
      "}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}

__device__ __forceinline__ void tma_load(u32 dst, const TmaDesc* desc, u32 bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"((u64)desc), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

__device__ __forceinline__ void tma_load_multicast(u32 dst, const TmaDesc* desc, u32 bar, int c0,
                                                   int c1, unsigned short mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(dst),
      "l"((u64)desc), "r"(bar), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}

__device__ __forceinline__ void tma_store(const TmaDesc* desc, u32 src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.tile.bulk_group [%0, {%2, %3}], [%1];"
               ::"l"((u64)desc), "r"(src), "r"(c0), "r"(c1)
               : "memory");
}

__device__ __forceinline__ void named_barrier(u32 id, u32 count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ void cluster_sync() {
  if (CL > 1) {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
  } else {
    __syncthreads();
  }
}

__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
  asm("${cvt} %0, %2, %1;" : "=r"(r) : "f"(lo), "f"(hi));
  return r;
}

${wgmma_fn}

// give a ring slot back: an arrive on its empty barrier in every CTA that its data was
// multicast to (a plain arrive: the .release.cluster form compiles to MEMBAR.ALL.GPU)
__device__ __forceinline__ void release_slot(u32 bar, int tid, u32 rank) {
  if (MULTICAST) {
    if (tid < CL) mbar_arrive_rank(bar, (u32)tid);
  } else if (tid == 0) {
    mbar_arrive_rank(bar, rank);
  }
}

__device__ __forceinline__ int step_field(const int* steps, int s, int f) {
  return __ldg(steps + 7 * s + f);
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1) ${cluster_attr}
${kernel_name}(const __grid_constant__ TmaDesc a_desc, const __grid_constant__ TmaDesc b_desc,
               const __grid_constant__ TmaDesc c_desc, const int* __restrict__ steps,
               int num_steps, unsigned int* __restrict__ counters, int M, int K) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 raw = (u32)__cvta_generic_to_shared(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;  // 128-byte swizzle wants 1 KB alignment
  const u32 full = base + BARS;
  const u32 empty = full + 8 * STAGES;
  const u32 c_ready = empty + 8 * STAGES;  // HALF_EPILOGUE: c_ready / c_empty of warpgroup w
  const u32 c_empty = c_ready + 8;          // at c_ready + 16 * w and c_ready + 16 * w + 8

  u32 rank = 0;
  if (CL > 1) asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const int first = blockIdx.x - (int)rank;  // the cluster's first program
  const int P = gridDim.x;
  const int nk = (K + BK - 1) / BK;
  const int wg = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, EMPTY_COUNT);
    }
#if HALF_EPILOGUE
    for (int w = 0; w < 2; ++w) {  // one staging buffer, and one pair, per consumer warpgroup
      mbar_init(c_ready + 16 * w, 128);
      mbar_init(c_ready + 16 * w + 8, 1);
    }
#else
    mbar_init(c_ready, 256);
    mbar_init(c_empty, 1);
#endif
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid == 0) {  // producer
      u32 it = 0, st = 0, phase = 0;
      for (int s0 = first; s0 < num_steps; s0 += P) {
        const int s = s0 + (int)rank;
        const int row = s < num_steps ? step_field(steps, s, 0) : M;  // past the end: zeros
#if MIXED_COLUMNS
        // the cluster's CTAs may stand in different tile columns (a band whose height is not a
        // multiple of CL): the CTAs of one column share its B tile -- member `idx` of a group
        // of `g` loads the boxes j with j % g == idx and multicasts them to the group's mask;
        // a CTA past the table's end takes the cluster's first column (it loads zeros for A
        // and its share of that column's B, and stores nothing)
        int n0 = step_field(steps, s0, 2);
        if (s < num_steps) n0 = step_field(steps, s, 2);
        unsigned short mask = 0;
        int g = 0, idx = 0;
#pragma unroll
        for (int r = 0; r < CL; ++r) {
          const int sr = s0 + r;
          const int cr = step_field(steps, sr < num_steps ? sr : s0, 2);
          if (cr == n0) {
            mask |= (unsigned short)(1u << r);
            idx += r < (int)rank;
            ++g;
          }
        }
#else
        const int n0 = step_field(steps, s0, 2);
#endif
        for (int kk = 0; kk < nk; ++kk, ++it) {
#if LEAN_LOOP
          if (it > 0) {  // the ring position moves on by one slot a K step
            if (++st == STAGES) { st = 0; phase ^= 1; }
          }
#else
          st = it % STAGES;
          phase = (it / STAGES) & 1;
#endif
          mbar_wait(empty + 8 * st, phase ^ 1);
          const u32 bar = full + 8 * st;
          mbar_expect_tx(bar, STAGE_BYTES);
          const u32 sa = base + st * STAGE_BYTES, sb = sa + A_STAGE;
          tma_load(sa, &a_desc, bar, kk * BK, row);
#pragma unroll
          for (int j = 0; j < B_BOXES; ++j) {
            // K-major B: box j = rows n0 + j*BN/B_BOXES.. of weight [N, K]; row-major B:
            // columns n0+64j.. (B_BOXES = 4: a 128-byte-swizzled box is at most 64 wide)
            const int c0 = B_KMAJOR ? kk * BK : n0 + 64 * j;
            const int c1 = B_KMAJOR ? n0 + (BN / B_BOXES) * j : kk * BK;
            const u32 dst = sb + j * (B_STAGE / B_BOXES);
#if MIXED_COLUMNS
            if (g == 1) {
              tma_load(dst, &b_desc, bar, c0, c1);
            } else if (j % g == idx) {
              tma_load_multicast(dst, &b_desc, bar, c0, c1, mask);
            }
#else
            if (MULTICAST) {
              if (j % CL == (int)rank)
                tma_load_multicast(dst, &b_desc, bar, c0, c1, (unsigned short)((1u << CL) - 1));
            } else {
              tma_load(dst, &b_desc, bar, c0, c1);
            }
#endif
          }
        }
      }
    } else if (tid == 32) {  // storer
      u32 n = 0;
      for (int s0 = first; s0 < num_steps; s0 += P, ++n) {
        const int s = s0 + (int)rank;
#if HALF_EPILOGUE
        // column halves h = 0, 1 of each warpgroup's 64 rows, in the order the consumers
        // write them; a buffer goes back as soon as its two boxes have been read
        const int dest = s < num_steps ? step_field(steps, s, 4) : 0;
#if MIXED_COLUMNS
        const int n0 = s < num_steps ? step_field(steps, s, 2) : 0;
#else
        const int n0 = step_field(steps, s0, 2);
#endif
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int w = 0; w < 2; ++w) {
            mbar_wait(c_ready + 16 * w, h);  // two phases a tile: the parity is the half
            if (s < num_steps) {
#pragma unroll
              for (int j = 0; j < 2; ++j)
                tma_store(&c_desc, base + RING + w * C_WG + j * B_BOX, n0 + 128 * h + 64 * j,
                          dest + 64 * w);
              asm volatile("cp.async.bulk.commit_group;" ::: "memory");
              asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
            }
            asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(c_ready + 16 * w + 8)
                         : "memory");
          }
#else
        mbar_wait(c_ready, n & 1);
        if (s < num_steps) {
#if MIXED_COLUMNS
          const int dest = step_field(steps, s, 4), n0 = step_field(steps, s, 2);
#else
          const int dest = step_field(steps, s, 4), n0 = step_field(steps, s0, 2);
#endif
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < 4; ++j)
              tma_store(&c_desc, base + RING + h * C_WG + j * B_BOX, n0 + 64 * j, dest + 64 * h);
          asm volatile("cp.async.bulk.commit_group;" ::: "memory");
          asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
        }
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(c_empty) : "memory");
#endif
        if (s < num_steps && counters != nullptr) {
          asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
          asm volatile("fence.proxy.async.global;" ::: "memory");
          asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(
                           counters + step_field(steps, s, 5))
                       : "memory");
        }
      }
      asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
#if LEAN_LOOP
    // the same value, but warp-uniform to the compiler (a shuffle from lane 0, as CUTLASS's
    // canonical_warp_group_idx): the descriptors below then live in uniform registers
    const int cw = __shfl_sync(0xffffffffu, wg, 0) - 1;
#else
    const int cw = wg - 1;  // consumer warpgroup: rows 64*cw.. of the tile
#endif
    const u32 cbuf = base + RING + cw * C_WG;
    const int warp = tid / 32, lane = tid % 32;
    const int row = warp * 16 + lane / 4;  // and row + 8
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    u32 it = 0, n = 0;
#if LEAN_LOOP
    // LEAN_LOOP: the ring position (slot, phase, previous slot) moves on incrementally instead
    // of it % STAGES, and a descriptor is the stage-0 one plus the slot's and the K slice's
    // offset (the 14-bit address field holds addr >> 4 of a shared address below 256 KB, so
    // adding (bytes >> 4) to the 64-bit descriptor is the descriptor of the moved address)
    const u64 da0 = smem_desc(base + cw * (64 * 128), 16, 1024);
    const u64 db0 = B_KMAJOR ? smem_desc(base + A_STAGE, 16, 1024)
                             : smem_desc(base + A_STAGE, B_BOX, 1024);
    u32 st = 0, phase = 0, prev = STAGES - 1;
#endif
    for (int s0 = first; s0 < num_steps; s0 += P, ++n) {
      for (int kk = 0; kk < nk; ++kk, ++it) {
#if LEAN_LOOP
        mbar_wait(full + 8 * st, phase);
        const u64 off = (u64)((st * STAGE_BYTES) >> 4);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int k = 0; k < BK / 16; ++k)
          wgmma_m64n256k16(acc, da0 + off + 2 * k, db0 + off + (B_KMAJOR ? 2 * k : (2048 >> 4) * k),
                           (kk > 0 || k > 0) ? 1u : 0u);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
        if (kk > 0) release_slot(empty + 8 * prev, tid, rank);
        prev = st;
        if (++st == STAGES) { st = 0; phase ^= 1; }
#else
        const u32 st = it % STAGES;
        mbar_wait(full + 8 * st, (it / STAGES) & 1);
        const u32 sa = base + st * STAGE_BYTES + cw * (64 * 128), sb = base + st * STAGE_BYTES + A_STAGE;
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int k = 0; k < BK / 16; ++k) {
          const u64 da = smem_desc(sa + 32 * k, 16, 1024);
          const u64 db = B_KMAJOR ? smem_desc(sb + 32 * k, 16, 1024)
                                  : smem_desc(sb + 2048 * k, B_BOX, 1024);
          wgmma_m64n256k16(acc, da, db, (kk > 0 || k > 0) ? 1u : 0u);
        }
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
        if (kk > 0) release_slot(empty + 8 * ((it + STAGES - 1) % STAGES), tid, rank);
#endif
      }
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#if LEAN_LOOP
      release_slot(empty + 8 * prev, tid, rank);
#else
      release_slot(empty + 8 * ((it + STAGES - 1) % STAGES), tid, rank);
#endif
      // epilogue: registers -> swizzled shared staging; the storer takes it from there
#if HALF_EPILOGUE
      // (stmatrix as below) columns 128h.. into this warpgroup's 16 KB, h = 0 then 1: two
      // phases of its own pair of barriers a tile, so the parities are the half's
      {
        const u32 srow = warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const u32 hi = (u32)lane >> 4;
        const u32 ready = c_ready + 16 * cw;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mbar_wait(ready + 8, h ^ 1);
#pragma unroll
          for (int q = 8 * h; q < 8 * h + 8; ++q) {
            const u32 chunk = ((u32)(2 * (q % 4)) + hi) ^ (srow % 8);
            const u32 addr = cbuf + (q / 4 - 2 * h) * B_BOX + srow * 128 + chunk * 16;
            asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr),
                         "r"(pack2(acc[8 * q + 0], acc[8 * q + 1])), "r"(pack2(acc[8 * q + 2], acc[8 * q + 3])),
                         "r"(pack2(acc[8 * q + 4], acc[8 * q + 5])), "r"(pack2(acc[8 * q + 6], acc[8 * q + 7]))
                         : "memory");
          }
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
          asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(ready) : "memory");
        }
      }
#else
      mbar_wait(c_empty, (n & 1) ^ 1);
      if (STMATRIX) {
        // stmatrix x4: the wgmma accumulator of an 8x8 block (rows 16*warp + 8*h.., columns
        // 8*j8..) is the fragment layout of stmatrix (thread l: row l/4, columns 2*(l%4)+0,1),
        // so one instruction stores n8 blocks j8 = 2q, 2q+1, top and bottom; lane l gives the
        // address of row l%8 of matrix l/8 (h = (l/8)%2, j8 = 2q + l/16) -- 16 STSM a thread
        // instead of 64 4-byte stores, each 8-lane phase one 128-byte swizzled row set
        const u32 srow = warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const u32 hi = (u32)lane >> 4;
#pragma unroll
        for (int q = 0; q < BN / 16; ++q) {
          const u32 chunk = ((u32)(2 * (q % 4)) + hi) ^ (srow % 8);
          const u32 addr = cbuf + (q / 4) * B_BOX + srow * 128 + chunk * 16;
          asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr),
                       "r"(pack2(acc[8 * q + 0], acc[8 * q + 1])), "r"(pack2(acc[8 * q + 2], acc[8 * q + 3])),
                       "r"(pack2(acc[8 * q + 4], acc[8 * q + 5])), "r"(pack2(acc[8 * q + 6], acc[8 * q + 7]))
                       : "memory");
        }
      } else {
#pragma unroll
        for (int j8 = 0; j8 < BN / 8; ++j8) {
          const u32 off = (j8 / 8) * B_BOX + (((j8 % 8) ^ (row % 8)) * 16) + (lane % 4) * 4;
          const u32 v0 = pack2(acc[4 * j8 + 0], acc[4 * j8 + 1]);
          const u32 v1 = pack2(acc[4 * j8 + 2], acc[4 * j8 + 3]);
          asm volatile("st.shared.u32 [%0], %1;" ::"r"(cbuf + row * 128 + off), "r"(v0) : "memory");
          asm volatile("st.shared.u32 [%0], %1;" ::"r"(cbuf + (row + 8) * 128 + off), "r"(v1)
                       : "memory");
        }
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(c_ready) : "memory");
#endif
    }
  }
  cluster_sync();
}
