"""MemoryLedger (the engine's "gpu"-tier accounting) and DevicePeakMeter."""
import pytest
import torch

from offload.loading.memory import CATEGORIES, DevicePeakMeter, MemoryBudgetError, MemoryLedger


def test_current_and_peak_per_category_and_total():
    ledger = MemoryLedger()
    ledger.allocate("weights", 1000)
    ledger.allocate("workspace", 300)
    ledger.free("workspace", 300)
    ledger.allocate("workspace", 200)
    ledger.allocate("kv_cache", 50)
    assert ledger.current_bytes() == 1250 and ledger.current_bytes("workspace") == 200
    assert ledger.peak_bytes("workspace") == 300
    assert ledger.peak_bytes() == 1300              # weights 1000 + workspace 300, before it shrank
    ledger.free("weights", 1000)
    assert ledger.peak_bytes("weights") == 1000 and ledger.current_bytes("weights") == 0
    ledger.reset_peak()
    assert ledger.peak_bytes() == 250 and ledger.peak_bytes("weights") == 0
    report = ledger.report()
    assert all(category in report for category in CATEGORIES) and "total" in report


def test_budget_is_checked_before_recording():
    ledger = MemoryLedger(max_bytes=1 << 20)
    ledger.allocate("weights", 800_000)
    with pytest.raises(MemoryBudgetError, match="kv_cache would use .* over its budget of 1.0 MiB"):
        ledger.allocate("kv_cache", 300_000)
    assert ledger.current_bytes() == 800_000 and ledger.peak_bytes() == 800_000
    ledger.allocate("kv_cache", (1 << 20) - 800_000)  # exactly the budget is fine
    assert "free" in ledger.report()


def test_bad_input_is_a_clear_error():
    ledger = MemoryLedger()
    with pytest.raises(ValueError, match="unknown memory category 'activations'"):
        ledger.allocate("activations", 1)
    with pytest.raises(ValueError, match="only 0 are recorded"):
        ledger.free("weights", 1)
    with pytest.raises(ValueError, match=">= 0"):
        ledger.allocate("weights", -1)
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryLedger(max_bytes=-5)


def test_allocate_tensor_counts_its_bytes():
    ledger = MemoryLedger()
    tensor = ledger.allocate_tensor("buffers", torch.empty(3, 5, dtype=torch.bfloat16))
    assert tensor.shape == (3, 5) and ledger.current_bytes("buffers") == 30


def test_device_peak_meter_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        DevicePeakMeter("cpu")


@pytest.mark.cuda
def test_device_peak_meter_measures_an_allocation():
    with DevicePeakMeter("cuda") as meter:
        block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        del block
    assert meter.peak_bytes >= 64 << 20
    assert meter.peak_bytes < (64 << 20) + (2 << 20)
