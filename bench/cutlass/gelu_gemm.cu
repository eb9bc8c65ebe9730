// Probe kernel: out = GELU(x @ w^T + bias), the exact (erf) GELU in a CUTLASS 3 Hopper
// warp-specialized GEMM's epilogue (fusion::LinCombPerColBiasEltAct). x [M, K] and w [N, K]
// row-major fp16, bias [N] fp16, out [M, N] row-major fp16. One configuration per build:
// TILE_M, TILE_N, CLUSTER_M, CLUSTER_N, PINGPONG (0: cooperative), ACT (0: identity, 1: GELU
// with CUDA's erff, 2: GELU with kernels.gelu_'s erf, A&S 7.1.26 as erfc, |error| <= 1.5e-7).
// Built by bench/cutlass_probe.py with nvcc -arch=sm_90a; called through ctypes.
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

using ElementA = cutlass::half_t;
using ElementB = cutlass::half_t;
using ElementC = cutlass::half_t;
using ElementD = cutlass::half_t;
using LayoutA = cutlass::layout::RowMajor;     // x [M, K]: K-major
using LayoutB = cutlass::layout::ColumnMajor;  // w [N, K] row-major = B [K, N] K-major
using LayoutC = cutlass::layout::RowMajor;
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlign = 8;

using TileShape = Shape<Int<TILE_M>, Int<TILE_N>, _64>;
using ClusterShape = Shape<Int<CLUSTER_M>, Int<CLUSTER_N>, _1>;
#if PINGPONG
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
#else
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
#endif
template <class T>
struct GeluFastErf {
  static const bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE T operator()(T const& value) const {
    float h = static_cast<float>(value);
    float s = fabsf(h) * 0.70710678118654752f;
    float t = 1.0f / fmaf(0.3275911f, s, 1.0f);
    float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
                 t * (-1.453152027f + t * 1.061405429f))));
    float erfc = poly * exp2f(-1.4426950408889634f * s * s);
    return static_cast<T>(0.5f * h * (h >= 0.0f ? 2.0f - erfc : erfc));
  }
};
template <class T, int N>
struct GeluFastErf<cutlass::Array<T, N>> {
  static const bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& value) const {
    cutlass::Array<T, N> y;
    GeluFastErf<T> op;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = op(value[i]);
    return y;
  }
};
#if ACT == 2
template <class T> using Act = GeluFastErf<T>;
#elif ACT == 1
template <class T> using Act = cutlass::epilogue::thread::GELU<T>;
#else
template <class T> using Act = cutlass::epilogue::thread::Identity<T>;
#endif
using FusionOp =
    cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Act, ElementD, float, ElementD, ElementC, float>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, LayoutC, kAlign,
    ElementD, LayoutD, kAlign, EpilogueSchedule, FusionOp>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlign, ElementB,
    LayoutB, kAlign, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>,
                                                        CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

static typename Gemm::Arguments make_args(const void* x, const void* w, const void* bias, void* out,
                                          int M, int N, int K) {
  auto sA = cutlass::make_cute_packed_stride(typename GemmKernel::StrideA{}, make_shape(M, K, 1));
  auto sB = cutlass::make_cute_packed_stride(typename GemmKernel::StrideB{}, make_shape(N, K, 1));
  auto sC = cutlass::make_cute_packed_stride(typename GemmKernel::StrideC{}, make_shape(M, N, 1));
  auto sD = cutlass::make_cute_packed_stride(typename GemmKernel::StrideD{}, make_shape(M, N, 1));
  cutlass::KernelHardwareInfo hw;
  hw.device_id = 0;
  static int sms = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
  hw.sm_count = sms;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<ElementA const*>(x), sA, static_cast<ElementB const*>(w), sB},
      {{}, static_cast<ElementC const*>(nullptr), sC, static_cast<ElementD*>(out), sD},
      hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.thread.bias_ptr = static_cast<ElementD const*>(bias);
  return args;
}

extern "C" size_t workspace_size(int M, int N, int K) {
  return Gemm::get_workspace_size(make_args(nullptr, nullptr, nullptr, nullptr, M, N, K));
}

extern "C" int run(const void* x, const void* w, const void* bias, void* out, int M, int N, int K,
                   void* workspace, size_t workspace_bytes, void* stream) {
  auto args = make_args(x, w, bias, out, M, N, K);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (Gemm::get_workspace_size(args) > workspace_bytes) return 2;
  if (gemm.initialize(args, workspace, static_cast<cudaStream_t>(stream)) !=
      cutlass::Status::kSuccess)
    return 3;
  if (gemm.run(static_cast<cudaStream_t>(stream)) != cutlass::Status::kSuccess) return 4;
  return 0;
}
