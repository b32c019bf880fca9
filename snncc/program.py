"""SpikingProgram: a compiled graph plus what it needs to be run, profiled, saved and shared."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from snncc.backends import create_executor
from snncc.errors import InputError
from snncc.ir.verify import format_coverage
from snncc.models import CAUSAL_LM
from snncc.profile import Profile, profile_graph
from snncc.progress import bar, enabled
from snncc.tokenizer import Tokenizer, as_tokenizer

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
    generation: dict = field(default_factory=dict)  # the model's end-of-sequence and padding ids (generate)


class SpikingProgram(torch.nn.Module):
    """A compiled spiking program, used as a PyTorch module: call it with token ids (batch,
    tokens) for outputs in the ANN's units (logits, or an encoder's hidden states);
    `parameters()`, `state_dict()`, `.to(device)` and `.device` work as for any module.
    `generate` is transformers' greedy `generate`; `generate_text` continues a string."""

    def __init__(self, graph_module: fx.GraphModule, info: ProgramInfo, tokenizer: Tokenizer,
                 device: str | torch.device = "cpu", mode: str = "fused", backend: str = "reference",
                 progress: bool | None = None, device_map: str | Mapping | None = None,
                 max_memory: Mapping | None = None,
                 offload_folder: str | Path | None = None):
        super().__init__()
        self.graph_module = graph_module  # a submodule: its weights are the program's parameters and buffers
        self.info = info
        self.tokenizer = as_tokenizer(tokenizer)
        self.backend = backend
        self._run_on(create_executor(graph_module, backend, device, mode, progress, device_map, max_memory,
                                     offload_folder))
        # What the remaining passes need (snncc.resume), where a compile stopped part-way.
        self.resume: ResumeState | None = None
        self.eval()  # a program only infers

    def _run_on(self, executor) -> None:
        """Run on `executor`; static caches (compiled generation on CUDA) never outgrow the
        model's positions (a learned position table has no rows past them)."""
        if hasattr(executor, "max_cache_length"):
            executor.max_cache_length = self.info.max_positions
        self.executor = executor

    @property
    def T(self) -> int:
        return self.info.T

    @property
    def device(self) -> torch.device:
        """Where it runs (a placed program: where its outputs come out)."""
        return self.executor.device

    def __repr__(self) -> str:
        info, executor = self.info, self.executor
        placement = "placed by a device map" if getattr(executor, "device_map", None) is not None \
            else f"device={self.device}"
        compiled = ", compiled" if getattr(executor, "compiled", False) else ""
        stopped = f"\n  stopped part-way: to run {', '.join(info.remaining)}," if info.remaining else ""
        return (f"SpikingProgram(\n  model={info.model!r}, task={info.task!r},\n  pipeline={info.pipeline!r}, "
                f"T={info.T},{stopped}\n  coverage={format_coverage(info.coverage)} of matmul MACs spike-driven,\n"
                f"  weights={info.dtype}, {placement}, backend={self.backend} ({executor.mode}{compiled})\n)")

    def to(self, device: str | torch.device) -> SpikingProgram:
        """Run on `device`, all of the program there (a device map it was placed by is dropped;
        a compiled program stays compiled). Its weights keep their dtype: `.to(dtype)` is refused."""
        if isinstance(device, torch.dtype):
            raise InputError("a program keeps the weight dtype it was compiled with: compile with dtype=... instead")
        self._run_on(create_executor(self.graph_module, self.backend, device, self.executor.mode,
                                     compiled=getattr(self.executor, "compiled", False)))
        return self

    def cpu(self) -> SpikingProgram:
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> SpikingProgram:
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def compile(self) -> SpikingProgram:
        """Run through torch.compile from now on (reference backend, one device): the same
        outputs bit for bit, faster, the first call of a forward and of generation slower
        (they compile; minutes on a large model, cached on disk by torch for later runs)."""
        executor = self.executor
        if getattr(executor, "device_map", None) is not None:
            raise InputError("this program is placed by a device map; torch.compile runs it on one device: "
                             "call .to(device) first")
        self._run_on(create_executor(self.graph_module, self.backend, executor.device, executor.mode,
                                     compiled=True))
        return self

    def place(self, device_map: str | Mapping, max_memory: Mapping | None = None,
              offload_folder: str | Path | None = None) -> SpikingProgram:
        """Run with its stages where accelerate's `device_map` puts them ("auto", "balanced",
        "balanced_low_0", "sequential" or {"stages.N": device}; snncc.backends.placed)."""
        self._run_on(create_executor(self.graph_module, self.backend, "cpu", self.executor.mode,
                                     device_map=device_map, max_memory=max_memory, offload_folder=offload_folder))
        return self

    def check_input(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Refuse inputs the program cannot run: wrong type or shape, bad ids, too long."""
        if isinstance(input_ids, str):
            raise InputError("input_ids must be token ids, not text: encode it with the program's tokenizer, "
                             "or use generate_text for a string")
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must be integer token ids, got a {input_ids.dtype} tensor")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.info.max_positions:
            raise InputError(f"the input is {input_ids.shape[1]} tokens; {self.info.model} allows at "
                             f"most {self.info.max_positions}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.info.vocab_size:
            raise InputError(f"token ids must lie in 0..{self.info.vocab_size - 1}")
        return input_ids.long().cpu()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs for every position. With an `attention_mask` (1 = token, 0 = padding, on
        either side) each row is computed as if it were alone; padded positions get zeros."""
        input_ids = self.check_input(input_ids)
        if attention_mask is None:
            return self.executor(input_ids)
        rows = unpadded_rows(input_ids, attention_mask)
        outputs = None
        for indices, start, ids in rows_by_length(rows):
            result = self.executor(ids)
            if outputs is None:
                outputs = result.new_zeros(*input_ids.shape, *result.shape[2:])
            for row, index in enumerate(indices):
                outputs[index, start[row]:start[row] + ids.shape[1]] = result[row]
        return outputs

    def profile(self, input_ids: torch.Tensor, energy: str = "45nm") -> Profile:
        """Spikes, firing rates, SOPs, MACs and energy per site for this input."""
        gm = self.executor.gm
        # A placed program's own graph stays where it was, whichever device its stages run on.
        device = next((tensor.device for tensor in gm.buffers()), self.executor.device)
        return profile_graph(gm, self.check_input(input_ids).to(device), energy, self.executor.mode)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 progress: bool | None = None, cache: bool = True) -> torch.LongTensor:
        """Greedy decoding, as transformers' `model.generate(input_ids, max_new_tokens=...)`:
        the prompt ids followed by the new ones, (batch, tokens), on the CPU. A row that emits
        an end-of-sequence id (default: the model's, from its generation config) is filled with
        `pad_token_id` from then on, and decoding stops when every row has. A padded batch
        takes an `attention_mask` with the padding on the left, as for transformers' decoder
        models; rows of different lengths decode in separate groups (the graph has no padding
        mask), each as if alone. `cache` (reference backend): each step runs only the newest
        token against cached attention keys and values; without, each step re-runs the whole
        sequence (the same tokens). `progress` None: a bar on a terminal."""
        if self.info.task != CAUSAL_LM:
            raise InputError(f"{self.info.model} is an encoder model; it cannot generate text")
        input_ids = self.check_input(input_ids)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if input_ids.shape[1] + max_new_tokens > self.info.max_positions:
            raise InputError(f"the prompt is {input_ids.shape[1]} tokens and {max_new_tokens} new tokens were "
                             f"asked for; {self.info.model} allows at most {self.info.max_positions} in all")
        eos = self._eos_ids(eos_token_id)
        pad = self._pad_id(pad_token_id, eos)
        rows = unpadded_rows(input_ids, attention_mask, left_only=True)
        progress = enabled(progress)
        new = torch.full((input_ids.shape[0], max_new_tokens), -1, dtype=torch.long)
        steps = 0
        # The generation bar covers each token's run: an executor with a bar of its own (event) keeps it quiet.
        with getattr(self.executor, "quiet", contextlib.nullcontext)():
            for indices, _, ids in rows_by_length(rows):
                tokens = self._greedy(ids, max_new_tokens, eos, pad, progress, cache)
                new[indices, :tokens.shape[1]] = tokens
                steps = max(steps, tokens.shape[1])
        new = new[:, :steps]
        return torch.cat([input_ids, new.masked_fill(new < 0, pad if pad is not None else 0)], dim=1)

    def generate_text(self, prompt: str, max_new_tokens: int = 20, progress: bool | None = None,
                      cache: bool = True) -> str:
        """The greedy continuation of `prompt` as text (without the prompt), up to
        `max_new_tokens` tokens or the model's end of sequence."""
        if not isinstance(prompt, str):
            raise InputError("generate_text continues a string; for token ids call generate")
        if self.info.task != CAUSAL_LM:
            raise InputError(f"{self.info.model} is an encoder model; it cannot generate text")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise InputError("the prompt is empty: give some text to continue")
        eos = self._eos_ids(None)
        new = self.generate(torch.tensor([ids]), max_new_tokens, progress=progress, cache=cache)[0, len(ids):]
        ended = [i for i, token in enumerate(new.tolist()) if token in eos]
        return self.tokenizer.decode(new[:ended[0] + 1 if ended else len(new)].tolist())

    def _eos_ids(self, eos_token_id: int | list[int] | None) -> list[int]:
        if eos_token_id is None:
            return list(self.info.generation.get("eos_token_id", []))
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not all(isinstance(i, int) and 0 <= i < self.info.vocab_size for i in eos):
            raise InputError(f"eos_token_id must be token ids in 0..{self.info.vocab_size - 1}, got {eos_token_id}")
        return eos

    def _pad_id(self, pad_token_id: int | None, eos: list[int]) -> int | None:
        """transformers' choice: the one given, the model's, else the first end-of-sequence id."""
        pad = pad_token_id if pad_token_id is not None else self.info.generation.get("pad_token_id")
        if pad is None and eos:
            pad = eos[0]
        if pad is not None and not (isinstance(pad, int) and 0 <= pad < self.info.vocab_size):
            raise InputError(f"pad_token_id must be a token id in 0..{self.info.vocab_size - 1}, got {pad}")
        return pad

    def _greedy(self, tokens: torch.Tensor, max_new_tokens: int, eos: list[int], pad: int | None,
                progress: bool, cache: bool) -> torch.Tensor:
        """The new token ids (batch, steps) greedy decoding appends to the unpadded rows
        `tokens`, steps <= max_new_tokens: fewer where every row ended."""
        cache = cache and hasattr(self.executor, "step")
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool)
        eos_ids = torch.tensor(eos, dtype=torch.long)
        new, past, step_input = [], None, tokens
        for _ in bar(range(max_new_tokens), "generating", progress, unit="token"):
            if cache:
                logits, past = self.executor.step(step_input, past, tokens.shape[1] - step_input.shape[1])
            else:
                logits = self.executor(tokens)
            step_input = logits[:, -1].argmax(-1, keepdim=True).cpu()
            if pad is not None:
                step_input = step_input.masked_fill(finished.unsqueeze(1), pad)
            tokens = torch.cat([tokens, step_input], dim=1)
            new.append(step_input)
            finished |= torch.isin(step_input[:, 0], eos_ids)
            if bool(finished.all()):
                break
        return torch.cat(new, dim=1)

    def save(self, path: str | Path, progress: bool | None = None) -> None:
        """Write a self-contained artifact (see snncc.artifact); `progress` None: shown on a terminal."""
        from snncc.artifact import save_program

        save_program(self, Path(path), progress)


def unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  left_only: bool = False) -> list[tuple[int, torch.Tensor]]:
    """Each row's tokens without its padding, with where they start: (start, ids) per row.
    The mask's ones must be contiguous (padding on one side); `left_only`: on the left."""
    if attention_mask is None:
        return [(0, row) for row in input_ids]
    mask = torch.as_tensor(attention_mask).cpu()
    if mask.shape != input_ids.shape:
        raise InputError(f"attention_mask has shape {tuple(mask.shape)}; input_ids {tuple(input_ids.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold 1 (a token) and 0 (padding) only")
    rows = []
    for ids, row_mask in zip(input_ids, mask.bool(), strict=True):
        kept = row_mask.nonzero().flatten()
        if len(kept) == 0:
            raise InputError("a row of attention_mask is all padding: every row needs a token")
        start, end = int(kept[0]), int(kept[-1]) + 1
        if end - start != len(kept):
            raise InputError("attention_mask has padding between tokens: pad on one side only")
        if left_only and end != len(row_mask):
            raise InputError("generate takes padding on the left (as transformers' decoder models do): "
                             "set the tokenizer's padding_side='left'")
        rows.append((start, ids[start:end]))
    return rows


def rows_by_length(rows: list[tuple[int, torch.Tensor]]) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """Rows of equal length stacked into one batch: (row indices, their starts, ids) per length."""
    groups: dict[int, list[int]] = {}
    for index, (_, ids) in enumerate(rows):
        groups.setdefault(len(ids), []).append(index)
    return [(indices, [rows[i][0] for i in indices], torch.stack([rows[i][1] for i in indices]))
            for indices in groups.values()]
