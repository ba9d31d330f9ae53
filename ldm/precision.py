"""The arithmetic a sampling run's UNet and first-stage decoder use: exact FP32 (the default, as every fixture and
every artifact), TF32 matmuls and convolutions on CUDA, or bfloat16 autocast.

Only the model calls change: ``Precision.wrap`` runs a denoiser ``(x, t, c) -> ε`` under ``Precision.scope`` and casts
its output back to float32, so classifier-free guidance, the corrections and the DDIM update stay float32 (the
sampler's ᾱ arithmetic is where a low-precision rounding would compound over the steps). Calibration and the noise
statistics never take a mode: their targets are the FP32 model's ε, and the quantization noise they measure is of
the same order as TF32's and bf16's rounding. ``FP32`` is the identity (no wrapper, no context), so it is
byte-identical to a run without the flag.
"""
from __future__ import annotations

import contextlib
import enum
from typing import Callable, Iterator, TypeVar

import torch

from ldm.util import UserFacingError

F = TypeVar("F", bound=Callable[..., torch.Tensor])


class Precision(enum.Enum):
    FP32 = "fp32"   # IEEE float32 everywhere (exact: TF32 off on CUDA, pipeline.cli.exact_cuda_numerics)
    TF32 = "tf32"   # CUDA only: float32 tensors, 10-bit-mantissa products in matmuls and convolutions
    BF16 = "bf16"   # torch.autocast(bfloat16): convolutions and matmuls in bfloat16 (CPU and CUDA)

    @classmethod
    def parse(cls, text: str) -> "Precision":
        """The one parser of the flag's value (argparse ``type=``); an unknown name is one line naming the valid
        ones."""
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            raise ValueError(f"unknown precision '{text}'; choose one of {', '.join(p.value for p in cls)}") from None

    @property
    def suffix(self) -> str:
        """What a run folder or file name adds: nothing for FP32 (existing runs keep their names), '-bf16' else."""
        return "" if self is Precision.FP32 else f"-{self.value}"

    def check_device(self, device: torch.device | str) -> None:
        """TF32 is a CUDA (cuBLAS / cuDNN) mode: on any other device it would silently be FP32, so it is refused."""
        kind = torch.device(device).type
        if self is Precision.TF32 and kind != "cuda":
            raise UserFacingError(f"--precision tf32 is a CUDA mode (TF32 tensor-core matmuls and convolutions); on "
                                  f"{kind} use --precision fp32 (exact) or bf16")

    @contextlib.contextmanager
    def scope(self, device_type: str) -> Iterator[None]:
        """The mode around model calls on ``device_type``; TF32's global switches are restored on exit, so code
        after the scope (and calibration in the same process) sees exact FP32 again."""
        if self is Precision.FP32:
            yield
        elif self is Precision.TF32:
            self.check_device(device_type)
            matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            try:
                yield
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        else:
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                yield

    def wrap(self, fn: F, device_type: str) -> F:
        """``fn`` run under ``scope`` with a float32 result (the sampler's update stays float32); ``fn`` itself for
        FP32."""
        if self is Precision.FP32:
            return fn

        def wrapped(*args, **kwargs) -> torch.Tensor:
            with self.scope(device_type):
                out = fn(*args, **kwargs)
            return out.float()

        return wrapped  # type: ignore[return-value]
