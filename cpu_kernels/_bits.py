"""Scalar float helpers for the Numba kernels: 16-bit widening/narrowing, a vectorisable exp and tanh.

Numba has no float16/bfloat16 on the CPU, so 16-bit caches reach the kernels as uint16 bit patterns.
Everything here is branch-free (selects only) so that LLVM vectorises the loops that call it.
"""
import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# Host CPUs with F16C convert half<->float in one instruction; without it LLVM would emit a call to a
# compiler-rt helper that Numba's JIT may not resolve, so fall back to exact bit arithmetic.
HAS_F16C = "+f16c" in llvm.get_host_cpu_features().flatten().split(",")


@intrinsic
def _bits_as_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (no conversion)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif value.type.width < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_as_bits(typingctx, value):
    """Reinterpret a float32 as its uint32 bit pattern."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@intrinsic
def _half_bits_to_f32_hw(typingctx, bits):
    """IEEE half -> float32 via LLVM `fpext half` (one vcvtph2ps with F16C)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width != 16:
            value = builder.trunc(value, ir.IntType(16))
        return builder.fpext(builder.bitcast(value, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@njit(inline="always")
def widen_f32(x):
    """Identity: float32 caches need no widening."""
    return x


@njit(inline="always")
def widen_bf16(bits):
    """bfloat16 bits (uint16) -> float32: the bf16 pattern is the top half of the float32 pattern."""
    return _bits_as_f32(np.uint32(bits) << np.uint32(16))


@njit(inline="always")
def _half_bits_to_f32_soft(bits):
    """Exact IEEE half -> float32 with integer arithmetic (for CPUs without F16C)."""
    h = np.uint32(bits)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    magnitude = h & np.uint32(0x7FFF)
    # normal numbers: rebias the exponent by 127 - 15 = 112; inf/nan: force the exponent to all ones
    normal = _bits_as_f32(sign | ((magnitude << np.uint32(13)) + np.uint32(0x38000000)))
    special = _bits_as_f32(sign | np.uint32(0x7F800000) | ((magnitude & np.uint32(0x3FF)) << np.uint32(13)))
    # zero and subnormals: magnitude * 2**-24 is exact in float32
    tiny = np.float32(magnitude) * np.float32(5.9604644775390625e-08)
    tiny = -tiny if sign != 0 else tiny
    if magnitude >= 0x7C00:
        return special
    if magnitude >= 0x0400:
        return normal
    return tiny


if HAS_F16C:
    @njit(inline="always")
    def widen_f16(bits):
        """float16 bits (uint16) -> float32."""
        return _half_bits_to_f32_hw(bits)
else:  # pragma: no cover - every x86-64 CPU since 2012 has F16C
    widen_f16 = _half_bits_to_f32_soft


@njit(inline="always")
def narrow_bf16(x):
    """float32 -> bfloat16 bits, round-to-nearest-even; NaN -> 0xFFFF as torch's vectorised `.to()`."""
    u = _f32_as_bits(x)
    rounded = (u + (((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16)
    if x != x:
        return np.uint16(0xFFFF)
    return np.uint16(rounded)


@njit(inline="always")
def narrow_f16(x):
    """float32 -> IEEE half bits, round-to-nearest-even (NumPy's algorithm); NaN keeps sign and top payload
    bits and is quieted, as the hardware conversion that torch uses does."""
    f = _f32_as_bits(x)
    sign = np.uint32((f >> np.uint32(16)) & np.uint32(0x8000))
    f_exp = f & np.uint32(0x7F800000)
    f_sig = f & np.uint32(0x007FFFFF)
    if f_exp >= np.uint32(0x47800000):  # overflow, inf or nan
        if f_exp == np.uint32(0x7F800000) and f_sig != 0:
            return np.uint16(sign | np.uint32(0x7E00) | (f_sig >> np.uint32(13)))
        return np.uint16(sign | np.uint32(0x7C00))
    if f_exp <= np.uint32(0x38000000):  # subnormal half or zero
        if f_exp < np.uint32(0x33000000):
            return np.uint16(sign)
        shift = np.uint32(113) - (f_exp >> np.uint32(23))
        sig = (np.uint32(0x00800000) + f_sig) >> shift
        if (sig & np.uint32(0x3FFF)) != np.uint32(0x1000) or (f & np.uint32(0x7FF)) != 0:
            sig += np.uint32(0x1000)
        return np.uint16(sign + (sig >> np.uint32(13)))
    h_exp = (f_exp - np.uint32(0x38000000)) >> np.uint32(13)
    if (f_sig & np.uint32(0x3FFF)) != np.uint32(0x1000):
        f_sig += np.uint32(0x1000)
    # a carry out of the significand bumps the exponent, up to inf: that is the correct rounding
    return np.uint16(sign + h_exp + (f_sig >> np.uint32(13)))


@njit(inline="always")
def narrow_f32(x):
    """Identity for float32 caches."""
    return x


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.0)
_EXP_MAX = np.float32(88.0)


@njit(inline="always")
def fast_exp(x):
    """exp(x) for float32 within ~2 ulp (Cephes expf polynomial), vectorisable (no libm call).

    exp(-inf) and anything below -87 is exactly 0 (softmax weights that small do not matter);
    NaN propagates.
    """
    xc = _EXP_MIN if x < _EXP_MIN else x
    xc = _EXP_MAX if xc > _EXP_MAX else xc
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - n * _LN2_HI - n * _LN2_LO
    z = r * r
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * z + r + np.float32(1.0)
    scale = _bits_as_f32(np.uint32(np.int32(n) + np.int32(127)) << np.uint32(23))
    result = p * scale
    return np.float32(0.0) if x < _EXP_MIN else result


_TANH_SMALL = np.float32(0.625)


@njit(inline="always")
def fast_tanh(x):
    """tanh(x) for float32 within a few ulp (Cephes tanhf), vectorisable (no libm call, selects only).

    |x| < 0.625: odd polynomial; otherwise 1 - 2 / (exp(2|x|) + 1) with the sign of x, which rounds to
    exactly +-1 from |x| ~ 9.1 on (fast_exp clamps, so +-inf give +-1). NaN propagates.
    """
    z = np.abs(x)
    s = x * x
    small = ((((np.float32(-5.70498872745e-3) * s
                + np.float32(2.06390887954e-2)) * s
               - np.float32(5.37397155531e-2)) * s
              + np.float32(1.33314422036e-1)) * s
             - np.float32(3.33332819422e-1)) * s * x + x
    big = np.float32(1.0) - np.float32(2.0) / (fast_exp(z + z) + np.float32(1.0))
    big = -big if x < 0 else big
    return big if z >= _TANH_SMALL else small


def widen(x):
    """Cache element -> float32, chosen by the element type inside Numba code: float32 as is, uint16 as
    bfloat16 bits, int16 as IEEE float16 bits (the wrappers hand over the matching views)."""
    raise NotImplementedError("widen is only callable from Numba-compiled code")


@overload(widen, inline="always")
def _widen_by_type(x):
    if x == types.float32:
        return lambda x: x
    if x == types.uint16:
        return lambda x: widen_bf16(x)
    if x == types.int16:
        return lambda x: widen_f16(x)
    return None
