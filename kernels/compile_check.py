"""Compile the kernels for NVIDIA GPUs without a GPU, and report registers, spills and shared memory.

    TRITON_INTERPRET=0 python -m fastinf.kernels.compile_check            # every config, sm_90 and sm_80
    TRITON_INTERPRET=0 python -m fastinf.kernels.compile_check --first    # first config of each class

Triton compiles ahead of time for a target (``GPUTarget("cuda", 90, 32)``) with the ``ptxas`` shipped in
its wheel; ``cuobjdump --dump-resource-usage`` then reads the cubin. This is how the config tables in
:mod:`fastinf.kernels._utils` were checked spill-free, and it lets CPU-only CI catch a kernel that the
interpreter accepts but the compiler rejects. Needs the kernels loaded as compiled (not interpreted)
functions: ``TRITON_INTERPRET`` must be off in this process.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

from fastinf.errors import BackendError
from fastinf.kernels import _utils, embed, kron, lowrank

ARCHS = {"hopper": 90, "ampere": 80}
_DTYPE = {"tf32": "bf16", "x3": "fp32"}      # input dtype that selects each precision class
_PREC = {"tf32": "tf32", "x3": "tf32x3"}
_K = {"small": 16, "big": 64}


@dataclass
class CompileResult:
    kernel: str
    arch: int
    klass: str
    config: tuple[int, int, int, int]
    registers: int
    spill_bytes: int
    shared_bytes: int


def _resources(kernel) -> tuple[int, int]:
    """(registers per thread, stack/spill bytes per thread) from the compiled cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(tok.split(":", 1) for line in out.splitlines() if "REG:" in line for tok in line.split()
                  if ":" in tok)
    return int(fields["REG"]), int(fields["STACK"])


def _compile(jit_fn, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict, entry, names, arch: int):
    c = dict(constexprs, **{names[0]: entry[0], names[1]: entry[1]})
    sig = {n: "constexpr" if n in c else pointers.get(n, "fp32" if n in floats else "i32") for n in jit_fn.arg_names}
    return triton.compile(ASTSource(jit_fn, sig, constexprs=c), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": entry[2], "num_stages": entry[3]})


def _row(name, arch, klass, entry, compiled) -> CompileResult:
    regs, spill = _resources(compiled)
    return CompileResult(name, arch, klass, tuple(entry), regs, spill, int(compiled.metadata.shared))


def check(archs: tuple[str, ...] = ("hopper", "ampere"), first_only: bool = False) -> list[CompileResult]:
    """Compile kron / embed / lowrank for each config of each class of each arch; one row per compile."""
    if _utils.INTERPRET:
        raise BackendError("compile_check: expected compiled Triton functions, found the interpreter on; "
                           "run with TRITON_INTERPRET=0")
    rows = []
    for arch_name in archs:
        arch = ARCHS[arch_name]
        for (size, pclass), entries in _utils._PROJECTION_TABLE[arch_name].items():
            dt, prec, k = _DTYPE[pclass], _PREC[pclass], _K[size]
            flags = dict(HAS_MASK=True, KI=k, KO=k, PREC=prec, ROUND=pclass == "tf32")
            for entry in entries[:1] if first_only else entries:
                ptrs = {"x_ptr": f"*{dt}", "g_ptr": f"*{dt}", "m_ptr": "*fp32", "pin_ptr": "*fp32",
                        "pout_ptr": "*fp32", "out_ptr": "*fp32"}
                ck = _compile(kron._kron_project_kernel.fn, ptrs, (), dict(flags, HAS_BIAS=True), entry,
                              _utils._PROJ_NAMES, arch)
                rows.append(_row("kron", arch, f"{size}/{pclass}", entry, ck))
                ptrs = {"ids_ptr": "*i64", "g_ptr": f"*{dt}", "m_ptr": "*fp32", "pv_ptr": "*fp32",
                        "pout_ptr": "*fp32", "out_ptr": "*fp32"}
                ck = _compile(embed._embed_project_kernel.fn, ptrs, (), flags, entry, _utils._PROJ_NAMES, arch)
                rows.append(_row("embed", arch, f"{size}/{pclass}", entry, ck))
        for pclass, entries in _utils._LOWRANK_TABLE[arch_name].items():
            dt = _DTYPE[pclass]
            for entry in entries[:1] if first_only else entries:
                ptrs = {"x_ptr": f"*{dt}", "u_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": f"*{dt}"}
                flags = dict(RC=_utils.RANK_CHUNK, PREC=_PREC[pclass], ROUND=pclass == "tf32")
                ck = _compile(lowrank._lowrank_apply_kernel.fn, ptrs, ("c",), flags, entry, _utils._LOWRANK_NAMES,
                              arch)
                rows.append(_row("lowrank", arch, pclass, entry, ck))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compile fastinf's Triton kernels for sm_90/sm_80 without a GPU.")
    p.add_argument("--arch", choices=sorted(ARCHS), action="append", help="default: all")
    p.add_argument("--first", action="store_true", help="only the first config of each class")
    args = p.parse_args(argv)
    rows = check(tuple(args.arch or ARCHS), args.first)
    print(f"{'kernel':8} {'sm':>3} {'class':11} {'config (a,b,warps,stages)':26} {'regs':>4} "
          f"{'spill B':>7} {'smem B':>7}")
    for r in rows:
        print(f"{r.kernel:8} {r.arch:>3} {r.klass:11} {str(r.config):26} {r.registers:>4} {r.spill_bytes:>7} "
              f"{r.shared_bytes:>7}")
    spills = [asdict(r) for r in rows if r.spill_bytes]
    print(f"{len(rows)} kernels compiled, {len(spills)} with register spills")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
