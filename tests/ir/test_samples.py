"""The sample kernels (examples/kernels): each matches numpy on the interpreter and the x86 JIT at
awkward sizes, and the two backends agree bit for bit where the semantics are exact."""

from __future__ import annotations

import numpy as np
import pytest
from vxpu.ir import samples
from vxpu.ir.args import kernel_signature, pack_args
from vxpu.ir.errors import IRError

CASES = [(name, size) for name, s in sorted(samples.SAMPLES.items()) for size in s.test_sizes]


def test_every_example_file_is_registered():
    files = {p.name for p in samples.kernels_dir().glob("*.vxir")}
    assert files == {s.file for s in samples.SAMPLES.values()}
    for s in samples.SAMPLES.values():
        text = (samples.kernels_dir() / s.file).read_text()
        header = text.split("module", 1)[0]
        assert "Parameters" in header and "Launch" in header, s.file


@pytest.mark.parametrize("name,size", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_sample_matches_numpy_on_both_backends(name, size):
    sample = samples.SAMPLES[name]
    case = sample.case(size, seed=11)
    module = sample.module()
    interp = samples.run_case(case, module, backend="interp", detect_races=True)   # race-free, too
    assert samples.compare(case, interp) == []
    x86 = samples.run_case(case, module, backend="x86")
    assert samples.compare(case, x86) == []
    if sample.backend_exact:
        for key in case.outputs:
            assert np.array_equal(interp[key], x86[key], equal_nan=True), key


def test_multilevel_scan_on_x86():
    """70,000 elements need three scan levels (block totals of block totals)."""
    case = samples.SAMPLES["scan"].case(70_000, seed=2)
    assert sum(1 for launch in case.launches if launch.kernel == "scan_blocks") == 3
    assert samples.compare(case, samples.run_case(case, backend="x86")) == []


def test_large_sgemm_on_x86():
    case = samples.SAMPLES["sgemm"].case((130, 70, 200), seed=4)
    assert samples.compare(case, samples.run_case(case, backend="x86")) == []


def test_compare_reports_mismatches():
    case = samples.SAMPLES["saxpy"].case(10)
    bad = {"y": case.expected["y"] + 1}
    problems = samples.compare(case, bad)
    assert len(problems) == 1 and "differs at 10 of 10" in problems[0]
    assert samples.compare(case, {}) != []


def test_size_and_backend_errors(monkeypatch, tmp_path):
    with pytest.raises(IRError, match="takes a size of 3"):
        samples.SAMPLES["sgemm"].case(5)
    with pytest.raises(IRError, match="at most 256 bins"):
        samples.SAMPLES["histogram"].case((10, 300))
    case = samples.SAMPLES["saxpy"].case(4)
    with pytest.raises(IRError, match="unknown backend"):
        samples.run_case(case, backend="tpu")
    monkeypatch.setenv("VXPU_KERNELS_DIR", str(tmp_path / "missing"))
    with pytest.raises(IRError, match="VXPU_KERNELS_DIR"):
        samples.kernels_dir()


def test_pack_args_layout():
    module = samples.SAMPLES["stencil2d"].module()
    sig = kernel_signature(module.kernels[0])
    assert sig.param_offsets == (0, 4, 8, 12, 16, 24) and sig.args_size == 32
    data = pack_args(sig, [3, -1, 0.5, 2.0, 0x10000, 0x20000])
    assert data[:8] == b"\x03\x00\x00\x00\xff\xff\xff\xff"
    assert np.frombuffer(data[8:16], np.float32).tolist() == [0.5, 2.0]
    assert int.from_bytes(data[24:32], "little") == 0x20000
    with pytest.raises(IRError, match="does not fit"):
        pack_args(sig, [1 << 40, 0, 0.0, 0.0, 0, 0])
    with pytest.raises(IRError, match="takes 6 arguments"):
        pack_args(sig, [1, 2])


@pytest.fixture(scope="module")
def accel_device(request):
    """An opened accelerator backend from vxpu.accel: cuda, else hip (skips without a GPU)."""
    from vxpu.accel.registry import open_backend

    reasons = []
    for spec in ("cuda", "hip"):
        try:
            device = open_backend(spec)
        except Exception as exc:  # noqa: BLE001 - BackendUnavailable or a vendor error: skip
            reasons.append(f"{spec}: {exc}")
            continue
        yield device
        device.close()
        return
    pytest.skip("no GPU backend: " + "; ".join(reasons))


@pytest.mark.gpu
@pytest.mark.parametrize("name,size", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_sample_matches_numpy_on_gpu(accel_device, name, size):
    sample = samples.SAMPLES[name]
    case = sample.case(size, seed=11)
    module = sample.module()
    out = samples.run_on_device(module, case.launches, case.buffers, accel_device)
    assert samples.compare(case, {k: out[k] for k in case.outputs}) == []


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(samples.SAMPLES))
def test_sample_default_size_on_gpu(accel_device, name):
    sample = samples.SAMPLES[name]
    case = sample.case(None, seed=5)
    out = samples.run_on_device(sample.module(), case.launches, case.buffers, accel_device)
    assert samples.compare(case, {k: out[k] for k in case.outputs}) == []
