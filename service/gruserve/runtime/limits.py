"""How much work one request may ask for, decided from shapes before anything runs.

Request bytes and timesteps per sequence bound what a request *sends*, not what it
*costs*: a 4 MiB body holds a million one-step sequences, whose reply with final
states runs to hundreds of megabytes. :class:`WorkLimits` bounds the two things that
grow with a request: the sequences x timesteps it runs, and the values its reply
holds (outputs and requested states). Both are known from the input shape and the
model's signature, so an oversized request is refused (413) before it runs, and an
accepted batch runs in chunks of :attr:`WorkLimits.chunk_timesteps` sequence-steps so
that onnxruntime's working memory stays bounded by the limits, not by the request.

>>> limits = WorkLimits(max_batch_timesteps=100, max_reply_values=1000, chunk_timesteps=10)
>>> [(s.start, s.stop) for s in limits.chunks(batch=7, timesteps=3)]
[(0, 3), (3, 6), (6, 7)]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gruserve.errors import PayloadTooLarge
from gruserve.runtime.signature import ModelSignature


@dataclass(frozen=True)
class WorkLimits:
    """Per-request work limits (``GRUSERVE_MAX_BATCH_TIMESTEPS`` and friends).

    Args:
        max_batch_timesteps: most sequences x timesteps in one request.
        max_reply_values: most numbers in one reply: outputs plus requested states.
        chunk_timesteps: sequences x timesteps per onnxruntime run of a large batch.
    """

    max_batch_timesteps: int = 65_536
    max_reply_values: int = 1_048_576
    chunk_timesteps: int = 8_192

    def __post_init__(self) -> None:
        for name in ("max_batch_timesteps", "max_reply_values", "chunk_timesteps"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"WorkLimits needs {name} >= 1. Received: {name}={value!r}")

    def check(
        self,
        sig: ModelSignature,
        batch: int,
        timesteps: int,
        outputs: int | None = None,
        state_units: int = 0,
    ) -> None:
        """Refuse a request of ``batch`` sequences of ``timesteps`` that costs too much.

        Args:
            sig: the model's signature (output width, per-timestep or not).
            batch, timesteps: the request's input shape.
            outputs: how many of the model's outputs the reply holds (None: all).
            state_units: the units of the states the reply holds, per sequence.

        Raises:
            PayloadTooLarge: naming the limit and its setting.
        """
        work = batch * timesteps
        if work > self.max_batch_timesteps:
            raise PayloadTooLarge(
                "sequences x timesteps",
                work,
                self.max_batch_timesteps,
                "GRUSERVE_MAX_BATCH_TIMESTEPS",
            )
        self.check_reply(sig, batch, timesteps, outputs, state_units)

    def check_reply(
        self,
        sig: ModelSignature,
        batch: int,
        timesteps: int,
        outputs: int | None = None,
        state_units: int = 0,
    ) -> None:
        """The reply half of :meth:`check`, alone: a session step (one sequence, timesteps
        bounded by ``GRUSERVE_MAX_TIMESTEPS``) counts only what it answers."""
        count = len(sig.output_names) if outputs is None else outputs
        per_output = sig.output_width * (timesteps if sig.per_timestep else 1)
        values = batch * (count * per_output + state_units)
        if values > self.max_reply_values:
            raise PayloadTooLarge(
                "the reply's values (outputs and requested states)",
                values,
                self.max_reply_values,
                "GRUSERVE_MAX_REPLY_VALUES",
            )

    def chunks(self, batch: int, timesteps: int) -> Iterator[slice]:
        """Slices of the batch axis, each at most ``chunk_timesteps`` sequence-steps (but at
        least one sequence)."""
        size = max(1, self.chunk_timesteps // max(1, timesteps))
        for start in range(0, batch, size):
            yield slice(start, min(start + size, batch))
