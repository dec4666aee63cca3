"""Which pipeline stage holds which part of the stitched model (pure, no torch).

The model is a chain of units: embedding, N lower layers, the adapter, M upper layers,
final norm + LM head + loss. A `PipelineLayout` is a contiguous split of that chain into
PP stages, written as text like ``"L3|L1,A,U1|U2"`` (stages separated by ``|``; ``L<k>``
k lower layers, ``A`` the adapter, ``U<k>`` k upper layers; the embedding is implied on the
first stage and the head on the last).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Stage:
    lower_layers: int = 0
    adapter: bool = False
    upper_layers: int = 0

    def __str__(self) -> str:
        parts = ([f"L{self.lower_layers}"] if self.lower_layers else []) + (["A"] if self.adapter else []) \
            + ([f"U{self.upper_layers}"] if self.upper_layers else [])
        return ",".join(parts) if parts else "-"


@dataclass(frozen=True)
class PipelineLayout:
    stages: tuple[Stage, ...]

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "PipelineLayout":
        stages = []
        for i, part in enumerate(text.replace(" ", "").split("|")):
            lower = upper = 0
            adapter = False
            seen: list[str] = []
            for tok in filter(None, part.split(",")):
                m = re.fullmatch(r"([LAU])(\d*)", tok, flags=re.IGNORECASE)
                if not m or (m.group(1).upper() == "A" and m.group(2)) or \
                        (m.group(1).upper() != "A" and not m.group(2)):
                    raise ValueError(f"pipeline layout '{text}': stage {i} token '{tok}' is not "
                                     f"L<k>, A or U<k>")
                kind = m.group(1).upper()
                if kind in seen:
                    raise ValueError(f"pipeline layout '{text}': stage {i} repeats '{kind}'")
                order = "LAU"
                if seen and order.index(kind) < order.index(seen[-1]):
                    raise ValueError(f"pipeline layout '{text}': stage {i} lists {kind} after "
                                     f"{seen[-1]}; the order inside a stage is L, A, U")
                seen.append(kind)
                if kind == "L":
                    lower = int(m.group(2))
                elif kind == "U":
                    upper = int(m.group(2))
                else:
                    adapter = True
            stages.append(Stage(lower, adapter, upper))
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
        return len(self.stages)

    def __str__(self) -> str:
        return "|".join(str(s) for s in self.stages)

    def validate(self, num_lower: int, num_upper: int, pp: Optional[int] = None) -> None:
        text = str(self)
        if pp is not None and self.pp != pp:
            raise ValueError(f"pipeline layout '{text}' has {self.pp} stages, "
                             f"pipeline_model_parallel_size is {pp}")
        for i, s in enumerate(self.stages):
            if not (s.lower_layers or s.adapter or s.upper_layers):
                raise ValueError(f"pipeline layout '{text}': stage {i} is empty")
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

    def megatron_layout(self, which: str) -> list[list[str]]:
        """Per-stage layer-type lists for one block's TransformerConfig
        (`pipeline_model_parallel_layout`): embedding first, loss last, that block's decoders."""
        rows = []
        for i, s in enumerate(self.stages):
            n = s.lower_layers if which == "lower" else s.upper_layers
            row = (["embedding"] if i == 0 else []) + ["decoder"] * n
            rows.append(row + (["loss"] if i == self.pp - 1 else []))
        return rows
