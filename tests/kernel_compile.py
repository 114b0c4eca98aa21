"""Compile a Triton kernel for a real NVIDIA GPU on a machine without one.

A test utility (not a test module): the Triton wheel ships ``ptxas`` and ``cuobjdump``, so
``triton.compile`` produces real PTX and a real cubin for sm_80 (A100) or sm_90 (H100) on a
CPU-only machine. This catches what the interpreter cannot: code the real compiler rejects,
register spills (``LOCAL``/``STACK`` bytes) and scalar global loads where 16-byte vector loads
were expected.

Example::

    from tests.kernel_compile import compile_for_gpu

    k = compile_for_gpu(my_kernel, {"x_ptr": "*bf16", "n": "i32"}, {"BLOCK": 1024}, arch=90)
    assert k.local_bytes == 0 and k.stack_bytes == 0
    assert "ld.global.v4" in k.ptx

Works whether or not ``TRITON_INTERPRET=1`` was set when the kernel module was imported: an
interpreted function (and any interpreted ``@triton.jit`` helper it calls) is recompiled from
its Python source as a real ``JITFunction`` for the duration of the compilation.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

_RESOURCE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


@dataclass
class CompiledForGPU:
    """What one real compilation produced.

    ``registers``, ``local_bytes``, ``stack_bytes``, ``shared_bytes`` come from
    ``cuobjdump --dump-resource-usage`` on the cubin (``LOCAL:0 STACK:0`` = no spills).
    """

    name: str
    arch: int
    ptx: str
    cubin: bytes
    registers: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    resource_usage: str

    def global_loads(self) -> list[str]:
        """The PTX ``ld.global`` instructions, one string per instruction."""
        return [line.strip() for line in self.ptx.splitlines() if "ld.global" in line]

    def global_stores(self) -> list[str]:
        """The PTX ``st.global`` instructions, one string per instruction."""
        return [line.strip() for line in self.ptx.splitlines() if "st.global" in line]


def _as_python_function(fn):
    """The plain Python function under a JIT / interpreted / autotuned kernel object."""
    while isinstance(fn, (Autotuner, Heuristics)):
        fn = fn.fn
    if isinstance(fn, (JITFunction, InterpretedFunction)):
        return fn.fn
    if callable(fn):
        return fn
    raise TypeError(f"fn must be a @triton.jit kernel or a Python function, got {type(fn)!r}")


@contextlib.contextmanager
def _real_jit_globals(pyfn):
    """Temporarily replace interpreted ``@triton.jit`` functions by real ``JITFunction`` objects
    (the code generator only inlines real ones): those in ``pyfn``'s module globals, and
    Triton's own library functions (``tl.max``, ``tl.softmax`` ..., also bound as tensor
    methods), which are interpreted too when ``TRITON_INTERPRET=1`` was set at import."""
    namespaces = [pyfn.__globals__]
    namespaces += [
        vars(module)
        for name, module in list(sys.modules.items())
        if module is not None and (name == "triton.language" or name.startswith("triton.language."))
    ]
    namespaces.append(tl.tensor.__dict__)
    real: dict[int, JITFunction] = {}
    swapped = []  # (namespace, name, interpreted)
    for scope in namespaces:
        for name, value in list(scope.items()):
            if isinstance(value, InterpretedFunction):
                if id(value) not in real:
                    real[id(value)] = JITFunction(value.fn, **_jit_kwargs(value))
                swapped.append((scope, name, value))
    for scope, name, value in swapped:
        _set(scope, name, real[id(value)])
    try:
        yield
    finally:
        for scope, name, value in swapped:
            _set(scope, name, value)


def _language_objects():
    objects = [module for name, module in list(sys.modules.items())
               if module is not None and (name == "triton.language" or name.startswith("triton.language."))]
    return objects + [tl.core.tensor, tl.core.tensor_descriptor_base]


def _is_interpreter_patch(value) -> bool:
    code = getattr(value, "__code__", None)
    if code is None and isinstance(value, property):
        code = getattr(value.fget, "__code__", None)
    return code is not None and code.co_filename.endswith(os.path.join("runtime", "interpreter.py"))


# Triton's interpreter patches triton.language while it runs a kernel, and a call to a
# @triton.jit helper from inside a kernel patches without restoring (triton 3.9). The real
# compiler then meets interpreter lambdas. Keep the pristine attributes, taken at import, i.e.
# at test collection, before any kernel ran.
_PRISTINE = {id(obj): dict(vars(obj)) for obj in _language_objects()}


@contextlib.contextmanager
def _without_interpreter_patches():
    """Put back Triton's own attributes for a real compilation; re-apply the patches after."""
    undone = []
    for obj in _language_objects():
        pristine = _PRISTINE.get(id(obj), {})
        for name, value in list(vars(obj).items()):
            if _is_interpreter_patch(value):
                undone.append((obj, name, value))
                if name in pristine and not _is_interpreter_patch(pristine[name]):
                    setattr(obj, name, pristine[name])
                else:
                    delattr(obj, name)
    try:
        yield
    finally:
        for obj, name, value in undone:
            setattr(obj, name, value)


def _set(scope, name, value):
    if isinstance(scope, dict):
        scope[name] = value
    else:  # a class __dict__ (mappingproxy)
        setattr(tl.tensor, name, value)


def _jit_kwargs(interpreted: InterpretedFunction) -> dict:
    keep = ("noinline", "do_not_specialize", "do_not_specialize_on_alignment")
    return {k: v for k, v in interpreted.kwargs.items() if k in keep and v is not None}


def resource_usage(cubin: bytes) -> tuple[str, dict[str, int]]:
    """Run ``cuobjdump --dump-resource-usage`` on a cubin; returns (raw text, {REG, STACK,
    SHARED, LOCAL})."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", f.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    fields = {}
    for line in text.splitlines():
        if "REG:" in line:
            fields = {k: int(v) for k, v in _RESOURCE.findall(line)}
    if not fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return text, fields


def compile_for_gpu(
    fn,
    signature: dict[str, str],
    constexprs: dict[str, object],
    *,
    arch: int,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible: tuple[str, ...] | None = None,
) -> CompiledForGPU:
    """Compile ``fn`` with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``.

    signature: Triton type per runtime argument (``"*bf16"``, ``"*fp32"``, ``"i32"``,
        ``"i64"``, ``"fp32"`` ...). Constexpr arguments may be left out of it.
    constexprs: value per ``tl.constexpr`` argument.
    arch: 80 (A100) or 90 (H100).
    divisible: arguments given ``tt.divisibility = 16``, which is what Triton specialises to at
        run time for 16-byte-aligned pointers and integers that are multiples of 16. Default:
        every pointer argument (integers are then treated as arbitrary).
    """
    if arch not in (80, 90):
        raise ValueError(f"arch must be 80 or 90, got {arch!r}")
    pyfn = _as_python_function(fn)
    with _without_interpreter_patches(), _real_jit_globals(pyfn):
        jit = JITFunction(pyfn)
        full_sig = {}
        for name in jit.arg_names:
            if name in constexprs:
                full_sig[name] = "constexpr"
            elif name in signature:
                full_sig[name] = signature[name]
            else:
                raise ValueError(f"argument {name!r} of {pyfn.__name__} is in neither signature nor constexprs")
        if divisible is None:
            divisible = tuple(n for n, t in full_sig.items() if t.startswith("*"))
        attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
        src = ASTSource(fn=jit, signature=full_sig, constexprs=dict(constexprs), attrs=attrs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    cubin = compiled.asm["cubin"]
    text, fields = resource_usage(cubin)
    return CompiledForGPU(
        name=pyfn.__name__,
        arch=arch,
        ptx=compiled.asm["ptx"],
        cubin=cubin,
        registers=fields.get("REG", 0),
        local_bytes=fields.get("LOCAL", 0),
        stack_bytes=fields.get("STACK", 0),
        shared_bytes=fields.get("SHARED", 0),
        resource_usage=text,
    )
