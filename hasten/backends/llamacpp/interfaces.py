"""What the llama.cpp modules need of each other's objects, as protocols, so that none imports one that imports it
back: the model as its targets see it (``TargetModel``), the shared context as its members see it (``SharedHome``),
and a member's place there (``Membership``). ``model.LlamaCppModel`` and ``shared_context.SharedCache`` fit them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from hasten.backends.base import Scores
    from hasten.backends.llamacpp.prompt_cache import PromptCache

Member = TypeVar("Member", contravariant=True)  # the targets that live in a shared context


class TargetModel(Protocol):
    """What a target uses of its model: the library, the sizes, the prompt cache, and the pool of contexts."""

    lib: Any
    vocab_size: int
    hidden_size: int
    max_context: int
    n_seq_max: int
    n_batch: int
    prompt_cache: PromptCache | None
    decode_log: list[tuple[int, float]] | None

    def release_context(self, context: Any) -> None: ...


class SharedHome(Protocol[Member]):
    """What a member uses of the shared context it lives in: its llama context and memory, and the Target
    operations run there on the member's behalf."""

    ctx: Any
    mem: Any

    def score(self, target: Member, tokens: list[int], parents: list[int],
              logits_rows: Sequence[int] | None) -> Scores: ...

    def commit(self, target: Member, keep: list[int]) -> None: ...

    def truncate(self, target: Member, length: int) -> None: ...

    def leave(self, target: Member, keep: bool = True, reopen: bool = True) -> None: ...

    def problems(self, target: Member) -> list[str]: ...


@dataclass
class Membership(Generic[Member]):
    """A target's place in the shared context (kept up by the context): its sequence ids there, its home (every
    committed cell) first, and how far each one carries the committed context (the home always all of it)."""

    cache: SharedHome[Member]
    ids: list[int]
    synced: list[int]


__all__ = ["Membership", "SharedHome", "TargetModel"]
