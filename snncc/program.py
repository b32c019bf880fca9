"""SpikingProgram: a compiled graph plus what it needs to be run, profiled, saved and shared."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from tqdm import tqdm

from snncc.backends import create_executor
from snncc.errors import InputError
from snncc.models import CAUSAL_LM
from snncc.profile import Profile, profile_graph
from snncc.tokenizer import Tokenizer

if TYPE_CHECKING:
    from snncc.resume import ResumeState


@dataclass
class ProgramInfo:
    """JSON-able facts about how a program was made (stored in artifacts)."""

    model: str
    task: str
    pipeline: str
    T: int
    max_positions: int
    vocab_size: int
    passes: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)
    remaining: list[str] = field(default_factory=list)  # passes still to run: a program stopped part-way
    dtype: str = "float32"  # what its synapse weights are stored in (snncc.ir.storage); it computes in float32
    precision: dict = field(default_factory=dict)  # a budgeted compile's plan and check (snncc.budget)


class SpikingProgram:
    """Call it with token ids to get outputs in the ANN's units (logits or hidden states)."""

    def __init__(self, graph_module: fx.GraphModule, info: ProgramInfo, tokenizer: Tokenizer,
                 device: str | torch.device = "cpu", mode: str = "fused", backend: str = "reference",
                 progress: bool = False, device_map: str | Mapping | None = None, max_memory: Mapping | None = None,
                 offload_folder: str | Path | None = None):
        self.graph_module = graph_module
        self.info = info
        self.tokenizer = tokenizer
        self.backend = backend
        self.executor = create_executor(graph_module, backend, device, mode, progress, device_map, max_memory,
                                        offload_folder)
        # What the remaining passes need (snncc.resume), where a compile stopped part-way.
        self.resume: ResumeState | None = None

    @property
    def T(self) -> int:
        return self.info.T

    def to(self, device: str | torch.device) -> SpikingProgram:
        """Run on `device`, all of the program there (a device map it was placed by is dropped;
        a compiled program stays compiled)."""
        self.executor = create_executor(self.graph_module, self.backend, device, self.executor.mode,
                                        compiled=getattr(self.executor, "compiled", False))
        return self

    def compile(self) -> SpikingProgram:
        """Run through torch.compile from now on (reference backend, one device): the same
        outputs bit for bit, faster, the first call of a forward and of generation slower
        (they compile; minutes on a large model, cached on disk by torch for later runs)."""
        executor = self.executor
        if getattr(executor, "device_map", None) is not None:
            raise InputError("this program is placed by a device map; torch.compile runs it on one device: "
                             "call .to(device) first")
        self.executor = create_executor(self.graph_module, self.backend, executor.device, executor.mode,
                                        compiled=True)
        return self

    def place(self, device_map: str | Mapping, max_memory: Mapping | None = None,
              offload_folder: str | Path | None = None) -> SpikingProgram:
        """Run with its stages where accelerate's `device_map` puts them ("auto", "balanced",
        "balanced_low_0", "sequential" or {"stages.N": device}; snncc.backends.placed)."""
        self.executor = create_executor(self.graph_module, self.backend, "cpu", self.executor.mode,
                                        device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
        return self

    def check_input(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Refuse inputs the program cannot run: wrong type or shape, bad ids, too long."""
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise InputError("input_ids must be integer token ids, got a floating-point tensor")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.info.max_positions:
            raise InputError(f"the input is {input_ids.shape[1]} tokens; {self.info.model} allows at "
                             f"most {self.info.max_positions}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.info.vocab_size:
            raise InputError(f"token ids must lie in 0..{self.info.vocab_size - 1}")
        return input_ids.long()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.executor(self.check_input(input_ids))

    def profile(self, input_ids: torch.Tensor, energy: str = "45nm") -> Profile:
        """Spikes, firing rates, SOPs, MACs and energy per site for this input."""
        gm = self.executor.gm
        # A placed program's own graph stays where it was, whichever device its stages run on.
        device = next((tensor.device for tensor in gm.buffers()), self.executor.device)
        return profile_graph(gm, self.check_input(input_ids).to(device), energy, self.executor.mode)

    def generate(self, prompt: str, max_new_tokens: int, progress: bool = False, cache: bool = True) -> str:
        """Greedy continuation of `prompt` (see `greedy_tokens`)."""
        if self.info.task != CAUSAL_LM:
            raise InputError(f"{self.info.model} is an encoder model; it cannot generate text")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise InputError("the prompt is empty: give some text to continue")
        new = self.greedy_tokens(torch.tensor([ids]), max_new_tokens, progress, cache)
        return self.tokenizer.decode(new[0].tolist())

    def greedy_tokens(self, input_ids: torch.Tensor, max_new_tokens: int, progress: bool = False,
                      cache: bool = True) -> torch.Tensor:
        """The `max_new_tokens` (batch, new) token ids greedy decoding appends to `input_ids`.
        With `cache` (reference backend) each step runs only the newest token against cached
        attention keys and values; without, each step re-runs the whole sequence."""
        tokens = self.check_input(input_ids)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if tokens.shape[1] + max_new_tokens > self.info.max_positions:
            raise InputError(f"the prompt is {tokens.shape[1]} tokens and {max_new_tokens} new tokens were "
                             f"asked for; {self.info.model} allows at most {self.info.max_positions} in all")
        cache = cache and hasattr(self.executor, "step")
        new, past, step_input = [], None, tokens
        for _ in tqdm(range(max_new_tokens), desc="generating", disable=not progress, leave=False):
            if cache:
                logits, past = self.executor.step(step_input, past, tokens.shape[1] - step_input.shape[1])
            else:
                logits = self.executor(tokens)
            step_input = logits[:, -1].argmax(-1, keepdim=True).cpu()
            tokens = torch.cat([tokens, step_input], dim=1)
            new.append(step_input)
        return torch.cat(new, dim=1)

    def save(self, path: str | Path) -> None:
        """Write a self-contained artifact (see snncc.artifact)."""
        from snncc.artifact import save_program

        save_program(self, Path(path))
