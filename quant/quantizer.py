"""Quantizer math as pure tensor functions (spec quantization.md §1-2).

Uniform affine fake quantization: x_q = (clamp(round(x/Δ) + z, q_min, q_max) − z)·Δ, with a straight-through
estimator for the rounding. Schemes are value objects (``QScheme``), granularities ``PerTensor`` / ``PerChannel``,
the scale search an enum. Everything here is stateless; modules that hold Δ, z or AdaRound's α live elsewhere.

Conventions (one, not the originals' mix): an asymmetric scheme uses the unsigned grid [0, 2^b − 1] and a range
that always contains 0 (so 0 is exact); a symmetric scheme uses the signed grid [−2^(b−1), 2^(b−1) − 1] with z = 0.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch (Nagel et al. 2020, Eq. 23)


@dataclass(frozen=True)
class PerTensor:
    """One (Δ, z) for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One (Δ, z) per slice along ``axis`` (output channels of a conv/linear weight: axis 0).
    Weight [C_out, C_in, k, k] -> Δ, z of shape [C_out, 1, 1, 1]."""

    axis: int = 0


class ScaleSearch(enum.Enum):
    MAX = "max"  # the full (0-extended) range
    MSE = "mse"  # the clipping with the lowest L_p error (p = 2.4) among 80 shrinks of the range (LAPQ / BRECQ)


@dataclass(frozen=True)
class QScheme:
    bits: int
    symmetric: bool = False
    granularity: PerTensor | PerChannel = PerTensor()
    search: ScaleSearch = ScaleSearch.MSE

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {self.bits}")
        if not isinstance(self.granularity, (PerTensor, PerChannel)):
            raise TypeError(f"granularity must be PerTensor() or PerChannel(axis), got {self.granularity!r}")
        if not isinstance(self.search, ScaleSearch):
            raise TypeError(f"search must be a ScaleSearch, got {self.search!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return (x.round() - x).detach() + x


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integer grid values clamp(round(x/Δ) + z) (as floats; exact integers)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


class FakeQuantKernel(enum.Enum):
    """How sampling (no autograd) computes an activation's quantize-dequantize: the same grid, different cost.
    Chosen per device by measurement (issue 29), or asked for by name (``--execution compiled``)."""

    AUTO = "auto"            # FUSED where it is the fast one (CUDA, float32, per tensor), PASSES elsewhere
    PASSES = "passes"        # four in-place passes over one fresh tensor: exact (the training path's values)
    FUSED = "fused"          # torch.fake_quantize_per_tensor_affine: one kernel; ×(1/Δ), so codes may move at ties
    COMPILED = "compiled"    # the exact arithmetic as one torch.compile'd kernel (per-tensor ranges)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               kernel: FakeQuantKernel = FakeQuantKernel.AUTO) -> torch.Tensor:
    """Quantize-dequantize with STE rounding; gradients reach x (inside the range) and Δ (LSQ without its
    gradient scale, as BRECQ/Q-Diffusion train activation steps). Without autograd, ``kernel`` says how it is
    computed (``FakeQuantKernel``); with it, always the STE form."""
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
        if kernel is FakeQuantKernel.COMPILED and compiled_fake_quant_applies(x, scale):
            return compiled_fake_quant(x, scale, zero_point, qmin, qmax)
        if kernel is FakeQuantKernel.FUSED or (kernel is FakeQuantKernel.AUTO and fused_fake_quant_applies(x, scale)):
            return fused_fake_quant(x, scale, zero_point, qmin, qmax)
        # sampling: the same arithmetic in place on one fresh tensor (round_ste's forward value is round(v)
        # exactly), one allocation instead of seven. z is an integer, so clamp(round(v) + z) − z =
        # clamp(round(v), q_min − z, q_max − z) exactly: four passes instead of six, with scalar bounds (a clamp
        # with tensor bounds is slower than the two passes it saves: (8, 192, 64, 64) on 2 AVX-512 threads, six
        # passes 2.12 ms, four with tensor bounds 3.70 ms, four with scalar bounds 1.59 ms, a copy 0.75 ms)
        y = x / scale
        if not isinstance(zero_point, torch.Tensor) or (zero_point.numel() == 1 and zero_point.device.type == "cpu"):
            z = float(zero_point)      # (a CUDA scalar would cost a host sync: CUDA keeps the tensor form)
            return y.round_().clamp_(qmin - z, qmax - z).mul_(scale)
        return y.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fused_fake_quant_applies(x: torch.Tensor, scale) -> bool:
    """Where PyTorch's one-pass fused op is the fast one, by measurement: on CUDA (an H200, (32, 192, 64, 64):
    70 µs against 387 µs for the four-pass form). On CPUs it is slower than the passes above (AVX-512: 12.2 ms
    against 2.3-3.3 ms on (8, 192, 64, 64)), so CPUs keep them, and their results stay bit-identical."""
    return x.is_cuda and x.dtype == torch.float32 and (not isinstance(scale, torch.Tensor) or scale.numel() == 1)


def fused_fake_quant(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """``torch.fake_quantize_per_tensor_affine``: (clamp(round(x·(1/Δ) + z), q_min, q_max) − z)·Δ in one kernel.
    It multiplies by 1/Δ instead of dividing, so a value within an ulp of a rounding tie can land one code apart
    from ``fake_quant``'s grid (tests/test_quantizer.py counts them)."""
    zero_point = torch.as_tensor(zero_point, device=x.device).reshape(()).round().to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x, _scalar(scale, x), zero_point, qmin, qmax)


def compiled_fake_quant_applies(x: torch.Tensor, scale) -> bool:
    """The compiled kernel takes float32 inputs with one (Δ, z) that fill their memory densely in some dimension
    order (every activation quantizer but a split decoder conv's two ranges; those keep the passes: same values)."""
    return (x.dtype == torch.float32 and (not isinstance(scale, torch.Tensor) or scale.numel() == 1)
            and x.permute(*_memory_order(x)).is_contiguous())


def _memory_order(x: torch.Tensor) -> list[int]:
    """``x``'s dimensions in memory order (largest stride first): permuted so, a dense tensor in any dimension order
    (a transposed or channels-last activation) is contiguous."""
    return sorted(range(x.ndim), key=lambda d: -x.stride(d))


def _exact_fake_quant(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # x / Δ divides (as the passes do), round is half-to-even on both: the compiled kernel is bit-identical.
    # maximum / minimum with 0-d bounds, not clamp, nor bounds computed inside: inductor's CPU code vectorises this
    # form only (the others measured 1.6-2.3× slower)
    return torch.minimum(torch.maximum(torch.round(x / scale), lo), hi) * scale


@functools.cache
def _compiled_kernel():
    # Without inductor's FX graph cache: its key misses the vector ISA that ATEN_CPU_CAPABILITY picks, so a graph
    # cached under AVX-512 came back under AVX2 (one cache directory) with 16-wide loops over 8-wide vectors: 128 of
    # the probe's 257 values garbage (torch 2.13; the other way round it writes past the buffer). The compiled .so
    # files stay cached under keys that hold the compiler flags: a warm build costs about the same.
    return torch.compile(_exact_fake_quant, dynamic=True, fullgraph=True, options={"fx_graph_cache": False})


def _scalar(v, like: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.device == like.device and v.ndim == 0:
        return v
    return torch.as_tensor(v, dtype=torch.float32, device=like.device).reshape(())


def compiled_fake_quant(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """The four passes of ``fake_quant`` fused by ``torch.compile`` into one read and one write of ``x`` (CPU: a
    C++ kernel, so a compiler must be installed; ``check_compiled_fake_quant`` says so in one line). ``x`` (dense:
    ``compiled_fake_quant_applies``) is read flat in memory order, so one graph with a dynamic length serves every
    shape, and the result has ``x``'s strides, as the passes' has (a matmul's summation order, and so its last
    bits, can depend on its input's layout); Δ and the bounds are 0-d tensors, so new ranges never recompile it."""
    scale, zero_point = _scalar(scale, x), _scalar(zero_point, x)
    if torch.is_grad_enabled():   # (an inference kernel: grad mode is part of the compiled graph's guards)
        with torch.no_grad():
            return compiled_fake_quant(x, scale, zero_point, qmin, qmax)
    # (detached: a view would be traced through its base, whose rank differs from call to call)
    if x.is_contiguous():
        return _compiled_kernel()(x.view(-1).detach(), scale, qmin - zero_point, qmax - zero_point).view(x.shape)
    order = _memory_order(x)
    dense = x.permute(*order)
    y = _compiled_kernel()(dense.reshape(-1).detach(), scale, qmin - zero_point, qmax - zero_point)
    return y.view(dense.shape).permute(*sorted(range(x.ndim), key=order.__getitem__))


class CompileUnavailable(RuntimeError):
    """torch.compile cannot build the fake-quant kernel on this machine (no C++ compiler, no Triton)."""


FAKE_INSTEAD = "use --execution fake (the same numbers, four passes per activation)"


def check_compiled_fake_quant(device: torch.device) -> None:
    """Compile the kernel once on ``device`` and check it against the passes on known values. ``CompileUnavailable``
    when torch.compile cannot build it here, ``RuntimeError`` when what it built computes other values; each
    message names the cause and the way out in one line."""
    x = torch.linspace(-3.0, 3.0, 257, device=device)   # ties at ±k·Δ/2 included (Δ = 0.046875 is exact)
    scale, zp = torch.tensor(0.046875, device=device), torch.tensor(7.0, device=device)
    try:
        got = compiled_fake_quant(x, scale, zp, 0, 15)
    except Exception as e:   # (inductor raises many types; the first line says what is missing)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileUnavailable(f"torch.compile could not build the fake-quant kernel on {device}: {first[:200]}; "
                                 f"install a C++ compiler (CPU) or Triton (CUDA), or {FAKE_INSTEAD}") from None
    with torch.no_grad():
        want = fake_quant(x, scale, zp, 0, 15, FakeQuantKernel.PASSES)
    if not torch.equal(got, want):
        raise RuntimeError(f"the compiled fake-quant kernel on {device} differs from the exact passes "
                           f"({int((got != want).sum())} of {x.numel()} values), a torch.compile fault on this "
                           f"machine; {FAKE_INSTEAD}")


def _channel_view(x: torch.Tensor, granularity) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x -> [C, N] rows (C = 1 per tensor) and the broadcast shape of per-row parameters."""
    if isinstance(granularity, PerChannel):
        axis = granularity.axis % x.ndim
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        return rows, tuple(shape)
    return x.reshape(1, -1), (1,) * x.ndim if x.ndim else ()


def qparams_from_range(x_min: torch.Tensor, x_max: torch.Tensor, scheme: QScheme
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, z) covering [x_min, x_max] (extended to contain 0). Δ is floored at 1e-8 (constant inputs)."""
    x_min, x_max = torch.minimum(x_min, torch.zeros_like(x_min)), torch.maximum(x_max, torch.zeros_like(x_max))
    if scheme.symmetric:
        absmax = torch.maximum(-x_min, x_max)
        scale = (absmax / scheme.qmax).clamp_min(1e-8)
        return scale, torch.zeros_like(scale)
    scale = ((x_max - x_min) / (scheme.qmax - scheme.qmin)).clamp_min(1e-8)
    zero_point = torch.clamp(torch.round(-x_min / scale), scheme.qmin, scheme.qmax)
    return scale, zero_point


def lp_error(x: torch.Tensor, x_q: torch.Tensor, p: float = 2.4) -> torch.Tensor:
    """mean |x − x_q|^p over the last dim."""
    return (x - x_q).abs().pow(p).mean(dim=-1)


def choose_qparams(x: torch.Tensor, scheme: QScheme, n_candidates: int = 80, p: float = 2.4,
                   max_elements: int = 2 ** 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ and z for ``x`` under ``scheme``, shaped to broadcast against x ([C,1,1,1] per channel, scalars per tensor).

    MSE search: candidates i = 0..n−1 shrink the range to (1 − 0.01 i)·[min, max]; each row keeps the candidate
    with the lowest mean |x − x_q|^p (Q-Diffusion's L2.4 search). Vectorised over rows; the candidates run one at a
    time through one preallocated buffer of at most ``max_elements`` values (column blocks beyond that), in place:
    a fresh [K, C, N] temporary per chunk made the allocator map and unmap hundreds of MB per candidate, and on a
    400 M-parameter UNet two thirds of the search went to the kernel (issue 15: 38 s → a few s on its largest conv).
    """
    x = x.detach()
    rows, shape = _channel_view(x.float(), scheme.granularity)  # [C, N]
    lo, hi = rows.min(dim=1).values, rows.max(dim=1).values     # [C]
    if scheme.search is ScaleSearch.MAX:
        scale, zp = qparams_from_range(lo, hi, scheme)
        return scale.reshape(shape), zp.reshape(shape)
    n_rows, n_cols = rows.shape
    block = max(1, min(n_cols, max_elements // max(n_rows, 1)))
    f = 1.0 - 0.01 * torch.arange(n_candidates, dtype=rows.dtype, device=rows.device)[:, None]   # [K, 1]
    scales, zps = qparams_from_range(lo[None] * f, hi[None] * f, scheme)                        # [K, C]
    err = torch.zeros(n_candidates, n_rows, dtype=rows.dtype, device=rows.device)
    buf = torch.empty(n_rows, block, dtype=rows.dtype, device=rows.device)
    for start in range(0, n_cols, block):
        part = rows[:, start:start + block]
        b = buf[:, :part.shape[1]]
        for k in range(n_candidates):
            scale, zp = scales[k][:, None], zps[k][:, None]
            torch.div(part, scale, out=b)
            b.round_().add_(zp).clamp_(scheme.qmin, scheme.qmax).sub_(zp).mul_(scale)   # dequantize(quantize(x))
            b.sub_(part).abs_().pow_(p)
            err[k] += b.sum(dim=1)
    k = (err / n_cols).argmin(dim=0)                                                   # first minimum, as before
    return scales.gather(0, k[None])[0].reshape(shape), zps.gather(0, k[None])[0].reshape(shape)


# ---- AdaRound (Nagel et al. 2020) -----------------------------------------------------------------------------


def adaround_h(alpha: torch.Tensor) -> torch.Tensor:
    """Rectified sigmoid h(α) = clamp(σ(α)(ζ − γ) + γ, 0, 1) (Eq. 23)."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def adaround_init_alpha(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """α with h(α) = r, the fractional part of W/Δ, so that training starts from the unrounded weight."""
    r = w / scale - torch.floor(w / scale)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1)


def adaround_fake_quant(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, alpha: torch.Tensor,
                        qmin: int, qmax: int, hard: bool) -> torch.Tensor:
    """W_q = (clamp(floor(W/Δ) + h + z) − z)·Δ with h = h(α) (soft) or [α ≥ 0] (hard, after optimisation)."""
    if hard:
        return rounded_fake_quant(w, scale, zero_point, alpha >= 0, qmin, qmax)
    return soft_rounded_fake_quant(torch.floor(w / scale), adaround_h(alpha), scale, zero_point, qmin, qmax)


def soft_rounded_fake_quant(w_floor: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                            qmin: int, qmax: int) -> torch.Tensor:
    """AdaRound's soft weight from its parts: (clamp(⌊W/Δ⌋ + h + z) − z)·Δ. While α is learned W and Δ stay fixed,
    so ⌊W/Δ⌋ is computed once per unit and h(α) once per iteration (the regulariser reads the same h): the same
    values as ``adaround_fake_quant``, fewer kernels per iteration."""
    q = torch.clamp(w_floor + h + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def rounded_fake_quant(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, round_up: torch.Tensor,
                       qmin: int, qmax: int) -> torch.Tensor:
    """The hardened AdaRound weight from its round-up mask (bool): W_q = (clamp(floor(W/Δ) + [up] + z) − z)·Δ."""
    q = torch.clamp(torch.floor(w / scale) + round_up.to(w.dtype) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def round_reg(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ (1 − |2h(α) − 1|^β): pushes every h to 0 or 1 as β anneals (Eq. 24)."""
    return rounding_reg(adaround_h(alpha), beta)


def rounding_reg(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``round_reg`` from h = h(α) itself (computed once per iteration, shared with the soft weight)."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


@dataclass(frozen=True)
class TempDecay:
    """β of the rounding regulariser: off for the first ``warmup`` fraction, then linear from ``start`` to ``end``."""

    iters: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    def __call__(self, k: int) -> float | None:
        """β at iteration k, or None while the regulariser is off (warm-up)."""
        w = self.warmup * self.iters
        if k < w:
            return None
        return self.end + (self.start - self.end) * max(0.0, 1 - (k - w) / (self.iters - w))


# ---- bit packing (exported weights, AdaRound round-up masks) -------------------------------------------------

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2^bits) -> uint8 bytes: ⌊8/bits⌋ codes per byte (bits 1, 2, 4, 8), little end first."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"packing supports 1, 2, 4 or 8 bits, got {bits}")
    per = 8 // bits
    flat = codes.flatten().to(torch.uint8)
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per)
    shifts = torch.arange(per, dtype=torch.uint8, device=flat.device) * bits
    return (flat << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    codes = (packed[:, None] >> shifts) & (2 ** bits - 1)
    return codes.flatten()[:numel].long()
