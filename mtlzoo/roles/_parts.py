"""A strategy made of other strategies (a composite, a modifier): the step's lifecycle reaches every part."""

from __future__ import annotations

from torch import Tensor

from mtlzoo.strategy import Strategy


class WithParts(Strategy):
    """Fans the lifecycle out to the strategies held as submodules: micro-batch count, advance, discard, epochs."""

    def parts(self) -> list[Strategy]:
        """The strategies this one is made of, in registration order."""
        return [module for module in self.children() if isinstance(module, Strategy)]

    def _set_micro_batch(self, value: int) -> None:
        super()._set_micro_batch(value)
        for part in self.parts():
            part._set_micro_batch(value)

    @property  # type: ignore[override]
    def weighted_heads(self) -> bool:
        own = self.__dict__.get("_weighted_heads")
        return any(part.weighted_heads for part in self.parts()) if own is None else own

    @weighted_heads.setter
    def weighted_heads(self, value: bool) -> None:
        self.__dict__["_weighted_heads"] = value

    def advance(self) -> None:
        super().advance()
        for part in self.parts():
            part.advance()

    def discard(self) -> None:
        super().discard()
        for part in self.parts():
            part.discard()

    def end_epoch(self) -> None:
        for part in self.parts():
            part.end_epoch()

    @property  # type: ignore[override]
    def wants_post_step_losses(self) -> bool:
        return any(part.wants_post_step_losses for part in self.parts())

    def post_step(self, losses: Tensor) -> None:
        for part in self.parts():
            if part.wants_post_step_losses:
                part.post_step(losses)

    def check_ready(self) -> None:
        for part in self.parts():
            part.check_ready()
