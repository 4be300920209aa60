// CPU kernels of the ridge ops. The kernels (ridge_cpu_kernels.h) are compiled once per
// instruction set and the one that runs follows ATen's CPU capability (common/cpu_isa.h).
// The solver templates of ridge_math.h are written for the default instruction set and forced
// inline into the wider ones, so their vector values never cross a call: the ABI note that GCC
// gives for them does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <map>
#include <new>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include "common/cpu_isa.h"
#include "common/cpu_lanes.h"
#include "ridge/ridge.h"

namespace reggan_ext {
namespace {

// Tasks of at least this many multiply-adds amortize at::parallel_for's scheduling.
constexpr int64_t kMinTaskWork = 1 << 16;
// The size of a data cache of one core, as the C library reads it off the CPU, or `fallback`
// where it cannot (other systems, or 0 and -1 for unknown).
int64_t data_cache_bytes([[maybe_unused]] int level, int64_t fallback) {
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
  const long bytes = sysconf(level == 1 ? _SC_LEVEL1_DCACHE_SIZE : _SC_LEVEL2_CACHE_SIZE);
  if (bytes > 0) return bytes;
#endif
  return fallback;
}

// Samples per pass of the accumulation are chosen so that what a vector of pixels reads of them
// fits in about this much of L1: two thirds of it, as tuned on a 48 KiB L1.
const int64_t kScratchBytes = data_cache_bytes(1, 48 << 10) * 2 / 3;
// The accumulators of the vectors of pixels a task owns fit in about this much of L2: three
// quarters of it, as tuned on a 2 MiB L2, where those of a 128-pixel row of the k = 7
// per-channel float64 layer (1.03 MiB) were fastest whole, then split in two, then in three.
const int64_t kAccumulatorBytes = data_cache_bytes(2, 2 << 20) * 3 / 4;
// Output rows per task of the accumulation: the entries of neighbouring rows share products
// and input rows. accumulate_products takes kWideBandRows where a task's accumulators still
// cover a whole output row and each thread gets kMinTasksPerThread tasks or more: for the
// per-channel k = 3 layer, 8 rows read 10 input rows where 4 read 6, and share more products.
constexpr int64_t kBandRows = 4;
constexpr int64_t kWideBandRows = 8;
constexpr int64_t kMinTasksPerThread = 4;
// How many statistics entries ahead the accumulation prefetches those it adds to.
constexpr size_t kPrefetchEntries = 4;
// How many entries of a packed Gram ahead the solver prefetches as it loads a task's systems. A
// burst of the next task's entries, issued before each task computed, was slower.
constexpr int64_t kSolvePrefetchEntries = 32;
// Rows of a system the solver factors together (ldlt_factor): each read of a finished row,
// from L2, serves four. The k = 7 solve was slower with 1, 2 or 8.
constexpr int kFactorRows = 4;
// How many samples ahead the accumulation prefetches the inputs it reads.
constexpr int64_t kPrefetchSamples = 4;
// With several input channels per group, the accumulation sums the products that neighbouring
// pixels share only with up to kMaxProductChannels of them, over batches of kMinProductBatch
// samples or more (which amortize planning the products and their per-task costs), and where
// the Gram's tiles would take kProductGain times their multiply-adds or more. Elsewhere the
// tiles were faster here.
constexpr int64_t kMaxProductChannels = 6;
constexpr int64_t kMinProductBatch = 64;
constexpr double kProductGain = 1.7;

}  // namespace

#ifdef REGGAN_X86_ISAS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace ridge_avx512 {
constexpr int kVectorBytes = 64;
constexpr int kTile = 4;  // 16 accumulators + 5 operands of 32 registers
constexpr int kBlockRows = 2, kBlockCols = 8;  // 16 accumulators + 3 operands
constexpr int kSolveParts = 4;
#include "ridge/cpu/ridge_cpu_kernels.h"
}  // namespace ridge_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace ridge_avx2 {
constexpr int kVectorBytes = 32;
constexpr int kTile = 3;  // 9 accumulators + 4 operands of 16 registers
constexpr int kBlockRows = 2, kBlockCols = 4;  // 8 accumulators + 3 operands
constexpr int kSolveParts = 4;
#include "ridge/cpu/ridge_cpu_kernels.h"
}  // namespace ridge_avx2
#pragma GCC pop_options
#endif

namespace ridge_baseline {
constexpr int kVectorBytes = 16;
constexpr int kTile = 3;
constexpr int kBlockRows = 2, kBlockCols = 4;
constexpr int kSolveParts = 4;
#include "ridge/cpu/ridge_cpu_kernels.h"
}  // namespace ridge_baseline

namespace {

// The kernels of each instruction set, for with_cpu_isa.
#ifdef REGGAN_X86_ISAS
constexpr CpuIsaTags<ridge_baseline::Tag, ridge_avx2::Tag, ridge_avx512::Tag> kKernels{};
#else
constexpr CpuIsaTags<ridge_baseline::Tag> kKernels{};
#endif

void accumulate_cpu(const at::Tensor& gram, const at::Tensor& cross, const at::Tensor& target_sq,
                    const at::Tensor& input, const at::Tensor& target,
                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, bool bias) {
  const RidgeGeometry rg = check_accumulate_args(gram, cross, target_sq, input, target,
                                                 kernel_size, stride, padding, dilation, groups,
                                                 bias);
  if (rg.layer.batch == 0 || rg.pixels() == 0) return;
  const at::Tensor x = input.contiguous();
  const at::Tensor y = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "ridge_accumulate_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* g = gram.mutable_data_ptr<acc_t>();
    acc_t* r = cross.mutable_data_ptr<acc_t>();
    acc_t* yy = target_sq.mutable_data_ptr<acc_t>();
    if (x.scalar_type() == at::kFloat) {
      const float* xp = x.const_data_ptr<float>();
      const float* yp = y.const_data_ptr<float>();
      with_cpu_isa(kKernels, [&](auto isa) { accumulate(isa, xp, yp, g, r, yy, rg); });
    } else if constexpr (std::is_same_v<acc_t, double>) {
      const double* xp = x.const_data_ptr<double>();
      const double* yp = y.const_data_ptr<double>();
      with_cpu_isa(kKernels, [&](auto isa) { accumulate(isa, xp, yp, g, r, yy, rg); });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> solve_cpu(const at::Tensor& gram, const at::Tensor& cross,
                                             const at::Tensor& lam, bool penalize_last) {
  const SolveSizes s = check_solve_args(gram, cross, lam);
  const at::Tensor g = gram.contiguous();
  const at::Tensor r = cross.contiguous();
  const at::Tensor l = lam.contiguous();
  at::Tensor solution = at::empty(cross.sizes(), cross.options());
  at::Tensor info = at::empty({s.groups, s.height, s.width}, gram.options().dtype(at::kInt));
  if (s.pixels() == 0) return {solution, info};
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "ridge_solve_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* lp = l.const_data_ptr<scalar_t>();
    scalar_t* wp = solution.mutable_data_ptr<scalar_t>();
    int32_t* ip = info.mutable_data_ptr<int32_t>();
    with_cpu_isa(kKernels, [&](auto isa) { solve(isa, gp, rp, lp, wp, ip, s, penalize_last); });
  });
  return {solution, info};
}

std::tuple<at::Tensor, at::Tensor> inverse_trace_cpu(const at::Tensor& gram, const at::Tensor& lam,
                                                     bool penalize_last) {
  const SolveSizes s = check_inverse_trace_args(gram, lam);
  const at::Tensor g = gram.contiguous();
  const at::Tensor l = lam.contiguous();
  at::Tensor trace = at::empty(lam.sizes(), lam.options());
  at::Tensor info = at::empty(lam.sizes(), lam.options().dtype(at::kInt));
  if (s.pixels() == 0) return {trace, info};
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "ridge_inverse_trace_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* lp = l.const_data_ptr<scalar_t>();
    scalar_t* tp = trace.mutable_data_ptr<scalar_t>();
    int32_t* ip = info.mutable_data_ptr<int32_t>();
    with_cpu_isa(kKernels,
                 [&](auto isa) { inverse_trace(isa, gp, lp, tp, ip, s, penalize_last); });
  });
  return {trace, info};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reggan_ext, m) {
  // The instruction set the CPU ridge kernels use: "avx512", "avx2" or "baseline".
  m.def("ridge_cpu_isa() -> str", &cpu_isa_name);
}

TORCH_LIBRARY_IMPL(reggan_ext, CPU, m) {
  m.impl("ridge_accumulate_", &accumulate_cpu);
  m.impl("ridge_solve", &solve_cpu);
  m.impl("ridge_inverse_trace", &inverse_trace_cpu);
}

}  // namespace reggan_ext
