"""TensorRT optimization profiles of a scorer engine: a static decode profile and a dynamic prefill profile."""

from __future__ import annotations

from dataclasses import dataclass

from kvzap_eval.errors import ConfigError

Shape = tuple[int, int, int]

#: Prefill profile default: 1..131072 tokens, tuned (opt) for 4096-token chunks.
DEFAULT_MAX_SEQ = 131072
DEFAULT_OPT_SEQ = 4096


@dataclass(frozen=True)
class EngineProfiles:
    """Profile 0 = decode, static [1, 1, D]; profile 1 = prefill, min [1, 1, D], opt [1, opt_seq, D],
    max [max_batch, max_seq, D]. `opt_seq` None = min(4096, max_seq)."""

    max_seq: int = DEFAULT_MAX_SEQ
    opt_seq: int | None = None
    max_batch: int = 1

    def __post_init__(self) -> None:
        for name in ("max_seq", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"TensorRT profile {name}={value!r} must be a positive integer")
        opt = self.opt_seq
        if opt is not None and (isinstance(opt, bool) or not isinstance(opt, int) or not 1 <= opt <= self.max_seq):
            raise ConfigError(f"TensorRT profile opt_seq={self.opt_seq!r} must lie in 1..max_seq={self.max_seq}")

    @property
    def opt(self) -> int:
        return self.opt_seq if self.opt_seq is not None else min(DEFAULT_OPT_SEQ, self.max_seq)

    def decode(self, dim: int) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) of the decode profile: all [1, 1, D]."""
        return (1, 1, dim), (1, 1, dim), (1, 1, dim)

    def prefill(self, dim: int) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) of the prefill profile."""
        return (1, 1, dim), (1, self.opt, dim), (self.max_batch, self.max_seq, dim)

    def all(self, dim: int) -> list[tuple[Shape, Shape, Shape]]:
        """Both profiles in engine order (index 0 decode, 1 prefill)."""
        return [self.decode(dim), self.prefill(dim)]

    def profile_for(self, shape: tuple[int, ...]) -> int:
        """The profile index that runs an input of this shape; `ConfigError` if no profile covers it."""
        batch, tokens = shape[0], shape[1]
        if batch == 1 and tokens == 1:
            return 0
        if 1 <= batch <= self.max_batch and 1 <= tokens <= self.max_seq:
            return 1
        raise ConfigError(
            f"scorer input of shape {list(shape)} exceeds the TensorRT prefill profile (batch <= {self.max_batch}, "
            f"tokens <= {self.max_seq}): rebuild the engines with a larger --max-batch / --max-seq"
        )

    def to_json(self, dim: int) -> dict:
        return {"decode": [list(s) for s in self.decode(dim)], "prefill": [list(s) for s in self.prefill(dim)]}
