"""What the last generate/stream/session call measured (`model.stats`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    """Timings of one call. The transfer fields are filled by weight sources that copy (offloading)."""

    num_prompt_tokens: int = 0          # tokens prefilled, over all rows
    prefill_seconds: float = 0.0
    num_decode_tokens: int = 0          # tokens produced by decode steps, over the rows still running
    decode_seconds: float = 0.0
    host_to_device_bytes: int = 0       # weights/KV copied host -> device during the call
    prefill_host_to_device_bytes: int = 0   # of those, the prefill's
    transfer_wait_seconds: float = 0.0  # time compute waited for those copies
    num_verify_passes: int = 0          # speculative decoding: passes that verified a draft's proposal
    num_drafted_tokens: int = 0         # tokens the draft proposed to them
    num_accepted_tokens: int = 0        # of those, the ones kept
    draft_seconds: float = 0.0          # of decode_seconds, the draft's proposing (a draft model's steps)
    draft_unused: str | None = None     # why a draft given to the call was not used (plain decoding instead)

    def __post_init__(self):
        for name in ("num_prompt_tokens", "prefill_seconds", "num_decode_tokens", "decode_seconds",
                     "host_to_device_bytes", "prefill_host_to_device_bytes", "transfer_wait_seconds",
                     "num_verify_passes", "num_drafted_tokens", "num_accepted_tokens", "draft_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.num_prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.num_decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def achieved_gb_per_second(self) -> float:
        """Host->device bytes over the call's wall time, in GB/s (1e9 bytes)."""
        return self.host_to_device_bytes / self.total_seconds / 1e9 if self.total_seconds else 0.0

    @property
    def bytes_per_decode_token(self) -> float:
        """Host->device bytes a token of decode cost (the prefill's left out): the weights a plain step streams,
        less with speculative decoding (a verification pass streams them once for all the tokens it yields)."""
        decoded = self.host_to_device_bytes - self.prefill_host_to_device_bytes
        return decoded / self.num_decode_tokens if self.num_decode_tokens else 0.0

    @property
    def accepted_tokens_per_pass(self) -> float:
        """Speculative decoding: the draft's tokens kept per verification pass (each pass adds one of the
        target's own)."""
        return self.num_accepted_tokens / self.num_verify_passes if self.num_verify_passes else 0.0

    def summary(self) -> str:
        drafted = (f", {self.num_verify_passes} verification passes keeping {self.num_accepted_tokens} of "
                   f"{self.num_drafted_tokens} drafted tokens ({self.accepted_tokens_per_pass:.2f} a pass; "
                   f"drafting took {self.draft_seconds:.3f} s)" if self.num_verify_passes else "")
        return (f"prefill {self.num_prompt_tokens} tok in {self.prefill_seconds:.3f} s "
                f"({self.prefill_tokens_per_second:.1f} tok/s), decode {self.num_decode_tokens} tok at "
                f"{self.decode_tokens_per_second:.2f} tok/s, {self.host_to_device_bytes / 1e9:.2f} GB "
                f"host->device ({self.achieved_gb_per_second:.2f} GB/s, waited "
                f"{self.transfer_wait_seconds:.3f} s; {self.bytes_per_decode_token / 1e6:.1f} MB a decode token)"
                f"{drafted}"
                f"{f', draft unused: {self.draft_unused}' if self.draft_unused else ''}")
