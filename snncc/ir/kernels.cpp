// One-pass CPU kernels for the neurons the reference executor spends most time in
// (snncc.ir.kernels): the multi-range quantizer and train, the table-neuron lookup, and
// binary code trains.
//
// Each is the element-wise body of a chain of PyTorch ops in snncc/ir/ops.py, written as one
// loop so a value is read and written once instead of once per op; the results are bit for
// bit those of the PyTorch chain (tests/ir/test_kernels.py). Built with -ffp-contract=off (a
// fused multiply-add would round differently) and -fno-trapping-math (so the branch-free
// loops vectorize; only floating-point exception flags differ).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kGrain = 1 << 14;

inline int32_t bits_of(float value) {
    int32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

inline float float_of(int32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

// a - b wrapping around as torch's int32 arithmetic does (signed overflow is undefined in C++).
inline int32_t wrapping_sub(int32_t a, int32_t b) {
    return static_cast<int32_t>(static_cast<uint32_t>(a) - static_cast<uint32_t>(b));
}

// 2^e for int32 e in [-126, 127], from its bits (ops._power_of_two).
inline float power_of_two(int32_t e) { return float_of((e + 127) << 23); }

// The multi-range code of one normalised value u (ops.multi_range_code in float32): the
// range index j and the code magnitude floor(|u| 2^(T-j) + 1/2) capped at the top code, as a
// float (NaN for NaN u). Branch-free, so the loops around it vectorize.
struct MultiRangeCode {
    int32_t j;
    float code;
};

inline MultiRangeCode multi_range_code(float u, int32_t T, int32_t G, int32_t limit_mantissa, float top) {
    const float a = std::fabs(u);
    const int32_t bits = bits_of(a);
    const int32_t j = std::min(std::max((bits >> 23) - 126 + ((bits & 0x7FFFFF) >= limit_mantissa), 0), G);
    const float rounded = a * power_of_two(T - j) + 0.5f;  // >= 1/2, or NaN (no FMA: -ffp-contract=off)
    // min(floor(rounded), top), NaN kept as torch.clamp keeps it: below the top code
    // (< 2^23) truncation is floor, and needs no libm call.
    const bool nan = rounded != rounded;
    const float capped = nan ? 0.0f : std::min(rounded, top);
    return {j, nan ? rounded : static_cast<float>(static_cast<int32_t>(capped))};
}

// ops._mr_quantize_float32 over n values: the code scaled back, with u's sign.
void mr_quantize_values(const float* __restrict__ in, float* __restrict__ res, int64_t n, int32_t T, int32_t G,
                        int32_t limit_mantissa, float top) {
    for (int64_t i = 0; i < n; ++i) {
        const MultiRangeCode m = multi_range_code(in[i], T, G, limit_mantissa, top);
        res[i] = std::copysign(m.code * power_of_two(m.j - T), in[i]);
    }
}

torch::Tensor mr_quantize(torch::Tensor u, int64_t T, int64_t G, int64_t limit_mantissa, double top_code) {
    TORCH_CHECK(u.scalar_type() == torch::kFloat32 && u.is_contiguous() && u.device().is_cpu(),
                "mr_quantize kernel: contiguous float32 CPU input");
    auto out = torch::empty_like(u);
    const float* in = u.data_ptr<float>();
    float* res = out.data_ptr<float>();
    at::parallel_for(0, u.numel(), kGrain, [&](int64_t begin, int64_t end) {
        mr_quantize_values(in + begin, res + begin, end - begin, static_cast<int32_t>(T), static_cast<int32_t>(G),
                           static_cast<int32_t>(limit_mantissa), static_cast<float>(top_code));
    });
    return out;
}

// ops.code_digits for a block of codes: the T digits (binary, or ternary non-adjacent form)
// of magnitudes k, times sign_gain (the sign, times 2^j for a multi-range spike), digit t of
// code i written to out[t n + i]. Step by step over the block, so the inner loop vectorizes.
void write_digits(int8_t* __restrict__ out, int64_t n, const int32_t* __restrict__ k,
                  const int32_t* __restrict__ sign_gain, int64_t count, int32_t T, bool ternary) {
    for (int32_t t = 0; t < T; ++t) {
        const int32_t shift = T - 1 - t;
        int8_t* __restrict__ row = out + t * n;
        if (ternary) {
            for (int64_t i = 0; i < count; ++i) {
                const int32_t digit = ((3 * k[i] >> (shift + 1)) & 1) - ((k[i] >> (shift + 1)) & 1);
                row[i] = static_cast<int8_t>(digit * sign_gain[i]);
            }
        } else {
            for (int64_t i = 0; i < count; ++i) row[i] = static_cast<int8_t>(((k[i] >> shift) & 1) * sign_gain[i]);
        }
    }
}

constexpr int64_t kBlock = 2048;  // codes per block: their magnitudes and gains stay in L1

// The train (T, n) of the codes that fill(i, k, sign_gain) gives: block by block, the codes
// first, then their digits step by step (write_digits).
template <typename Fill>
torch::Tensor digit_train(const torch::TensorOptions& options, int64_t n, int32_t T, bool ternary, Fill fill) {
    auto out = torch::empty({T, n}, options.dtype(torch::kInt8));
    int8_t* res = out.data_ptr<int8_t>();
    at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t first_block, int64_t end_block) {
        int32_t k[kBlock], sign_gain[kBlock];
        for (int64_t begin = first_block * kBlock; begin < std::min(end_block * kBlock, n); begin += kBlock) {
            const int64_t count = std::min(kBlock, n - begin);
            for (int64_t i = 0; i < count; ++i) fill(begin + i, k[i], sign_gain[i]);
            write_digits(res + begin, n, k, sign_gain, count, T, ternary);
        }
    });
    return out;
}

// ops.mr_encode's train (T, n) for normalised u (n,): ternary digits of each value's
// multi-range code, each spike carrying +-2^j. A NaN value sends no spikes here; ops.mr_encode
// then poisons every neuron whose input is NaN or inf (one POISON spike at step 0), as on its
// PyTorch path.
torch::Tensor mr_encode(torch::Tensor u, int64_t T, int64_t G, int64_t limit_mantissa, double top_code) {
    TORCH_CHECK(u.scalar_type() == torch::kFloat32 && u.is_contiguous() && u.device().is_cpu() && T <= 22,
                "mr_encode kernel: contiguous float32 CPU input, T <= 22");
    const float* in = u.data_ptr<float>();
    const int32_t steps = static_cast<int32_t>(T), ranges = static_cast<int32_t>(G);
    const int32_t limit = static_cast<int32_t>(limit_mantissa);
    const float top = static_cast<float>(top_code);
    return digit_train(u.options(), u.numel(), steps, true, [&](int64_t i, int32_t& k, int32_t& sign_gain) {
        const MultiRangeCode m = multi_range_code(in[i], steps, ranges, limit, top);
        const bool nan = m.code != m.code;
        k = nan ? 0 : static_cast<int32_t>(m.code);
        sign_gain = nan ? 0 : ((in[i] > 0.0f) - (in[i] < 0.0f)) << m.j;
    });
}

// ops.mr_spike_counts: how many of the T steps of each value's mr_encode train are non-zero
// (no train is built). Ternary digit s of code k is bit s+1 of 3k minus bit s+1 of k
// (write_digits), so the non-zero digits are the set bits of (3k ^ k) >> 1 below bit T.
// A NaN value counts 0 here; ops.mr_spike_counts counts its poison spike.
torch::Tensor mr_spike_counts(torch::Tensor u, int64_t T, int64_t G, int64_t limit_mantissa, double top_code) {
    TORCH_CHECK(u.scalar_type() == torch::kFloat32 && u.is_contiguous() && u.device().is_cpu() && T <= 22,
                "mr_spike_counts kernel: contiguous float32 CPU input, T <= 22");
    auto out = torch::empty(u.sizes(), u.options().dtype(torch::kInt8));
    const float* in = u.data_ptr<float>();
    int8_t* res = out.data_ptr<int8_t>();
    const int32_t steps = static_cast<int32_t>(T), ranges = static_cast<int32_t>(G);
    const int32_t limit = static_cast<int32_t>(limit_mantissa);
    const float top = static_cast<float>(top_code);
    const uint32_t digits = ((1u << steps) - 1u) << 1;
    at::parallel_for(0, u.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const MultiRangeCode m = multi_range_code(in[i], steps, ranges, limit, top);
            const uint32_t k = m.code != m.code ? 0u : static_cast<uint32_t>(m.code);
            res[i] = static_cast<int8_t>(__builtin_popcount(((3u * k) ^ k) & digits));
        }
    });
    return out;
}

// ops.signed_code_digits: the binary train (T, n) of signed integer codes (|code| < 2^T).
torch::Tensor signed_digits(torch::Tensor codes, int64_t T) {
    TORCH_CHECK(codes.scalar_type() == torch::kInt64 && codes.is_contiguous() && codes.device().is_cpu() && T <= 29,
                "signed_digits kernel: contiguous int64 CPU codes, T <= 29");
    const int64_t* in = codes.data_ptr<int64_t>();
    return digit_train(codes.options(), codes.numel(), static_cast<int32_t>(T), false,
                       [&](int64_t i, int32_t& k, int32_t& sign) {
                           k = static_cast<int32_t>(in[i] < 0 ? -in[i] : in[i]);
                           sign = (in[i] > 0) - (in[i] < 0);
                       });
}

// A guide field: one value for all channels (numel 1) or one per channel of the last dim.
struct Field {
    const int32_t* data;
    bool per_channel;
    int32_t at(int64_t channel) const { return data[per_channel ? channel : 0]; }
};

Field field(const torch::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous(), "guide fields are contiguous int32");
    return {t.data_ptr<int32_t>(), t.numel() != 1};
}

// The tables of ops.table_codes read through a guide (ops._Guide): for a value in channel c,
// the code of the interval among the channel's table thresholds that it lies in.
struct GuidedTables {
    Field shift, first, floor_, last, base, offset, length;
    const int32_t* starts;
    const float* padded;
    int64_t width;
    bool padded_table;
    const int64_t* codes;
    const int64_t* code_base;  // where channel c's table starts in codes
    bool code_per_channel;

    // ops._guided_interval, then the code lookup.
    int64_t code_of(float x, int64_t c) const {
        const float value = x + 0.0f;  // -0 -> +0
        const int32_t bits = bits_of(value);
        const int32_t sign = bits >> 31;
        const int32_t magnitude = std::max((bits & 0x7FFFFFFF) - floor_.at(c), 0);
        const int32_t key = (magnitude ^ sign) - sign;
        const int32_t bucket = std::min(std::max(wrapping_sub(key >> shift.at(c), first.at(c)), 0), last.at(c));
        const int64_t start = static_cast<int64_t>(starts[bucket + base.at(c)]) + offset.at(c);
        int64_t index = start;
        for (int64_t k = 0; k < width; ++k) index += padded[start + k] <= value ? 1 : 0;
        index -= offset.at(c);
        if (padded_table && std::isinf(value) && value > 0) index = length.at(c);
        return codes[code_base[code_per_channel ? c : 0] + index];
    }
};

// For x (N, C): the codes (int64), or with scale > 0 the values code * scale (float32, what
// ops.fn_quantize computes: one pass instead of a lookup, a conversion and a product).
torch::Tensor table_codes(torch::Tensor x, torch::Tensor shift, torch::Tensor first, torch::Tensor floor_,
                          torch::Tensor last, torch::Tensor base, torch::Tensor offset, torch::Tensor length,
                          torch::Tensor starts, torch::Tensor padded, int64_t width, bool padded_table,
                          torch::Tensor codes, torch::Tensor code_base, double scale) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.device().is_cpu(),
                "table_codes kernel: contiguous (N, C) float32 CPU input");
    TORCH_CHECK(starts.scalar_type() == torch::kInt32 && padded.scalar_type() == torch::kFloat32 &&
                codes.scalar_type() == torch::kInt64 && code_base.scalar_type() == torch::kInt64 &&
                starts.is_contiguous() && padded.is_contiguous() && codes.is_contiguous() &&
                code_base.is_contiguous(), "table_codes kernel: bad table dtypes");
    const GuidedTables tables{field(shift), field(first), field(floor_), field(last), field(base), field(offset),
                              field(length), starts.data_ptr<int32_t>(), padded.data_ptr<float>(), width,
                              padded_table, codes.data_ptr<int64_t>(), code_base.data_ptr<int64_t>(),
                              code_base.numel() != 1};
    const bool values = scale > 0;
    auto out = torch::empty(x.sizes(), x.options().dtype(values ? torch::kFloat32 : torch::kInt64));
    const float* in = x.data_ptr<float>();
    const int64_t rows = x.size(0), channels = x.size(1);
    const float gain = static_cast<float>(scale);
    float* value_out = values ? out.data_ptr<float>() : nullptr;
    int64_t* code_out = values ? nullptr : out.data_ptr<int64_t>();
    const auto write = [&](int64_t i, int64_t c) {
        const int64_t code = tables.code_of(in[i], c);
        if (values) {
            value_out[i] = static_cast<float>(code) * gain;
        } else {
            code_out[i] = code;
        }
    };
    if (channels == 1) {  // one table: plain order
        at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) write(i, 0);
        });
    } else {  // channel by channel: a channel's values sit in one stretch of its table, which
              // then stays in cache; row by row the channels' tables would compete for it
        at::parallel_for(0, channels, std::max<int64_t>(1, kGrain / std::max<int64_t>(rows, 1)),
                         [&](int64_t begin, int64_t end) {
                             for (int64_t c = begin; c < end; ++c) {
                                 for (int64_t row = 0; row < rows; ++row) write(row * channels + c, c);
                             }
                         });
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("mr_quantize", &mr_quantize, "multi-range quantizer, one pass");
    m.def("table_codes", &table_codes, "table neuron codes through a guide, one pass");
    m.def("mr_encode", &mr_encode, "multi-range neuron train, one pass");
    m.def("mr_spike_counts", &mr_spike_counts, "non-zero steps of each multi-range train, one pass");
    m.def("signed_digits", &signed_digits, "binary train of signed codes, one pass");
}
