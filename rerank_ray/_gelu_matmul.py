"""The feed-forward up-projection's matmul with bias + exact (erf) GELU in its epilogue
(``kernels.linear_gelu`` is the entry point). A module of its own because Triton resolves the
helpers a kernel calls from module globals, and ``kernels`` imports Triton only when a kernel is
first used (CPU-only installs have none)."""

import triton
import triton.language as tl


@triton.jit
def _erf(z, FAST: tl.constexpr):
    if FAST:
        # Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), as erfc = poly(t) * exp(-z^2)
        # so the negative side has no cancellation; far below fp16's half-ulp.
        s = tl.abs(z)
        t = 1.0 / (1.0 + 0.3275911 * s)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
               + t * (-1.453152027 + t * 1.061405429))))  # fmt: skip
        erfc = poly * tl.exp2(-1.4426950408889634 * s * s)
        return tl.where(z >= 0, 1.0 - erfc, erfc - 1.0)
    else:
        return tl.math.erf(z)


@triton.jit
def _gelu_tile(acc, bias, out_dtype: tl.constexpr, FAST: tl.constexpr):
    # As eager fp16: addmm rounds (x @ W^T + b) to the output dtype, then GELU runs in
    # float32 on that and rounds again.
    h = (acc + bias[None, :]).to(out_dtype).to(tl.float32)
    return (0.5 * h * (1.0 + _erf(h * 0.7071067811865476, FAST))).to(out_dtype)


@triton.jit
def linear_gelu_kernel(
    a_desc, w_desc, c_desc, BIAS, M, N, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, SUBTILE: tl.constexpr, WS: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    # Persistent: NUM_SMS programs walk the output tiles (grouped along M for L2 reuse).
    # With WS the compiler splits TMA loads, MMAs and the epilogue into warp groups, so
    # one tile's bias + GELU runs under the next tile's main loop.
    out_dtype = c_desc.dtype
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    num_tiles = num_pid_m * num_pid_n
    in_group = GROUP_M * num_pid_n
    tile_c = start - NUM_SMS
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=True, warp_specialize=WS):
        group = tile // in_group
        first_m = group * GROUP_M
        size_m = min(num_pid_m - first_m, GROUP_M)
        off_m = (first_m + (tile % size_m)) * BM
        off_n = ((tile % in_group) // size_m) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BK])
            b = w_desc.load([off_n, ki * BK])
            acc = tl.dot(a, b.T, acc)
        # The epilogue recomputes its tile's place from its own counter (keeps the
        # prologue and epilogue independent for the pipeliner, as Triton's tutorial does).
        tile_c += NUM_SMS
        group = tile_c // in_group
        first_m = group * GROUP_M
        size_m = min(num_pid_m - first_m, GROUP_M)
        off_cm = (first_m + (tile_c % size_m)) * BM
        off_cn = ((tile_c % in_group) // size_m) * BN
        if SUBTILE:
            acc = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(acc)
            cols = off_cn + tl.arange(0, BN // 2)
            b0 = tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
            c_desc.store([off_cm, off_cn], _gelu_tile(acc0, b0, out_dtype, FAST))
            cols = cols + BN // 2
            b1 = tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
            c_desc.store([off_cm, off_cn + BN // 2], _gelu_tile(acc1, b1, out_dtype, FAST))
        else:
            cols = off_cn + tl.arange(0, BN)
            bias = tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
            c_desc.store([off_cm, off_cn], _gelu_tile(acc, bias, out_dtype, FAST))
