"""docs/ir.md stays true: it documents every op and type code, and its Python example runs."""

from __future__ import annotations

import re

from vxpu.ir import limits, ops, types

from .irhelpers import REPO

DOC = (REPO / "docs" / "ir.md").read_text()


def test_every_op_is_documented():
    missing = [name for name in ops.OPS if f"`{name}`" not in DOC]
    assert not missing


def test_type_codes_match():
    listed = dict(re.findall(r"(i1|i8|i16|i32|i64|f16|f32|f64|ptr<\w+>) (\d+)[,.]", DOC.split("Type codes:")[1][:400]))
    assert {t.name: str(t.code) for t in types.ALL_TYPES} == listed


def test_limits_table_matches():
    for value in (limits.MAX_KERNELS, limits.MAX_PARAMS, limits.MAX_BLOCKS, limits.MAX_OPS_PER_KERNEL,
                  limits.MAX_OPS_PER_MODULE, limits.MAX_SHARED_BYTES, limits.MAX_LOCAL_BYTES, limits.MAX_NAME_LEN):
        assert f"{value:,}" in DOC or str(value) in DOC, value
    assert f"{limits.MAX_MODULE_BYTES // 2**20} MiB" in DOC and f"{limits.MAX_TEXT_BYTES // 2**20} MiB" in DOC


def test_python_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", DOC, re.DOTALL).group(1)
    exec(compile(code, "docs/ir.md", "exec"), {})  # noqa: S102 - our own documentation
    assert "kernel @saxpy(" in capsys.readouterr().out


def test_text_example_verifies():
    from vxpu.ir.text import parse
    from vxpu.ir.verify import verify

    text = re.search(r"## 1\. A first example\n\n```\n(.*?)```", DOC, re.DOTALL).group(1)
    verify(parse(text))


def test_every_exported_name_is_documented():
    import importlib
    import inspect

    undocumented = []
    for name in ("types", "ops", "model", "builder", "text", "binary", "hashing", "verify", "errors", "limits"):
        module = importlib.import_module(f"vxpu.ir.{name}")
        assert module.__doc__ and len(module.__doc__) > 80, name
        for export in module.__all__:
            obj = getattr(module, export)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not (obj.__doc__ or "").strip():
                undocumented.append(f"{name}.{export}")
    assert not undocumented
