"""Registers, spills and shared memory of a kernel configuration, with no GPU: compiles the
Triton kernel for sm90 on the CPU and runs the ptxas bundled with triton (`ptxas -v`).

Spills were the main thing holding the backward back (docs/performance.md, step 4); check a
tile candidate here before spending GPU time on it. Also counts the tensor-core instructions in
the SASS (HGMMA: Hopper's warpgroup MMA), the TMA ones, and the spill stores and loads inside
loops, where they cost every iteration (docs/performance.md, step 21). An approximation of the
real build: integer arguments are not marked 16-divisible here and group_size is not
specialized, so the numbers are close to, not equal to, what runs.

    PYTHONPATH=src python3 bench/ptxas_report.py fwd,causal,128,64,8,3,128 dkdv,full,64,128,8,1,128
    PYTHONPATH=src python3 bench/ptxas_report.py --tables   # every Hopper table entry
    PYTHONPATH=src python3 bench/ptxas_report.py gluon,causal,128   # the Gluon forward (ops/fwd_hopper.py)
    PYTHONPATH=src python3 bench/ptxas_report.py gluon_short,full,64  # its configs.SM90_GLUON_FWD_SHORT tile
    PYTHONPATH=src python3 bench/ptxas_report.py gluon_bwd,full,64  # the Gluon backward (ops/bwd_hopper.py)
    (kernel: fwd, dkdv or dq; full|causal, block_m, block_n, num_warps, num_stages, head_dim[, kv_as_b][, feature...])
    features: varlen, softcap, alibi, dropout, left (a window's left bound); tma: the loop's
    streamed tiles (fwd, dq: K/V; dkdv: Q/dO) by TMA tensor descriptors, e.g.
    fwd,causal,128,128,8,3,128,0,left,softcap
"""

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from flashtile.ops import bwd, fwd

_COMMON = {"LSE": "*fp32", "DELTA": "*fp32", "CU_SEQLENS_Q": "*i32", "CU_SEQLENS_K": "*i32", "SEQ_ORDER": "*i32", "ALIBI": "*fp32"}
KERNELS = {
    "fwd": (fwd._fwd_kernel, {**{n: "*bf16" for n in ("Q", "K", "V", "O")}, **_COMMON}),
    "dkdv": (bwd._dkdv_kernel, {**{n: "*bf16" for n in ("Q", "K", "V", "DO", "DK", "DV")}, **_COMMON}),
    "dq": (bwd._dq_kernel, {**{n: "*bf16" for n in ("Q", "K", "V", "DO", "DQ")}, **_COMMON}),
}
FLOAT_ARGS = ("qk_scale", "softmax_scale", "softcap_in", "dropout_scale")
FEATURES = {"varlen": "IS_VARLEN", "softcap": "SOFTCAP", "alibi": "HAS_ALIBI", "dropout": "HAS_DROPOUT",
            "left": "BOUND_LEFT"}


def report(spec: str) -> str:
    if spec.startswith(("gluon,", "gluon_short,", "gluon_bwd,")):
        return gluon_report(spec)
    kind, mask, block_m, block_n, warps, stages, head_dim, *extra = spec.split(",")
    kernel, pointers = KERNELS[kind]
    constexprs = dict(BOUND_RIGHT=mask == "causal", HEAD_DIM=int(head_dim), BLOCK_M=int(block_m),
                      BLOCK_N=int(block_n), BLOCK_D=max(16, triton.next_power_of_2(int(head_dim))),
                      DOT_PRECISION="tf32")
    for feature, flag in FEATURES.items():
        constexprs[flag] = feature in extra
    if constexprs["SOFTCAP"]:
        constexprs["SOFTCAP"] = 2  # the hardware tanh, as for bf16 on the GPU
    constexprs["QDO_TMA" if kind == "dkdv" else "KV_TMA"] = "tma" in extra
    if kind == "fwd":  # the launcher's choice: ALiBi under causal takes the linear-bias path
        constexprs["ALIBI_LINEAR"] = "alibi" in extra and mask == "causal"
    if kind == "dkdv":
        constexprs["KV_AS_B"] = bool(extra and extra[0] in ("1", "true", "True"))
    if kind in ("dkdv", "dq"):
        constexprs["DO_LIKE_Q"] = True  # what the benchmark runs: dO with Q's strides
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in FLOAT_ARGS else "i32")
                 for name in kernel.arg_names}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=int(warps), num_stages=int(stages)))
    return f"{spec}: " + ptxas_facts(compiled)


def gluon_report(spec: str) -> str:
    """``gluon,full|causal|window,head_dim[,softcap]``: the Gluon forward with its configs.SM90_GLUON_FWD
    tile (``gluon_short``: its configs.SM90_GLUON_FWD_SHORT tile); ``gluon_bwd,full|causal,head_dim[,softcap]``:
    the Gluon backward. bf16."""
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from flashtile import configs
    from flashtile.ops import bwd_hopper, fwd_hopper

    kind, mask, head_dim, *extra = spec.split(",")
    head_dim, causal, softcap = int(head_dim), mask in ("causal", "window"), "softcap" in extra
    window = mask == "window"  # a sliding window (left and right bounds)
    rows = torch.empty(4096, 2 * head_dim, dtype=torch.bfloat16)  # a host tensor: only its type matters

    def desc_type(block_rows, boxes=False):
        block, tensor = [block_rows, head_dim], rows
        if boxes:  # 3-D (batch, row, column) descriptor, one batch entry per box
            block, tensor = [1] + block, rows.view(2, 2048, 2 * head_dim)
        return mangle_type(TensorDescriptor.from_tensor(tensor, block,
                                                        gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)))

    if kind in ("gluon", "gluon_short"):
        if kind == "gluon_short":
            tile = configs.SM90_GLUON_FWD_SHORT[(head_dim, causal)].tile
        else:
            tile = configs.SM90_GLUON_FWD[(head_dim, causal)]
        kernel = fwd_hopper._hopper_fwd_kernel
        row_tail = 2048 % fwd_hopper._rows(tile) != 0
        o_tma = fwd_hopper.o_by_tma(tile) and not row_tail  # as hopper_fwd decides
        types = {"q_desc": desc_type(fwd_hopper.HALF_M.value), "k_desc": desc_type(tile.block_n, boxes=True),
                 "v_desc": desc_type(tile.block_n, boxes=True), "out_ptr": "*bf16", "work_counter": "*i32",
                 "out_desc": desc_type(fwd_hopper.HALF_M.value) if o_tma else "*bf16"}
        constexprs = {"D": head_dim, "K_SLOTS": tile.k_slots, "V_SLOTS": tile.v_slots, "BOUND_LEFT": window,
                      "BOUND_RIGHT": causal, "KEY_TAIL": 2048 % tile.block_n != 0, "GUARD": window,
                      "SOFTCAP": softcap, "PINGPONG": tile.pingpong, "QUEUE": tile.queue,
                      "CONSUMERS": tile.consumers, "ROW_TAIL": row_tail, "O_TMA": o_tma, "Q_SLOTS": tile.q_slots}
    else:
        kernel, _, block_n, masked_tma_store, _ = bwd_hopper._kernel_for(head_dim)
        q_type, kv_type = desc_type(bwd_hopper.BLOCK_M), desc_type(block_n)
        dq_block = [bwd_hopper.BLOCK_M, 32]
        dq_type = mangle_type(TensorDescriptor.from_tensor(
            torch.empty(4096, 2 * head_dim), dq_block, gl.NVMMASharedLayout.get_default_for(dq_block, gl.float32)))
        types = {"q_desc": q_type, "do_desc": q_type, "k_desc": kv_type, "v_desc": kv_type, "delta_ptr": "*fp32",
                 "dq_desc": dq_type, "softmax_scale": "fp32", "dq_acc_ptr": "*fp32", "dq_ptr": "*bf16",
                 "counters": "*i32"}
        # dK/dV: TMA descriptors, or pointers where a masked kernel stores from its accumulators
        types["dk_out"] = types["dv_out"] = desc_type(64) if masked_tma_store or not causal else "*bf16"
        constexprs = {"D": head_dim, "BOUND_LEFT": window, "BOUND_RIGHT": causal, "SOFTCAP": softcap}
        if "CAST_DQ" in kernel.arg_names:  # as hopper_bwd decides for 2048 rows of 2 heads per KV head
            constexprs["CAST_DQ"] = bwd_hopper.cast_dq_in_kernel(
                head_dim, 511 if window else -1, 0 if causal else -1, 2, 2048, 2048)
    types |= {"lse_ptr": "*fp32", "qk_scale": "fp32", "softcap_in": "fp32"}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    return f"{spec}: " + ptxas_facts(compiled)


def ptxas_facts(compiled) -> str:
    """Shared memory, ptxas's register and spill lines, and the SASS summary of a compiled kernel."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    facts = [line.split("info    : ")[-1].strip() for line in log.splitlines() if "registers" in line or "spill" in line]
    codes = serialized_wgmma(log)
    if codes:
        facts.append(f"WGMMA SERIALIZED ({', '.join(codes)})")
    return f"shared {compiled.metadata.shared} B | " + " | ".join(facts) + " | " + sass_summary(compiled)


def serialized_wgmma(log: str) -> list[str]:
    """The info codes of ptxas's log lines saying it made the asynchronous warpgroup MMAs wait
    for one another: for want of registers for their operands (C7512), or because other
    instructions touch an accumulator while its MMA may still run (C7514: met with an MMA left
    running across a loop's back edge). The kernel then loses the overlap it was written for
    (docs/performance.md, steps 23 and 24)."""
    return sorted(set(re.findall(r"\((C\d+)\)[^\n]*wgmma\.mma_async instructions are serialized", log)))


def sass_summary(compiled) -> str:
    """Tensor-core and TMA instructions in the SASS triton built (nvdisasm on its cubin): HGMMA
    is Hopper's warpgroup MMA, HMMA the Ampere-style one, UTMALDG/UTMASTG/UTMAREDG TMA loads, stores
    and reduces; and
    the spill stores and loads (STL/LDL) inside loops, which cost every iteration (the spills
    ptxas counts may all sit before or after the loops)."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([nvdisasm, cubin.name], capture_output=True, text=True, check=True).stdout
    ops = [op for _, op, _ in sass_instructions(sass)]
    counts = {op: sum(1 for o in ops if o.split(".")[0] == op)
              for op in ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "UTMAREDG", "MUFU", "FFMA")}
    stores, loads = loop_spills(sass)
    return "SASS " + ", ".join(f"{op} {n}" for op, n in counts.items()) + f", in loops STL {stores} LDL {loads}"


def sass_instructions(sass: str):
    """``(address, opcode, label or None)`` per instruction of nvdisasm's listing; ``label`` is
    the branch target of a BRA. Labels (``.L_x_N:``) take the address of the instruction after
    them: ``sass_labels``."""
    for line in sass.splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*)", line)
        if not match:
            continue
        words = [w for w in match.group(2).split() if not w.startswith("@")]  # drop predicates
        if words and words[0][0].isupper():
            target = re.search(r"`\((\.L_x_\d+)\)", match.group(2))
            yield int(match.group(1), 16), words[0], target.group(1) if target and words[0] == "BRA" else None


def sass_labels(sass: str) -> dict:
    """Label -> the address of the first instruction after it."""
    labels, pending = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        address = re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)
        if address and pending:
            labels.update(dict.fromkeys(pending, int(address.group(1), 16)))
            pending = []
    return labels


def loop_spills(sass: str) -> tuple[int, int]:
    """Spill stores and loads (STL, LDL) inside loops: between a backward branch's target and the
    branch."""
    labels = sass_labels(sass)
    instructions = list(sass_instructions(sass))
    loops = [(labels[target], address) for address, _, target in instructions
             if target in labels and labels[target] <= address]
    inside = [op.split(".")[0] for address, op, _ in instructions if any(lo <= address <= hi for lo, hi in loops)]
    return inside.count("STL"), inside.count("LDL")


def table_specs():
    """Specs of every Hopper table entry at head dims 64, 128 and 256 (``--tables``)."""
    from flashtile import configs

    for name, table in (("SM90", configs.SM90), ("SM90_LONG", configs.SM90_LONG)):
        for (mode, head_dim, causal), cfg in sorted(table.items()):
            if head_dim in (64, 128, 256):
                yield name, (f"{mode},{'causal' if causal else 'full'},{cfg.block_m},{cfg.block_n},{cfg.num_warps},"
                             f"{cfg.num_stages},{head_dim},{int(cfg.kv_as_b)}" + (",tma" if cfg.tma else ""))
    for head_dim, causal in sorted(configs.SM90_GLUON_FWD):
        yield "SM90_GLUON_FWD", f"gluon,{'causal' if causal else 'full'},{head_dim}"
    for head_dim, causal in sorted(configs.SM90_GLUON_FWD_SHORT):
        yield "SM90_GLUON_FWD_SHORT", f"gluon_short,{'causal' if causal else 'full'},{head_dim}"
    for head_dim, causal in sorted(configs.SM90_GLUON_BWD):
        yield "SM90_GLUON_BWD", f"gluon_bwd,{'causal' if causal else 'full'},{head_dim}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("specs", nargs="*")
    parser.add_argument("--tables", action="store_true",
                        help="report every entry of configs.SM90, SM90_LONG, SM90_GLUON_FWD(_SHORT)/BWD")
    args = parser.parse_args()
    specs = [("", spec) for spec in args.specs] + (list(table_specs()) if args.tables else [])
    for table, spec in specs:
        print(f"{table} {report(spec)}".strip(), flush=True)


if __name__ == "__main__":
    main()
