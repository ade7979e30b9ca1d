"""The NPU backend: ONNX kernels, provider choice and fallback, IR lowering, errors.

Runs on the CPU EP (``provider=cpu``) and on the QNN plugin EP's x86 HTP simulator
(``provider=qnn``, skipped with the reason when onnxruntime-qnn is missing).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from vxpu.accel.backend import BackendError, BackendUnavailable, ModuleKind, Status
from vxpu.accel.registry import open_backend
from vxpu.accel.session import Session

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper
from vxpu.ir import binary, text


@pytest.fixture(scope="module", params=["cpu", "qnn"])
def npu(request):
    try:
        b = open_backend(f"npu,provider={request.param},arena=64M")
    except BackendUnavailable as exc:
        pytest.skip(f"npu provider={request.param} unavailable: {exc}")
    yield b
    b.close()


@pytest.fixture
def session(npu):
    s = Session(npu, allowed_kinds=frozenset({ModuleKind.IR, ModuleKind.ONNX}))
    yield s
    s.close()


def model(nodes, inputs, outputs, name="g", initializers=()):
    g = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def tensor(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def status_of(fn, *args):
    with pytest.raises(BackendError) as e:
        fn(*args)
    return e.value.status


def put(session, array):
    address = session.alloc(array.nbytes)
    session.copy_htod(address, memoryview(array))
    return address


def get(session, address, like):
    out = np.empty_like(like)
    session.copy_dtoh(memoryview(out), address)
    session.synchronize()
    return out


def test_static_graph_runs_and_records_provider(session, npu):
    blob = model([helper.make_node("MatMul", ["a", "b"], ["c"])],
                 [tensor("a", [4, 8]), tensor("b", [8, 3])], [tensor("c", [4, 3])], name="mm")
    k, info = session.get_kernel(session.load_module(blob, ModuleKind.ONNX), "mm")
    assert info.args_size == 24 and session.get_kernel(session.load_module(blob, ModuleKind.ONNX), "main")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 8), dtype=np.float32), rng.standard_normal((8, 3), dtype=np.float32)
    da, db, dc = put(session, a), put(session, b), session.alloc(48)
    before = sum(npu.provider_runs.values())
    session.launch(k, (1,), (1,), struct.pack("<3Q", da, db, dc))
    np.testing.assert_allclose(get(session, dc, np.zeros((4, 3), np.float32)), a @ b, rtol=1e-2, atol=1e-2)
    assert sum(npu.provider_runs.values()) == before + 1
    expected = "qnn" if npu.provider_choice == "qnn" else "CPUExecutionProvider"
    assert npu.properties().architecture == expected and npu.provider_runs[expected] >= 1
    assert session.statistics()[f"vxpu_npu_runs_{expected.lower()}"] == npu.provider_runs[expected]


def test_symbolic_dims_come_from_the_args(session):
    blob = model([helper.make_node("Mul", ["x", "x"], ["y"])], [tensor("x", ["n", 2])], [tensor("y", ["n", 2])])
    k, info = session.get_kernel(session.load_module(blob, ModuleKind.ONNX), "g")
    assert info.param_sizes == (8, 8, 8)                 # x, y, n
    for n in (3, 5):
        x = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
        dx, dy = put(session, x), session.alloc(x.nbytes)
        session.launch(k, (1,), (1,), struct.pack("<3Q", dx, dy, n))
        assert np.array_equal(get(session, dy, x), x * x)
    assert status_of(session.launch, k, (1,), (1,), struct.pack("<3Q", dx, dy, 0)) == Status.INVALID_ARGUMENT


def test_in_place_graph(session):
    blob = model([helper.make_node("Neg", ["x"], ["y"])], [tensor("x", [256])], [tensor("y", [256])])
    k, _ = session.get_kernel(session.load_module(blob, ModuleKind.ONNX), "g")
    x = np.arange(256, dtype=np.float32)
    dx = put(session, x)
    session.launch(k, (1,), (1,), struct.pack("<2Q", dx, dx))
    assert np.array_equal(get(session, dx, x), -x)


def test_launch_checks(session):
    blob = model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [1024])], [tensor("y", [1024])])
    k, _ = session.get_kernel(session.load_module(blob, ModuleKind.ONNX), "g")
    d = session.alloc(4096)
    assert status_of(session.launch, k, (2,), (1,), struct.pack("<2Q", d, d)) == Status.INVALID_ARGUMENT
    assert status_of(session.launch, k, (1,), (1,), struct.pack("<2Q", d, 8)) == Status.OUT_OF_RANGE
    assert status_of(session.launch, k, (1,), (1,), struct.pack("<2Q", d, 1 << 40)) == Status.OUT_OF_RANGE
    assert status_of(session.launch, k, (1,), (1,), struct.pack("<2Q", d, d + 2)) == Status.INVALID_ARGUMENT


def test_bad_and_unsupported_models(session):
    assert status_of(session.load_module, b"\x08\x07garbage", ModuleKind.ONNX) == Status.BAD_MODULE
    nonzero = model([helper.make_node("NonZero", ["x"], ["y"])], [tensor("x", [8])],
                    [tensor("y", [1, "k"], TensorProto.INT64)])
    assert status_of(session.load_module, nonzero, ModuleKind.ONNX) == Status.UNSUPPORTED
    unknown_op = model([helper.make_node("NoSuchOp", ["x"], ["y"])], [tensor("x", [8])], [tensor("y", [8])])
    assert status_of(session.load_module, unknown_op, ModuleKind.ONNX) == Status.BAD_MODULE


def test_external_data_is_refused(session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    secret = tmp_path / "weights.bin"
    secret.write_bytes(np.ones(8, np.float32).tobytes())
    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[8])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", secret.name), ("offset", "0"), ("length", "32")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    blob = model([helper.make_node("Add", ["x", "w"], ["y"])], [tensor("x", [8])], [tensor("y", [8])],
                 initializers=[w])
    with pytest.raises(BackendError) as e:
        session.load_module(blob, ModuleKind.ONNX)
    assert e.value.status == Status.BAD_MODULE and "external data" in str(e.value)


def test_runtime_failure_is_a_kernel_fault_and_recovers(session, npu):
    # Reshape to a shape whose element count differs from the input's: fails when run. The QNN
    # HTP simulator does not check runtime shapes (it computes garbage), so this is a CPU-EP test.
    if npu.provider_choice != "cpu":
        pytest.skip("QNN's HTP simulator does not report runtime shape errors")
    blob = model([helper.make_node("Reshape", ["x", "s"], ["y"])],
                 [tensor("x", ["n"]), tensor("s", [1], TensorProto.INT64)], [tensor("y", ["n"])])
    k, _ = session.get_kernel(session.load_module(blob, ModuleKind.ONNX), "g")
    dx, ds, dy = put(session, np.ones(8, np.float32)), put(session, np.array([5], np.int64)), session.alloc(32)
    faults = npu.stats.faults
    with pytest.raises(BackendError) as e:
        session.launch(k, (1,), (1,), struct.pack("<4Q", dx, ds, dy, 8))
        session.synchronize()
    assert e.value.status == Status.KERNEL_FAULT
    assert npu.stats.faults == faults + 1 and session.stats.invalidations == 1
    test_in_place_graph(session)                          # serving again


SCALE_ADD = """
module @ew
kernel @scale_add(%n: i64, %a: f32, %x: ptr<global>, %y: ptr<global>, %z: ptr<global>) {
^entry:
  %b = block_id.x
  %d = block_dim.x
  %m = mul %d, %b : i32
  %t = thread_id.x
  %i = add %t, %m : i32
  %i64 = sext %i : i64
  %ok = icmp slt %i64, %n
  cbr %ok, ^body, ^exit
^body:
  %px = offset %x, %i64 : f32
  %py = offset %y, %i : f32
  %pz = offset %z, %i : f32
  %vx = load %px : f32
  %vy = load %py : f32
  %two = const 2.0 : f32
  %a2 = fmul %a, %two : f32
  %s = fmul %a2, %vx : f32
  %r = fadd %s, %vy : f32
  %neg = fcmp olt %r, %vy
  %q = sqrt %vx : f32
  %out = select %neg, %q, %r
  store %out, %pz
  br ^exit
^exit:
  ret
}

kernel @loop(%n: i32, %x: ptr<global>) {
^entry:
  br ^head(%n)
^head(%k: i32):
  ret
}
"""


def test_ir_elementwise_kernel(session):
    mod = session.load_module(binary.encode(text.parse(SCALE_ADD)))
    k, info = session.get_kernel(mod, "scale_add")
    assert info.param_offsets == (0, 8, 16, 24, 32)
    n = 1000
    x = np.random.default_rng(5).uniform(0, 4, n).astype(np.float32)
    y = np.random.default_rng(6).uniform(-50, 50, n).astype(np.float32)
    dx, dy, dz = put(session, x), put(session, y), put(session, np.zeros(n + 8, np.float32))
    session.launch(k, (n // 64 + 1,), (64,), struct.pack("<qf4xQQQ", n, -1.5, dx, dy, dz))
    r = np.float32(-3.0) * x + y
    expect = np.where(r < y, np.sqrt(x), r)
    out = get(session, dz, np.zeros(n + 8, np.float32))
    np.testing.assert_allclose(out[:n], expect, rtol=2e-3, atol=2e-3)
    assert np.all(out[n:] == 0)                            # the guard held


def test_ir_kernel_that_is_not_elementwise(session):
    mod = session.load_module(binary.encode(text.parse(SCALE_ADD)))
    with pytest.raises(BackendError) as e:
        session.get_kernel(mod, "loop")
    assert e.value.status == Status.UNSUPPORTED and "elementwise" in str(e.value)


def test_ir_module_with_no_lowerable_kernel(session):
    src = SCALE_ADD[SCALE_ADD.index("kernel @loop"):]
    with pytest.raises(BackendError) as e:
        session.load_module(binary.encode(text.parse("module @m\n" + src)))
    assert e.value.status == Status.UNSUPPORTED and "block parameters" in str(e.value)


def test_provider_option_is_validated():
    with pytest.raises(BackendUnavailable):
        open_backend("npu,provider=tpu")


def _elementwise(body: str, params: str, ty: str = "f32") -> str:
    return f"""
module @m
kernel @k(%n: i32{params}) {{
^entry:
  %b = block_id.x
  %d = block_dim.x
  %m = mul %b, %d : i32
  %t = thread_id.x
  %i = add %m, %t : i32
  %ok = icmp slt %i, %n
  cbr %ok, ^body, ^exit
^body:
{body}
  br ^exit
^exit:
  ret
}}
"""


INT_MAP = _elementwise("""
  %px = offset %x, %i : i32
  %py = offset %y, %i : i32
  %v = load %px : i32
  %three = const 3 : i32
  %m3 = mul %v, %three : i32
  %mx = smax %m3, %c : i32
  %x8 = xor %mx, %c : i32
  store %x8, %py""", ", %c: i32, %x: ptr<global>, %y: ptr<global>")

FILL = _elementwise("""
  %py = offset %y, %i : f16
  %h = fptrunc %a : f16
  store %h, %py""", ", %a: f32, %y: ptr<global>")

UNSIGNED = _elementwise("""
  %px = offset %x, %i : i32
  %v = load %px : i32
  %lt = icmp ult %v, %n
  %z = zext %lt : i32
  store %z, %px""", ", %x: ptr<global>")


def test_ir_integer_map(session):
    k, _ = session.get_kernel(session.load_module(binary.encode(text.parse(INT_MAP))), "k")
    x = np.arange(-50, 50, dtype=np.int32)
    dx, dy = put(session, x), session.alloc(x.nbytes)
    session.launch(k, (1,), (128,), struct.pack("<iiQQ", 100, 7, dx, dy))
    assert np.array_equal(get(session, dy, x), np.maximum(x * 3, 7) ^ 7)


def test_ir_uniform_store_broadcasts(session):
    k, _ = session.get_kernel(session.load_module(binary.encode(text.parse(FILL))), "k")
    dy = put(session, np.zeros(64, np.float16))
    session.launch(k, (2,), (16,), struct.pack("<ifQ", 20, 1.5, dy))
    out = get(session, dy, np.zeros(64, np.float16))
    assert np.all(out[:20] == 1.5) and np.all(out[20:] == 0)


def test_ir_unsigned_compare_is_unsupported(session):
    with pytest.raises(BackendError) as e:
        session.load_module(binary.encode(text.parse(UNSIGNED)))
    assert e.value.status == Status.UNSUPPORTED and "icmp ult" in str(e.value)


REDUCE = _elementwise("""
  %px = offset %x, %i : f32
  %v = load %px : f32
  %sq = fmul %v, %v : f32
  %old = atomic_fadd %sum, %sq : f32
  %pz = offset %z, %i : i32
  %k = load %pz : i32
  %oldm = atomic_smax %mx, %k : i32
  %py = offset %y, %i : f32
  store %sq, %py""", ", %x: ptr<global>, %y: ptr<global>, %z: ptr<global>, %sum: ptr<global>, %mx: ptr<global>")


def test_ir_atomic_reductions(session, npu):
    k, _ = session.get_kernel(session.load_module(binary.encode(text.parse(REDUCE))), "k")
    x = np.linspace(-3, 2.5, 200).astype(np.float32)
    z = np.random.default_rng(2).integers(-1000, 1000, 200).astype(np.int32)
    dx, dy, dz = put(session, x), session.alloc(x.nbytes), put(session, z)
    dsum, dmax = put(session, np.array([10.0], np.float32)), put(session, np.array([-100], np.int32))
    session.launch(k, (4,), (64,), struct.pack("<i4xQQQQQ", 150, dx, dy, dz, dsum, dmax))
    total = get(session, dsum, np.zeros(1, np.float32))[0]
    assert total == pytest.approx(10.0 + float((x[:150].astype(np.float64) ** 2).sum()), rel=2e-3)
    assert get(session, dmax, np.zeros(1, np.int32))[0] == max(-100, int(z[:150].max()))
    np.testing.assert_allclose(get(session, dy, x)[:150], x[:150] ** 2, rtol=2e-3)


def test_unusable_npu_provider_falls_back_and_records_cpu():
    b = open_backend("npu,arena=16M")
    try:
        b._npu_devices, b._builtin = [], ["QNNExecutionProvider"]   # as on a build that lists it
        s = Session(b, allowed_kinds=frozenset({ModuleKind.ONNX}))
        blob = model([helper.make_node("Abs", ["x"], ["y"])], [tensor("x", [4])], [tensor("y", [4])])
        k, _ = s.get_kernel(s.load_module(blob, ModuleKind.ONNX), "g")
        x = np.array([-1, 2, -3, 4], np.float32)
        dx = put(s, x)
        s.launch(k, (1,), (1,), struct.pack("<2Q", dx, dx))
        assert np.array_equal(get(s, dx, x), np.abs(x))
        assert dict(b.provider_runs) == {"CPUExecutionProvider": 1}
        s.close()
    finally:
        b.close()
