// flashoverlap: fused restore epilogue, restore + residual add (rendered by csrc_gen/generate.py).
//
//   out[tile(slot)] = buf[slot] + residual[tile(slot)]     for slot_begin <= slot < slot_begin + gridDim.x
//
// buf is the received comm buffer [slots, BM, BN] (every tile padded to BM x BN; the padding
// is never read back); tile_m/tile_n give each slot's tile coordinates in the [M, N] output
// (the plan's restore_tile_m / restore_tile_n).  One CTA per tile; the sum is done in fp32.
// Storage type ${storage_t} holds ${dtype} values; conversions are inline PTX so that NVRTC
// needs no CUDA headers.

#define BM ${block_m}
#define BN ${block_n}

__device__ __forceinline__ float fo_load(${storage_t} x) {
${load_body}
}

__device__ __forceinline__ ${storage_t} fo_store(float v) {
${store_body}
}

extern "C" __global__ void ${kernel_name}(const ${storage_t}* __restrict__ buf,
                                          const int* __restrict__ tile_m,
                                          const int* __restrict__ tile_n,
                                          const ${storage_t}* __restrict__ residual,
                                          ${storage_t}* __restrict__ out,
                                          int slot_begin, int M, int N,
                                          long long ld_residual, long long ld_out) {
  const int slot = slot_begin + blockIdx.x;
  const long long row0 = static_cast<long long>(tile_m[slot]) * BM;
  const long long col0 = static_cast<long long>(tile_n[slot]) * BN;
  const ${storage_t}* tile = buf + static_cast<long long>(slot) * (BM * BN);
  for (int i = threadIdx.x; i < BM * BN; i += blockDim.x) {
    const long long row = row0 + i / BN;
    const long long col = col0 + i % BN;
    if (row < M && col < N) {
      const float v = fo_load(tile[i]) + fo_load(residual[row * ld_residual + col]);
      out[row * ld_out + col] = fo_store(v);
    }
  }
}
