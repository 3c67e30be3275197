"""How experts are stored: everything resident, or a budgeted cache over the files on disk."""

from __future__ import annotations

from dataclasses import dataclass

from ..cache.registry import POLICIES
from ..errors import ConfigError
from .predict import ENGINE_PREDICTORS


@dataclass
class StoreConfig:
    expert_memory: str | int | None = None  # None: all experts resident; "2GiB", "25%", bytes
    policy: str = "cyclic"  # the best measured (BENCHMARKS.md); lru thrashes below a token's experts
    scope: str = "global"  # "global": layers share the budget; "layer": an equal share each
    prefetch: str = "auto"  # learned if `trace` has its fitted maps, else none (store.predict)
    io_threads: int = 4  # demand misses of one layer are read this many at a time (io="threads")
    # how reads reach the disk: "aio" (Linux native AIO, no reader threads), "threads" (a pool of
    # reader threads), "auto" (aio where the files take O_DIRECT and the kernel has AIO)
    io: str = "auto"
    trace: str | None = None  # a routing trace of this model: pinned's hot set, cooccurrence's fit
    # with an accelerator: expert_memory is the device's budget; host_memory the RAM tier's under
    # it (None: every expert in RAM); on_miss "cpu" computes a missed expert where it lives
    host_memory: str | int | None = None
    on_miss: str = "copy"

    def __post_init__(self):
        usable = [p for p in POLICIES if p != "belady"]  # belady needs the future: simulator only
        if self.policy not in usable:
            raise ConfigError(f"unknown expert cache policy {self.policy!r} (known: {', '.join(usable)})")
        if self.scope not in ("global", "layer"):
            raise ConfigError(f"expert cache scope must be global or layer, got {self.scope!r}")
        if self.prefetch not in ENGINE_PREDICTORS:
            raise ConfigError(
                f"unknown prefetch predictor {self.prefetch!r} (known: {', '.join(ENGINE_PREDICTORS)})"
            )
        if self.on_miss not in ("copy", "cpu"):
            raise ConfigError(f"--on-miss must be copy or cpu, got {self.on_miss!r}")
        if self.io not in ("auto", "aio", "threads"):
            raise ConfigError(f"expert io must be auto, aio or threads, got {self.io!r}")
        if self.io_threads < 1:
            raise ConfigError(f"io_threads must be at least 1, got {self.io_threads}")

    @property
    def tiered(self) -> bool:
        return self.expert_memory is not None
