"""BRECQ reconstruction (Li et al. 2021, Eq. 7) of a QuantModel, unit by unit, as D²-DPM / Q-Diffusion run it.

Units, in module order (spec quantization.md §3.2, §4.2):
    a module of the family's ``QuantSpecials.unit_types`` holding a quantized layer -> block reconstruction, its
        forward's inputs (the LDM UNet: ResBlock (h, emb), BasicTransformerBlock (h, context), AttentionBlock h)
    any other QuantLayer  -> layer reconstruction
Layers kept at 8 bits by the policy (time_embed.0, the input and output conv) are not reconstructed, as in D²-DPM
(``skip_eight_bit``).

Each unit is trained to map inputs produced by the *quantized prefix* onto the *FP* outputs (AdaRound's asymmetric
reconstruction; ``asym``):
    min_V  E ‖f_q(x̃; W_q(V)) − f(x; W)‖_p^p (+ λ Σ (1 − |2h(V) − 1|^β) in the weight phase)
One verb, ``reconstruct_(qm, data, phase, cfg)``, two phases (``Phase``; ``ReconConfig`` holds their settings; what
each learns is its ``UnitObjective`` in ``OBJECTIVES``, around the one loop of ``optimise_unit``):
    Phase.WEIGHT      AdaRound α (Adam lr 1e-3, λ 0.01, β 20→2 after 20 % warm-up, p = 2), then hard rounding
    Phase.ACTIVATION  the activation steps Δ_a, LSQ-style (Adam lr 4e-4, cosine to 0, p = 2.4;
                      ``ReconConfig.activation_defaults``)

Caches hold the unit inputs and FP outputs for the whole calibration set (float32, float16/bfloat16, or a disk memmap
for full-size models). A ``checkpoint`` callback runs after every unit; with ``start_unit`` a killed run resumes at the
next unit and ends bit-identical to an uninterrupted one (every unit draws its mini-batches from its own seed).
"""
from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ldm.util import UserFacingError
from quant.attention import ActQuantizer
from quant.layers import QuantLayer
from quant.model import QuantModel
from quant.policy import Precision
from quant.quantizer import TempDecay, adaround_h, rounding_reg

class Phase(enum.Enum):
    WEIGHT = "weight"
    ACTIVATION = "activation"


@dataclass(frozen=True)
class Unit:
    """One reconstruction unit: a block (one of the family's unit types) or a single layer, by its name inside
    the UNet."""

    name: str
    module: nn.Module
    is_block: bool = False

    def layers(self) -> list[QuantLayer]:
        return [m for m in self.module.modules() if isinstance(m, QuantLayer)]

    def act_quantizers(self) -> list[ActQuantizer]:
        return [m for m in self.module.modules() if isinstance(m, ActQuantizer)]


def find_units(qm: QuantModel, skip_eight_bit: bool = True) -> list[Unit]:
    """Walk the UNet in module order: blocks (``qm.specials.unit_types``) with quantized layers are units, loose
    QuantLayers are units."""
    def walk(module: nn.Module, prefix: str) -> Iterator[Unit]:
        for name, child in module.named_children():
            fqn = f"{prefix}{name}"
            if qm.specials.is_unit(child):
                if any(isinstance(m, QuantLayer) for m in child.modules()):
                    yield Unit(fqn, child, is_block=True)
            elif isinstance(child, QuantLayer):
                if not (skip_eight_bit and child.precision is Precision.EIGHT_BIT):
                    yield Unit(fqn, child)
            else:
                yield from walk(child, fqn + ".")

    return list(walk(qm.model, ""))


# ---- caches ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """Where unit inputs/outputs live: in memory at ``dtype`` (float16 halves the footprint of full-size UNets), or
    in memmap files under ``directory`` (rows are read back per mini-batch)."""

    dtype: torch.dtype = torch.float32
    directory: str | None = None


class RowCache:
    """N rows of one tensor-valued quantity, filled batch by batch, read back by row index."""

    def __init__(self, n: int, spec: CacheSpec):
        self.n, self.spec, self.filled = n, spec, 0
        self.data: torch.Tensor | np.memmap | None = None
        self.shape: tuple[int, ...] | None = None
        self._file = None
        self._stage: torch.Tensor | None = None     # pinned staging rows for asynchronous copies to a GPU
        self._staged: torch.cuda.Event | None = None

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.detach()
        if self.data is None:
            self.shape = tuple(rows.shape[1:])
            if self.spec.directory is None:
                self.data = torch.empty((self.n, *self.shape), dtype=self.spec.dtype)
            else:
                np_dtype = np.float16 if self.spec.dtype == torch.float16 else np.float32
                self._file = tempfile.NamedTemporaryFile(dir=self.spec.directory, suffix=".cache")
                self.data = np.memmap(self._file.name, dtype=np_dtype, mode="w+", shape=(self.n, *self.shape))
        k = rows.shape[0]
        if isinstance(self.data, torch.Tensor):
            self.data[self.filled:self.filled + k] = rows.to(self.spec.dtype).cpu()  # (cast first: fewer bytes)
        else:
            self.data[self.filled:self.filled + k] = rows.to("cpu", torch.float32).numpy()
        self.filled += k

    @property
    def nbytes(self) -> int:
        """Bytes this cache holds (in memory, or in its memmap file)."""
        if self.data is None:
            return 0
        if isinstance(self.data, np.memmap):
            return int(self.data.nbytes)
        return self.data.numel() * self.data.element_size()

    def rows(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor) and device.type == "cuda":
            return self._rows_to_gpu(idx, device)
        if isinstance(self.data, torch.Tensor):
            out = self.data[idx]
        else:
            out = torch.from_numpy(np.asarray(self.data[np.sort(idx.numpy())]))
            # memmap reads are fastest in order; restore the requested order
            out = out[torch.as_tensor(np.argsort(np.argsort(idx.numpy())))]
        return out.to(device, torch.float32)

    def _rows_to_gpu(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Gather into a pinned staging buffer, copy without blocking, widen to float32 on the GPU (a float16 cache
        sends half the bytes). The buffer is reused once the previous copy out of it has finished."""
        k = len(idx)
        if self._stage is None or self._stage.shape[0] < k:
            self._stage = torch.empty((k, *self.shape), dtype=self.data.dtype, pin_memory=True)
        elif self._staged is not None:
            self._staged.synchronize()
        stage = self._stage[:k]
        torch.index_select(self.data, 0, idx, out=stage)
        out = stage.to(device, non_blocking=True)
        self._staged = torch.cuda.Event()
        self._staged.record()
        return out.float()


class _Stop(Exception):
    """Raised from a hook once the unit has been reached: the rest of the UNet is not run."""


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> list:
    """The unit's forward arguments in signature order: (x, emb) for ResBlock, (x, context) for transformers."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


Captures = tuple[list[RowCache | None] | None, RowCache | None]   # one unit's input caches and output cache


@torch.no_grad()
def capture_unit_io(qm: QuantModel, unit: Unit, data: "CalibrationData", batch_size: int, spec: CacheSpec,
                    quantized: bool, act: bool, want_output: bool, want_inputs: bool = True) -> Captures:
    """Run the UNet over the calibration set up to ``unit`` and cache its inputs (and its output if asked).

    ``quantized``: the prefix runs with weight quantization on (and activation quantization if ``act``); otherwise
    the whole model is FP. Returns one RowCache per forward argument (None where the argument is None) and the
    output cache.
    """
    return capture_units_io(qm, [unit], data, batch_size, spec, quantized, act, want_output, want_inputs)[0]


@torch.no_grad()
def capture_units_io(qm: QuantModel, units: Sequence[Unit], data: "CalibrationData", batch_size: int,
                     spec: CacheSpec, quantized: bool, act: bool, want_output: bool, want_inputs: bool = True
                     ) -> list[Captures]:
    """``capture_unit_io`` for several units in one pass over the calibration set: each batch runs until every
    unit has been captured (a unit's first call in a forward; the rest of the UNet is not run)."""
    if not units:
        return []
    caps: list[list] = [[None, RowCache(len(data), spec) if want_output else None] for _ in units]
    pending: set[int] = set()

    def done(k: int) -> None:
        pending.discard(k)
        if not pending:
            raise _Stop

    def pre_hook(k: int, module, args, kwargs):
        if not want_inputs or k not in pending:
            return
        values = _bind(module, args, kwargs)
        if caps[k][0] is None:
            caps[k][0] = [None if v is None else RowCache(len(data), spec) for v in values]
        for cache, v in zip(caps[k][0], values, strict=True):
            if cache is not None:
                cache.append(v)
        if not want_output:
            done(k)

    def post_hook(k: int, module, args, kwargs, out):
        if k in pending:
            caps[k][1].append(out)
            done(k)

    handles = []
    for k, unit in enumerate(units):
        handles.append(unit.module.register_forward_pre_hook(functools.partial(pre_hook, k), with_kwargs=True))
        if want_output:
            handles.append(unit.module.register_forward_hook(functools.partial(post_hook, k), with_kwargs=True))
    try:
        with qm.quant_state_as(weight=quantized, act=quantized and act):
            for x, t, c in data.batches(batch_size):
                pending.update(range(len(units)))
                try:
                    qm(x, t, context=c)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return [(inputs, output) for inputs, output in caps]


@torch.no_grad()
def capture_row_bytes(qm: QuantModel, units: Sequence[Unit], data: "CalibrationData", spec: CacheSpec,
                      want_inputs: bool) -> list[int]:
    """Bytes one calibration row takes in each unit's FP captures (its output, and its inputs if wanted) at the
    caches' dtype, from a one-row FP pass."""
    caps = capture_units_io(qm, units, data.rows(slice(0, 1)), 1, CacheSpec(spec.dtype), False, False,
                            want_output=True, want_inputs=want_inputs)
    return [sum(c.nbytes for c in [*(inputs or []), output] if c is not None) for inputs, output in caps]


@dataclass(frozen=True)
class CalibrationData:
    """The calibration set (x_t, t, c) on a device, iterated in fixed-size batches (no shuffling: caches are
    indexed by row)."""

    x: torch.Tensor
    t: torch.Tensor
    c: torch.Tensor | None
    device: torch.device

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(self, batch_size: int) -> Iterator[tuple]:
        for s in range(0, len(self), batch_size):
            c = None if self.c is None else self.c[s:s + batch_size].to(self.device)
            yield self.x[s:s + batch_size].to(self.device), self.t[s:s + batch_size].to(self.device), c

    def subset(self, n: int) -> "CalibrationData":
        return self.rows(slice(0, n))

    def rows(self, index) -> "CalibrationData":
        """The rows ``index`` (a slice or an index tensor) as a CalibrationData on the same device."""
        return CalibrationData(self.x[index], self.t[index], None if self.c is None else self.c[index], self.device)


# ---- the optimisation of one unit ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconConfig:
    """One phase's settings. Defaults: D²-DPM's weight phase (10k iterations, batch 8, λ 0.01, β 20→2, warm-up
    0.2, Adam 1e-3, p = 2, asym) — see ``activation_defaults`` for the other phase."""

    iters: int = 10_000
    batch_size: int = 8
    lr: float = 1e-3
    p: float = 2.0
    asym: bool = True             # inputs from the quantized prefix, FP targets
    round_weight: float = 0.01    # λ (weight phase)
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    cache_batch_size: int = 128   # forward batch used to fill the caches
    cache: CacheSpec = CacheSpec()
    seed: int = 0
    # mini-batches of 8-16 rows are too small to split over CPU threads; one thread is faster, and far faster on a
    # loaded machine (None: leave torch's setting)
    cpu_threads: int | None = 1
    # a unit whose backward would keep at most this many bytes of forward activations keeps them instead of
    # recomputing them (the family's gradient checkpointing, ``QuantSpecials.keep_activations``): the same numbers,
    # ~30 % less time per transformer-block iteration; above it it recomputes (SD v1's 64×64 blocks: 671 MiB a row;
    # the steps' --keep_activations_mb)
    recompute_above: int = 2 * 2**30
    # the FP pass that fills a unit's targets also fills those of the units after it while their caches fit this
    # many bytes (the FP model does not change as units are reconstructed): fewer passes, the same caches
    fp_capture_bytes: int = 2**30

    @classmethod
    def activation_defaults(cls, **kw) -> "ReconConfig":
        """D²-DPM's activation phase: 5k iterations, batch 16, Adam 4e-4 with cosine decay, p = 2.4, FP inputs."""
        base = dict(iters=5_000, batch_size=16, lr=4e-4, p=2.4, asym=False)
        return cls(**{**base, **kw})


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """Σ over the channel dim of |pred − target|^p, averaged over everything else (BRECQ's rec loss). p = 2 skips the
    |·|: the same values and gradients (d² = |d|², 2d = 2|d|·sgn d exactly), three kernels fewer per iteration."""
    d = pred - target
    return (d.pow(2) if p == 2 else d.abs().pow(p)).sum(1).mean()


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _soft_rounding(layers: Sequence[QuantLayer]) -> Iterator[list[torch.Tensor]]:
    """h(α) of every layer, computed once for one AdaRound iteration (before the forward, so a checkpointed block's
    recomputation sees the same tensor) and shared by the soft weights and the regulariser; released after (the
    optimiser step changes α)."""
    h = [adaround_h(layer.alpha) for layer in layers]
    for layer, h_l in zip(layers, h, strict=True):
        layer.soft_h = h_l
    try:
        yield h
    finally:
        for layer in layers:
            layer.soft_h = None


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for the backward while ``fn`` runs (each storage once): what a
    backward keeps alive between the forward and itself."""
    storages: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[(t.device, st.data_ptr())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@contextlib.contextmanager
def recompute_as_fits(unit: Unit, keep_activations, inputs: Sequence[RowCache | None], cfg: ReconConfig,
                      device: torch.device) -> Iterator[bool | None]:
    """Inside, ``unit`` keeps its forward activations for the backward (no recomputation) when they fit
    ``cfg.recompute_above`` at the phase's batch size, measured on a one-row forward scaled by the batch (the saved
    activations grow with it). Yields whether the unit recomputes: True (too large), False (kept), None (the family
    has no recomputation to switch, or this unit recomputed nothing)."""
    if keep_activations is None:
        yield None
        return
    with contextlib.ExitStack() as stack:
        if not stack.enter_context(keep_activations(unit.module)):
            yield None
            return
        args = [None if c is None else c.rows(torch.arange(1), device) for c in inputs]
        args = [a.requires_grad_(True) if a is not None and a.is_floating_point() else a for a in args]
        with torch.enable_grad():
            one_row = saved_tensor_bytes(lambda: unit.module(*args))
        del args
        if one_row * cfg.batch_size <= cfg.recompute_above:
            yield False
            return
    yield True   # (the family's flags as they were: it recomputes)


def _unit_generator(seed: int, index: int) -> torch.Generator:
    # one stream per unit: a resumed run draws exactly the mini-batches an uninterrupted run would
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


class UnitObjective:
    """What one phase learns on a unit, as explicit verbs around the shared loop of ``optimise_unit``: ``begin``
    (switch the unit's quantizers to their learnable form; returns the parameters), ``iteration(k)`` (a context
    around one forward/backward that yields the loss from the reconstruction term), ``scheduler``, ``after_step``
    (a projection after each optimiser step) and ``finish`` (what stays when the unit is done). A new phase (another
    rounding or range learner) is one subclass and one ``OBJECTIVES`` entry; ``optimise_unit`` does not change."""

    def __init__(self, unit: Unit, cfg: "ReconConfig"):
        self.unit, self.cfg = unit, cfg

    def begin(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @contextlib.contextmanager
    def iteration(self, k: int) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        yield lambda rec: rec

    def scheduler(self, optimiser: torch.optim.Optimizer):
        return None

    def after_step(self) -> None:
        pass

    def finish(self) -> None:
        pass


class AdaRoundObjective(UnitObjective):
    """Phase.WEIGHT: AdaRound's α of every layer of the unit (Nagel et al. 2020, Eq. 21-25): h(α) starts at the
    fractional part of W/Δ, the loss adds λ Σ (1 − |2h(α) − 1|^β) once the warm-up is over (β decays 20 → 2), and
    the unit ends hard-rounded (the round-up masks [α ≥ 0])."""

    def begin(self) -> list[torch.Tensor]:
        self.layers = self.unit.layers()
        for layer in self.layers:
            layer.init_adaround_()
        self.decay = TempDecay(self.cfg.iters, self.cfg.warmup, *self.cfg.beta)
        return [layer.alpha for layer in self.layers]

    @contextlib.contextmanager
    def iteration(self, k: int) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        with _soft_rounding(self.layers) as h:
            beta = self.decay(k)

            def total(rec: torch.Tensor) -> torch.Tensor:
                if beta is None:
                    return rec
                return rec + self.cfg.round_weight * sum(rounding_reg(h_l, beta) for h_l in h)
            yield total

    def finish(self) -> None:
        for layer in self.layers:
            layer.harden_()


class StepSizeObjective(UnitObjective):
    """Phase.ACTIVATION: the activation step sizes Δ_a of the unit's quantized layer inputs and attention
    quantizers, LSQ-style (Esser et al. 2020), with a cosine learning-rate decay to 0; a step size stays positive.
    A 16-bit softmax quantizer stays fixed (Q-Diffusion)."""

    def begin(self) -> list[torch.Tensor]:
        self.params = ([layer.a_scale for layer in self.unit.layers() if layer.act_quant] +
                       [q.a_scale for q in self.unit.act_quantizers() if q.enabled and q.learnable])
        return self.params

    def scheduler(self, optimiser: torch.optim.Optimizer):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=self.cfg.iters, eta_min=0.)

    @torch.no_grad()
    def after_step(self) -> None:
        for q in self.params:
            q.clamp_(min=1e-8)


OBJECTIVES: dict[Phase, type[UnitObjective]] = {Phase.WEIGHT: AdaRoundObjective,
                                                Phase.ACTIVATION: StepSizeObjective}


def optimise_unit(unit: Unit, phase: Phase, inputs: Sequence[RowCache | None], target: RowCache,
                  cfg: ReconConfig, index: int, device: torch.device, progress: bool = True) -> dict[str, float]:
    """Run the phase's optimisation (``OBJECTIVES[phase]``) on one unit (quantization already switched on): Adam on
    the objective's parameters over random mini-batches of the caches, loss ‖f_q − f‖_p^p plus the objective's
    terms. Returns loss summaries."""
    objective = OBJECTIVES[phase](unit, cfg)
    params = objective.begin()
    if not params:  # a weightless / unquantized unit (Q-Diffusion issue #26): nothing to learn
        return {}
    gen = _unit_generator(cfg.seed, index)
    for q in params:
        q.requires_grad_(True)
    # one fused kernel per parameter a step instead of a chain of elementwise ops (issue 29; equal to the loop's
    # update up to the last bit)
    optimiser = torch.optim.Adam(params, lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    scheduler = objective.scheduler(optimiser)
    n = target.n
    first = last = float("nan")
    bar = tqdm(range(cfg.iters), desc=f"{phase.value} {unit.name}", leave=False, disable=not progress)
    try:
        for k in bar:
            idx = torch.randperm(n, generator=gen)[:cfg.batch_size]
            args = [None if cache is None else cache.rows(idx, device) for cache in inputs]
            with torch.enable_grad(), objective.iteration(k) as total:
                rec = lp_loss(unit.module(*args), target.rows(idx, device), cfg.p)
                loss = total(rec)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
            optimiser.step()
            if scheduler is not None:
                scheduler.step()
            objective.after_step()
            last = rec.detach()   # (read back only when shown: .item() every iteration stalls a GPU)
            if k == 0:
                first = last.item()
            if k % 100 == 0 and progress:
                bar.set_postfix(rec=f"{last.item():.4g}")
    finally:
        for q in params:
            q.requires_grad_(False)
    objective.finish()
    return {"rec_first": first, "rec_last": float(last)}


# ---- the verbs ------------------------------------------------------------------------------------------------


def unit_kind(unit: Unit) -> str:
    """The unit's kind for timing tables: its block class, or "layer"."""
    return type(unit.module).__name__ if unit.is_block else "layer"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reconstruct_(qm: QuantModel, data: CalibrationData, phase: Phase, cfg: ReconConfig, *,
                 start_unit: int = 0, checkpoint: Callable[[int, list[dict]], None] | None = None,
                 skip_eight_bit: bool = True, progress: bool = True, timings: list | None = None) -> list[dict]:
    """Reconstruct every unit from ``start_unit`` on, in order. After unit i, ``checkpoint(i + 1, summaries)`` runs
    with the summaries of the units done so far in this call (save the quantized state there; resume with
    ``start_unit = i + 1`` after loading it). ``timings``, if given,
    receives one record per unit: name, kind, rows, iters, capture_s (the cache passes), optimise_s and cache_bytes
    (what a full-size run needs to project; kept out of the summaries so artifacts stay byte-identical).

    Weight phase: weights quantized, activations FP. Activation phase: weights (hard-rounded) and activations
    quantized, only the activation steps learned. Everything runs in eval mode (no dropout) on the model's device.
    """
    units = find_units(qm, skip_eight_bit)
    if not 0 <= start_unit <= len(units):
        raise ValueError(f"start_unit {start_unit} is outside 0..{len(units)}")
    device = next(qm.parameters()).device
    act = phase is Phase.ACTIVATION
    if act and not all(m.a_ready for m in qm.model.modules() if isinstance(m, QuantLayer) and m.a_scheme is not None):
        raise RuntimeError("activation ranges must be calibrated (calibrate_activations_) before their "
                           "reconstruction")
    was_training = qm.training
    qm.eval()
    for p in qm.model.parameters():
        p.requires_grad_(False)  # only α or Δ_a are optimised
    summaries = []
    row_bytes = capture_row_bytes(qm, units, data, cfg.cache, want_inputs=not cfg.asym)
    # the phase's quantization, set once: every cache pass below restores it when done
    qm.set_quant_state(weight=True, act=act)
    fp: dict[int, Captures] = {}

    def fp_pass(i: int) -> dict[int, Captures]:
        j, total = i + 1, row_bytes[i]
        while j < len(units) and (total + row_bytes[j]) * len(data) <= cfg.fp_capture_bytes:
            total, j = total + row_bytes[j], j + 1
        caps = capture_units_io(qm, units[i:j], data, cfg.cache_batch_size, cfg.cache, quantized=False, act=False,
                                want_output=True, want_inputs=not cfg.asym)
        return dict(zip(range(i, j), caps, strict=True))

    try:
        outer = tqdm(range(start_unit, len(units)), desc=f"{phase.value} reconstruction", disable=not progress)
        for i in outer:
            unit = units[i]
            outer.set_postfix(unit=unit.name)
            _sync(device)
            t0 = time.perf_counter()
            # FP pass: targets (and the inputs too, unless they must come from the quantized prefix), for this unit
            # and the next ones while they fit
            if i not in fp:
                fp = fp_pass(i)
            inputs, target = fp.pop(i)
            if cfg.asym:
                inputs, _ = capture_unit_io(qm, unit, data, cfg.cache_batch_size, cfg.cache, quantized=True,
                                            act=act, want_output=False)
            _sync(device)
            t1 = time.perf_counter()
            with _threads(cfg.cpu_threads if device.type == "cpu" else None), \
                    recompute_as_fits(unit, qm.specials.keep_activations, inputs, cfg, device) as recompute:
                summary = {"unit": unit.name, **optimise_unit(unit, phase, inputs, target, cfg, i, device, progress)}
            _sync(device)
            if timings is not None:
                timings.append({"unit": unit.name, "kind": unit_kind(unit), "rows": len(data), "iters": cfg.iters,
                                "capture_s": t1 - t0, "optimise_s": time.perf_counter() - t1,
                                "cache_bytes": sum(c.nbytes for c in [*inputs, target] if c is not None),
                                "recompute": recompute})
            summaries.append(summary)
            if checkpoint is not None:
                checkpoint(i + 1, summaries)
    finally:
        qm.train(was_training)
    return summaries


@torch.no_grad()
def sqnr_db(qm: QuantModel, data: CalibrationData, batch_size: int = 64, weight: bool = True,
            act: bool = False) -> float:
    """10 log10(‖ε_fp‖² / ‖ε_q − ε_fp‖²) of the UNet output over ``data`` (signal-to-quantization-noise ratio)."""
    state = qm.quant_state()
    signal = noise = 0.0
    try:
        for x, t, c in data.batches(batch_size):
            qm.set_quant_state(weight=False, act=False)
            ref = qm(x, t, context=c).double()
            qm.set_quant_state(weight=weight, act=act)
            out = qm(x, t, context=c).double()
            signal += float(ref.pow(2).sum())
            noise += float((out - ref).pow(2).sum())
    finally:
        qm.set_quant_state(**state)
    if not signal > 0:  # (0, or nan from a diverged model): no ratio to take
        raise UserFacingError(f"the FP UNet's output is {'identically zero' if signal == 0 else 'not finite'} on "
                              f"these {len(data)} inputs, so no SQNR exists; is the checkpoint trained (CompVis "
                              f"initialises the output convs to zero)?")
    return 10 * math.log10(signal / max(noise, 1e-30))
