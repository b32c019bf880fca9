"""Compiled one-pass CPU kernels for the neurons the fused executor evaluates most (kernels.cpp).

The multi-range quantizer and the table-neuron lookup are chains of ten to thirty PyTorch
element-wise ops; on the CPU each op streams the whole tensor through memory, so the chain
costs more than the matmuls around it. kernels.cpp runs each chain as one loop. The PyTorch
chains in snncc.ir.ops stay the definition: the kernels equal them bit for bit (tested) and
they remain the path on CUDA, for float64, and wherever the kernels cannot be built.

Built on first use by torch.utils.cpp_extension (a C++ compiler and ninja, the `kernels`
extra: about a minute once, then cached by torch; torch runs ninja on every load, so without
it even a cached build is not used). SNNCC_KERNELS=0 switches them off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

from snncc.errors import first_line

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("kernels.cpp")
# Named after the source's digest: torch caches builds by name in one folder per user, so two
# checkouts with different kernels.cpp would otherwise rebuild over each other and a process
# could load the other's build.
_NAME = "snncc_kernels_" + hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]


@functools.cache
def _compiled() -> ModuleType | None:
    if os.environ.get("SNNCC_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        if not _built():
            log.warning("building snncc's C++ kernels: about a minute, once (torch caches the build)")
        # No FMA contraction (it rounds differently from torch's separate ops); no trapping
        # math, so the branch-free loops vectorize (results are the same, only FP flags differ).
        return load(name=_NAME, sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"],
                    extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no ninja, a failed build: the PyTorch path stays
        log.warning("snncc's C++ kernels could not be built (%s); the fused executor takes its slower "
                    "PyTorch path (a C++ compiler and ninja build them: pip install 'snncc[kernels]')",
                    first_line(exc))
        return None


def _built() -> bool:
    """Whether torch's extension cache holds a build (a private torch helper: if it moves,
    assume built and say nothing)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(_NAME, verbose=False)).glob(f"{_NAME}*.so"))
    except Exception:
        return True


def kernels_for(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> ModuleType | None:
    """The compiled kernels where they apply to x (a CPU tensor of `dtype`), else None; None
    under torch.compile, which traces the PyTorch chains instead (and fuses them itself)."""
    if x.device.type != "cpu" or x.dtype != dtype or torch.compiler.is_compiling():
        return None
    return _compiled()
