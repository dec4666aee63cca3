"""Which pipeline stage holds which part of the stitched model (pure, no torch).

The model is a chain of units: embedding, N lower layers, the adapter, M upper layers,
final norm + LM head + loss. A `PipelineLayout` is a contiguous split of that chain into
stages, written as text like ``"L3|L1,A,U1|U2"`` (stages separated by ``|``; ``L<k>`` k lower
layers, ``A`` the adapter, ``U<k>`` k upper layers; the embedding is implied on the first stage
and the head on the last). ``E`` and ``H`` name the embedding and the output layer (final norm +
LM / value head + loss): written alone they make a stage of their own (``E|L16|...`` or
``...|U4|H``); written beside other units of the first / last stage they change nothing.

With interleaved (virtual) pipeline stages the layout lists ``pp * vpp`` chunks in chain order;
chunk ``c`` runs on pipeline rank ``c % pp`` as its virtual stage ``c // pp`` (Megatron-Core's
``pipeline_model_parallel_layout`` convention). There a middle chunk may be empty, written
``-``: it passes the activation on (e.g. so that the rank holding the head chunk has nothing else).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

ORDER = "ELAUH"


@dataclass(frozen=True)
class Stage:
    lower_layers: int = 0
    adapter: bool = False
    upper_layers: int = 0
    embedding: bool = False  # True only for a stage holding the embedding alone ("E")
    head: bool = False  # True only for a stage holding the output layer alone ("H")

    @property
    def core_units(self) -> int:
        return self.lower_layers + int(self.adapter) + self.upper_layers

    def __str__(self) -> str:
        if self.embedding:
            return "E"
        if self.head:
            return "H"
        parts = ([f"L{self.lower_layers}"] if self.lower_layers else []) + (["A"] if self.adapter else []) \
            + ([f"U{self.upper_layers}"] if self.upper_layers else [])
        return ",".join(parts) if parts else "-"


def _stage(lower: int, adapter: bool, upper: int, emb: bool, head: bool) -> Stage:
    """A stage, the E / H flags kept only where they stand alone."""
    alone = not (lower or adapter or upper)
    return Stage(lower, adapter, upper, emb and alone and not head, head and alone and not emb)


@dataclass(frozen=True)
class PipelineLayout:
    stages: tuple[Stage, ...]

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "PipelineLayout":
        parts = text.replace(" ", "").split("|")
        stages = []
        for i, part in enumerate(parts):
            lower = upper = 0
            adapter = emb = head = False
            seen: list[str] = []
            if part == "-":  # an empty chunk (interleaved layouts only, see validate)
                stages.append(Stage())
                continue
            for tok in filter(None, part.split(",")):
                m = re.fullmatch(r"([ELAUH])(\d*)", tok, flags=re.IGNORECASE)
                bare = m is not None and m.group(1).upper() in "EAH"
                if not m or (bare and m.group(2)) or (not bare and not m.group(2)):
                    raise ValueError(f"pipeline layout '{text}': stage {i} token '{tok}' is not "
                                     f"E, L<k>, A, U<k> or H")
                kind = m.group(1).upper()
                if kind in seen:
                    raise ValueError(f"pipeline layout '{text}': stage {i} repeats '{kind}'")
                if seen and ORDER.index(kind) < ORDER.index(seen[-1]):
                    raise ValueError(f"pipeline layout '{text}': stage {i} lists {kind} after "
                                     f"{seen[-1]}; the order inside a stage is E, L, A, U, H")
                if kind == "E" and i != 0:
                    raise ValueError(f"pipeline layout '{text}': E (the embedding) can only be on "
                                     f"the first stage, found on stage {i}")
                if kind == "H" and i != len(parts) - 1:
                    raise ValueError(f"pipeline layout '{text}': H (the output layer) can only be "
                                     f"on the last stage, found on stage {i}")
                seen.append(kind)
                if kind == "L":
                    lower = int(m.group(2))
                elif kind == "U":
                    upper = int(m.group(2))
                elif kind == "A":
                    adapter = True
                elif kind == "E":
                    emb = True
                else:
                    head = True
            if len(parts) == 1 and emb and head and not (lower or adapter or upper):
                raise ValueError(f"pipeline layout '{text}' holds no layers")
            stages.append(_stage(lower, adapter, upper, emb, head))
        return cls(tuple(stages))

    @classmethod
    def from_counts(cls, units_per_stage: list[int], num_lower: int, num_upper: int) -> "PipelineLayout":
        """Split the chain [L*N, A, U*M] into stages of the given numbers of units
        (embedding and head are not counted as units here)."""
        chain = ["L"] * num_lower + ["A"] + ["U"] * num_upper
        if sum(units_per_stage) != len(chain):
            raise ValueError(f"stage sizes {units_per_stage} sum to {sum(units_per_stage)}, "
                             f"expected {len(chain)} units (N + 1 + M)")
        stages, pos = [], 0
        for n in units_per_stage:
            part = chain[pos:pos + n]
            pos += n
            stages.append(Stage(part.count("L"), "A" in part, part.count("U")))
        return cls(tuple(stages))

    @classmethod
    def from_chain_counts(cls, units_per_stage: list[int], num_lower: int, num_upper: int,
                          allow_empty: bool = False) -> "PipelineLayout":
        """Split the whole chain [E, L*N, A, U*M, H] into stages of the given numbers of units
        (embedding and head counted): a first stage of 1 is embedding-only, a last of 1 head-only;
        with ``allow_empty`` a middle stage of 0 is an empty chunk ("-")."""
        chain = ["E"] + ["L"] * num_lower + ["A"] + ["U"] * num_upper + ["H"]
        low = 0 if allow_empty else 1
        if sum(units_per_stage) != len(chain) or min(units_per_stage, default=0) < low or \
                units_per_stage[0] < 1 or units_per_stage[-1] < 1:
            raise ValueError(f"stage sizes {units_per_stage} must be >= 1 and sum to {len(chain)} "
                             f"units (embedding + N + 1 + M + head), got {sum(units_per_stage)}")
        stages, pos = [], 0
        for n in units_per_stage:
            part = chain[pos:pos + n]
            pos += n
            stages.append(_stage(part.count("L"), "A" in part, part.count("U"), "E" in part, "H" in part))
        if len(stages) > 1 and (stages[0].head or stages[-1].embedding):
            raise ValueError(f"stage sizes {units_per_stage} leave a stage without layers")
        return cls(tuple(stages))

    @classmethod
    def uniform(cls, num_lower: int, num_upper: int, pp: int) -> "PipelineLayout":
        """Megatron's default: transformer layers split evenly (remainder to the first stages),
        the adapter riding with the last lower layer."""
        total = num_lower + num_upper
        if total < pp:
            raise ValueError(f"{total} layers cannot fill {pp} pipeline stages")
        sizes = [total // pp + (1 if i < total % pp else 0) for i in range(pp)]
        # layers -> units: the stage that holds lower layer N-1 also holds the adapter
        units, pos = [], 0
        for s in sizes:
            units.append(s + (1 if pos < num_lower <= pos + s else 0))
            pos += s
        return cls.from_counts(units, num_lower, num_upper)

    @classmethod
    def single_stage(cls, num_lower: int, num_upper: int) -> "PipelineLayout":
        """The whole chain on one stage (PP = 1)."""
        return cls((Stage(num_lower, True, num_upper),))

    # ---- queries ----------------------------------------------------------------------------
    @property
    def pp(self) -> int:
        """Number of stages (with virtual stages: of chunks, pp * vpp)."""
        return len(self.stages)

    @property
    def num_chunks(self) -> int:
        return len(self.stages)

    def __str__(self) -> str:
        return "|".join(str(s) for s in self.stages)

    def chain_counts(self) -> list[int]:
        """Units per stage over the whole chain (embedding on the first, head on the last)."""
        n = len(self.stages)
        return [1 if (s.embedding or s.head) else s.core_units + (i == 0) + (i == n - 1)
                for i, s in enumerate(self.stages)]

    def validate(self, num_lower: int, num_upper: int, pp: Optional[int] = None, vpp: int = 1) -> None:
        text = str(self)
        if pp is not None and self.pp != pp * vpp:
            want = f"pipeline_model_parallel_size is {pp}" if vpp == 1 else \
                f"pipeline_model_parallel_size x virtual_pipeline_model_parallel_size is {pp} x {vpp} = {pp * vpp}"
            raise ValueError(f"pipeline layout '{text}' has {self.pp} stages, {want}")
        for i, s in enumerate(self.stages):
            if not (s.core_units or s.embedding or s.head):
                if vpp == 1 or i in (0, self.pp - 1):
                    raise ValueError(f"pipeline layout '{text}': stage {i} is empty (an empty chunk "
                                     f"'-' is allowed only between others of an interleaved layout)")
            if (s.embedding and i != 0) or (s.head and i != self.pp - 1) or (s.embedding and self.pp == 1):
                raise ValueError(f"pipeline layout '{text}': stage {i} '{s}' leaves a stage without layers")
        if sum(s.lower_layers for s in self.stages) != num_lower:
            raise ValueError(f"pipeline layout '{text}' places {sum(s.lower_layers for s in self.stages)} "
                             f"lower layers, the model has num_layers_lower={num_lower}")
        if sum(s.upper_layers for s in self.stages) != num_upper:
            raise ValueError(f"pipeline layout '{text}' places {sum(s.upper_layers for s in self.stages)} "
                             f"upper layers, the model has num_layers_upper={num_upper}")
        adapters = [i for i, s in enumerate(self.stages) if s.adapter]
        if len(adapters) != 1:
            raise ValueError(f"pipeline layout '{text}': the adapter must be in exactly one stage, "
                             f"found {len(adapters)}")
        a = adapters[0]
        if any(s.upper_layers for s in self.stages[:a]) or any(s.lower_layers for s in self.stages[a + 1:]):
            raise ValueError(f"pipeline layout '{text}': lower layers must all come before the "
                             f"adapter and upper layers after it")

    def lower_offset(self, stage: int) -> int:
        return sum(s.lower_layers for s in self.stages[:stage])

    def upper_offset(self, stage: int) -> int:
        return sum(s.upper_layers for s in self.stages[:stage])

    def adapter_stage(self) -> int:
        return next(i for i, s in enumerate(self.stages) if s.adapter)

    def input_is_upper_width(self, stage: int) -> bool:
        """True when the activation entering `stage` is already past the adapter."""
        return stage > self.adapter_stage()

    def output_is_upper_width(self, stage: int) -> bool:
        return stage >= self.adapter_stage()

    def chunks_of_rank(self, rank: int, pp: int) -> list[int]:
        """Chunk indices run by pipeline rank `rank` (in virtual-stage order): rank, rank + pp, ..."""
        return list(range(rank, self.pp, pp))

    def megatron_layout(self, which: str) -> list[list[str]]:
        """Per-stage (per-chunk) layer-type lists for one block's TransformerConfig
        (`pipeline_model_parallel_layout`): embedding first, loss last, that block's decoders."""
        rows = []
        for i, s in enumerate(self.stages):
            n = s.lower_layers if which == "lower" else s.upper_layers
            row = (["embedding"] if i == 0 else []) + ["decoder"] * n
            rows.append(row + (["loss"] if i == self.pp - 1 else []))
        return rows
