// flashoverlap: persistent warp-specialized Hopper (sm_90a) GEMM in thread-block clusters,
// with the shared B tile multicast by TMA (rendered by csrc_gen/generate.py, compiled by NVRTC).
//
// C[M, N] = A[M, K] @ B[K, N]; A row-major, B either K-major (B = weight.t(), weight [N, K]
// row-major) or row-major [K, N]; fp32 accumulation; C row-major bf16 / fp16.
//
// Why this kernel exists (issue 14): cuBLAS's Hopper kernels run in clusters of 2-8 CTAs that
// read each B tile from L2 once and multicast it into every CTA of the cluster; under the
// board's power cap that buys clock.  Triton 3.6's Gluon has no multicast load and 3.9's
// lowering adds a loader rendezvous per K step (27-33 % slower, scripts/multicast_probe.py),
// so the lever is measured here in plain CUDA.
//
// Layout of one CTA (384 threads):
//   warpgroup 0  -- producer: one thread issues the TMA loads of a STAGES-deep ring
//                   (A box 128x64 from its own tile row; B as four 64-wide boxes, of which a
//                   CTA of a cluster of CL loads every CL-th and multicasts it to the whole
//                   cluster when MULTICAST);
//   warpgroups 1, 2 -- consumers: each owns 64 rows of the 128x256 tile, wgmma m64n256k16,
//                   one wgmma group in flight; a slot is released (an arrive on the "empty"
//                   barrier of every CTA that the slot's data was multicast to) when the group
//                   after the one that read it has been issued and the older one retired.
// Epilogue: each consumer warpgroup converts its 64x256 fp32 accumulator, writes it to its
// own 32 KB of shared memory in the 128-byte-swizzled layout of the C tensor map (conflict-free
// 4-byte stores), fences the async proxy and issues four 64x64 TMA stores; the next tile's
// main loop overlaps them (the staging buffer is reused only after cp.async.bulk.wait_group.read).
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
constexpr u32 C_WG = 64 * BN * 2;              // 32 KB of C staging per consumer warpgroup
constexpr u32 RING = STAGES * STAGE_BYTES;
constexpr u32 BARS = RING + 2 * C_WG;          // offset of the barriers (host: + 16 * STAGES + 1 KB slack)
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

__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_LOOP:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_LOOP;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
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

// Tile t of a cluster -> (cluster tile row, tile column): bands of GROUP cluster rows,
// column by column inside a band (the L2 swizzle of the signal GEMM, in cluster rows).
__device__ __forceinline__ void tile_of(int t, int crows, int tiles_n, int& cm, int& tn) {
  int band = t / (GROUP * tiles_n);
  int first = band * GROUP;
  int rows = min(crows - first, GROUP);
  int r = t - band * GROUP * tiles_n;
  cm = first + r % rows;
  tn = r / rows;
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1) ${cluster_attr}
${kernel_name}(const __grid_constant__ TmaDesc a_desc, const __grid_constant__ TmaDesc b_desc,
               const __grid_constant__ TmaDesc c_desc, int M, int N, int K) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 raw = (u32)__cvta_generic_to_shared(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;  // 128-byte swizzle wants 1 KB alignment
  const u32 full = base + BARS;
  const u32 empty = full + 8 * STAGES;

  u32 rank = 0;
  if (CL > 1) asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const int cluster = blockIdx.x / CL, clusters = gridDim.x / CL;
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int crows = (tiles_m + CL - 1) / CL;
  const int ctiles = crows * tiles_n;
  const int nk = (K + BK - 1) / BK;
  const int wg = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, EMPTY_COUNT);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid == 0) {
      u32 it = 0;
      for (int t = cluster; t < ctiles; t += clusters) {
        int cm, tn;
        tile_of(t, crows, tiles_n, cm, tn);
        const int m0 = (cm * CL + (int)rank) * BM, n0 = tn * BN;
        for (int kk = 0; kk < nk; ++kk, ++it) {
          const u32 s = it % STAGES;
          mbar_wait(empty + 8 * s, ((it / STAGES) & 1) ^ 1);
          const u32 bar = full + 8 * s;
          mbar_expect_tx(bar, STAGE_BYTES);
          const u32 sa = base + s * STAGE_BYTES, sb = sa + A_STAGE;
          tma_load(sa, &a_desc, bar, kk * BK, m0);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            // K-major B: box j = rows n0+64j.. of weight [N, K]; row-major B: columns n0+64j..
            const int c0 = B_KMAJOR ? kk * BK : n0 + 64 * j;
            const int c1 = B_KMAJOR ? n0 + 64 * j : kk * BK;
            if (MULTICAST) {
              if (j % CL == (int)rank)
                tma_load_multicast(sb + j * B_BOX, &b_desc, bar, c0, c1,
                                   (unsigned short)((1u << CL) - 1));
            } else {
              tma_load(sb + j * B_BOX, &b_desc, bar, c0, c1);
            }
          }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int cw = wg - 1;  // consumer warpgroup: rows 64*cw.. of the tile
    const u32 cbuf = base + RING + cw * C_WG;
    const int warp = tid / 32, lane = tid % 32;
    const int row = warp * 16 + lane / 4;  // and row + 8
    float acc[128];
    u32 it = 0;
    for (int t = cluster; t < ctiles; t += clusters) {
      int cm, tn;
      tile_of(t, crows, tiles_n, cm, tn);
      const int m0 = (cm * CL + (int)rank) * BM, n0 = tn * BN;
      for (int kk = 0; kk < nk; ++kk, ++it) {
        const u32 s = it % STAGES;
        mbar_wait(full + 8 * s, (it / STAGES) & 1);
        const u32 sa = base + s * STAGE_BYTES + cw * (64 * 128), sb = base + s * STAGE_BYTES + A_STAGE;
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
        if (kk > 0) {
          const u32 ps = (it + STAGES - 1) % STAGES;
          if (MULTICAST) {
            if (tid < CL) mbar_arrive_rank(empty + 8 * ps, tid);
          } else if (tid == 0) {
            mbar_arrive_rank(empty + 8 * ps, rank);
          }
        }
      }
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      {
        const u32 ps = (it + STAGES - 1) % STAGES;
        if (MULTICAST) {
          if (tid < CL) mbar_arrive_rank(empty + 8 * ps, tid);
        } else if (tid == 0) {
          mbar_arrive_rank(empty + 8 * ps, rank);
        }
      }
      // epilogue: registers -> swizzled shared staging -> four 64x64 TMA stores
      if (tid == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
      named_barrier(1 + cw, 128);
#pragma unroll
      for (int j8 = 0; j8 < BN / 8; ++j8) {
        const u32 off = (j8 / 8) * B_BOX + (((j8 % 8) ^ (row % 8)) * 16) + (lane % 4) * 4;
        const u32 v0 = pack2(acc[4 * j8 + 0], acc[4 * j8 + 1]);
        const u32 v1 = pack2(acc[4 * j8 + 2], acc[4 * j8 + 3]);
        asm volatile("st.shared.u32 [%0], %1;" ::"r"(cbuf + row * 128 + off), "r"(v0) : "memory");
        asm volatile("st.shared.u32 [%0], %1;" ::"r"(cbuf + (row + 8) * 128 + off), "r"(v1)
                     : "memory");
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      named_barrier(1 + cw, 128);
      if (tid == 0 && m0 + 64 * cw < M) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (n0 + 64 * j < N) tma_store(&c_desc, cbuf + j * B_BOX, n0 + 64 * j, m0 + 64 * cw);
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }
    }
    if (tid == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
  cluster_sync();
}
