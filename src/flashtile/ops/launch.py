"""Launching compiled kernels without triton's per-call argument binding.

``kernel[grid](...)`` re-derives on every launch which compiled variant its arguments select:
it binds ~45 arguments by name, specializes each one (tensor dtype and 16-byte alignment,
integer divisibility by 16, integers equal to 1), formats the options into a cache key and
looks the key up. On the H100 host that measured 49 us per launch of the forward kernel
(``bench/overhead.py``), longer than the kernel itself for short sequences, and a backward
launches three kernels.

``FastLaunch(kernel)[grid](...)`` takes the same arguments. It keys its own cache on what
triton's specialization reads (``specialization_key``: per argument its Python type, and for
tensors the dtype and alignment, for integers the size class, == 1 and divisibility by 16, for
Gluon tensor descriptors the element type, box and shared layout), asks triton for the compiled
kernel the first time a key is seen, and from then on calls the compiled kernel's launcher
directly. The key is at least as fine as triton's own (a CPU test
holds it against triton's specializer), so a hit always runs the variant triton would have.

Gluon tensor descriptors reach the kernel as TMA descriptors (``CUtensorMap``) that triton's
launch wrapper encodes on every launch, in Python and a driver call per descriptor (seven per
Gluon backward). ``FastLaunch`` calls triton's compiled C launcher itself and keeps each encoded
descriptor, keyed on what it encodes (address, shape, strides; the element type, box and
swizzle are fixed per compiled variant): a training loop's steps, whose tensors the caching
allocator hands out at the same addresses, encode none after the first.

Triton's own path is taken under the interpreter, on triton releases other than the one this
was written against (the compiled kernel's launch interface is internal), while a launch hook is
installed (profilers such as proton hang off it), and where ``configs.FAST_LAUNCH`` is off.
"""

from typing import NamedTuple

import torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from flashtile import configs
from flashtile.ops.common import on_gluon_triton

_INT32_MIN, _INT32_END, _UINT64_MIN = -(2**31), 2**31, 2**63
# Parameter kinds, as triton specializes them.
_CONSTEXPR, _SPECIALIZED, _UNSPECIALIZED = 0, 1, 2


class _Unkeyed(Exception):
    """An argument of a kind this module does not key: the launch takes triton's path."""


def _value_key(value, specialize: bool):
    """What triton's specializer reads of one non-constexpr argument (see the module docstring).

    Integers: size class (i32 / i64 / u64 boundaries), and where specialized, == 1 (turns the
    argument into a constant) and divisibility by 16. Tensors: dtype and data pointer % 16.
    Floats, bools and None: their type alone. Gluon tensor descriptors: element type, box,
    layout (and padding). Anything else raises ``_Unkeyed``."""
    kind = type(value)
    if kind is int:
        size = 0 if _INT32_MIN <= value < _INT32_END else (1 if value < _UINT64_MIN else 2)
        return (size, value == 1, value % 16 == 0) if specialize else size
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if kind is float or kind is bool or value is None:
        return kind
    if kind is _GluonDescriptor:
        # What the specializer writes into the descriptor's type: element type, box and layout
        # (the base pointer, shape and strides reach the launcher as values; the descriptor's
        # checks require a 16-byte aligned base). Padding too, for safety.
        return value.base.dtype, tuple(value.block_shape), value.layout, value.padding
    raise _Unkeyed


def _kinds(kernel: JITFunction) -> tuple:
    return tuple(_CONSTEXPR if p.is_constexpr else _UNSPECIALIZED if p.do_not_specialize else _SPECIALIZED
                 for p in kernel.params)


def specialization_key(kinds: tuple, values, options: tuple) -> tuple:
    """A hashable key for a launch with ``values`` (every parameter, in order, of a kernel whose
    parameters are ``kinds``) and launch ``options`` (``num_warps``, ...): equal keys select the
    same compiled variant. Raises ``_Unkeyed`` for an argument ``_value_key`` does not cover."""
    # Every argument's type (one C-level pass: it tells True, 1 and 1.0 apart, which triton does
    # for constexprs), then per argument what its type leaves open; tensors and integers inline
    # (~45 arguments per launch: the per-argument cost is what this module saves).
    parts = [options, tuple(map(type, values))]
    for kind, value in zip(kinds, values):
        if kind == _CONSTEXPR:
            parts.append(value)
        elif type(value) is torch.Tensor:
            parts.append((value.dtype, value.data_ptr() % 16 == 0))
        else:
            parts.append(_value_key(value, kind == _SPECIALIZED))
    return tuple(parts)


# The compiled kernel's launch interface is internal to triton: the fast path is written against
# one release line (the Gluon kernels' line, ops/common.GLUON_TRITON).
_RELEASE_SUPPORTED = on_gluon_triton()
if _RELEASE_SUPPORTED:
    from triton import knobs
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _GluonDescriptor
    try:  # where the CUDA backend is installed (not needed under the interpreter)
        from triton.backends.nvidia.driver import make_tensordesc_arg as _encode_descriptor
    except ImportError:
        _encode_descriptor = None
else:
    class _GluonDescriptor:  # never instantiated: no argument is keyed as a descriptor
        pass


def _fast_path_available() -> bool:
    """Off under the interpreter, on other triton release lines, while a launch hook is
    installed, and where ``configs.FAST_LAUNCH`` is off."""
    if not (configs.FAST_LAUNCH and _RELEASE_SUPPORTED):
        return False
    runtime = knobs.runtime
    return not (runtime.interpret or runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)


# Encoded TMA descriptors kept per compiled variant; past this many the cache starts over (a
# loop whose tensors never repeat an address would otherwise grow it without bound).
_MAX_ENCODED = 256


class _Direct(NamedTuple):
    """How to call one compiled variant's C launcher without triton's Python wrapper."""
    launch: object  # the compiled launcher (``__triton_launcher.launch``)
    head: tuple  # its arguments between the stream and the kernel's: function, flags, metadata
    descriptors: tuple  # (position among the kernel's arguments, triton's metadata) per descriptor
    encoded: dict  # (position, address, *shape, *strides) -> the descriptor's launcher arguments


def _direct(compiled, values):
    """A ``_Direct`` for ``compiled`` launched with arguments like ``values``, or None where the
    launch needs what only triton's wrapper does (scratch buffers) or is not laid out as this
    triton release lays it out (then every launch takes ``compiled.run``)."""
    run = compiled.run
    scratch = (getattr(run, "global_scratch_size", None), getattr(run, "profile_scratch_size", None))
    if scratch != (0, 0):
        return None
    launch = getattr(run, "launch", None)
    positions = tuple(i for i, value in enumerate(values) if type(value) is _GluonDescriptor)
    if positions:
        # triton wraps the C launcher in a closure that encodes the descriptors (driver.py's
        # wrap_handle_tensordesc): the launcher is its ``launcher`` variable.
        code, cells = getattr(launch, "__code__", None), getattr(launch, "__closure__", None)
        if _encode_descriptor is None or code is None or not cells or "launcher" not in code.co_freevars:
            return None
        launch = cells[code.co_freevars.index("launcher")].cell_contents
        metas = getattr(compiled.metadata, "tensordesc_meta", None) or [None] * len(positions)
        if len(metas) != len(positions):
            return None
    else:
        metas = []
    if not callable(launch) or getattr(launch, "__code__", None) is not None:
        return None  # not the C launcher
    head = (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None, compiled.packed_metadata,
            None, None, None)
    return _Direct(launch, head, tuple(zip(positions, metas)), {})


def _expand(direct: _Direct, values) -> list:
    """``values`` with each descriptor replaced by its launcher arguments (the encoded
    ``CUtensorMap``, shape and strides), encoded once per address, shape and strides."""
    args, start, encoded = [], 0, direct.encoded
    for position, meta in direct.descriptors:
        desc = values[position]
        if meta is None:  # a kernel not lowered to TMA descriptors: the tensor itself, nothing to keep
            expanded = _encode_descriptor(desc, None)
        else:
            key = (position, desc.base.data_ptr(), *desc.shape, *desc.strides)
            expanded = encoded.get(key)
            if expanded is None:
                if len(encoded) >= _MAX_ENCODED:
                    encoded.clear()
                expanded = encoded[key] = _encode_descriptor(desc, meta)
        args += values[start:position]
        args += expanded
        start = position + 1
    args += values[start:]
    return args


# Exact-value keys kept per kernel (``FastLaunch.recent``); past this many the cache starts over
# (a loop whose integer arguments never repeat, varlen's maximum lengths, would grow it without bound).
_MAX_RECENT = 1024


class FastLaunch:
    """``FastLaunch(kernel)[grid](*args, **kwargs)`` launches like ``kernel[grid](...)``. For
    kernels whose arguments are tensors, numbers, None, constexprs and Gluon tensor descriptors
    (any other argument type takes triton's path every time).

    Two caches: ``compiled`` on ``specialization_key`` (what triton's specializer reads), and in
    front of it ``recent`` on the launch's exact values (``exact_key``: each argument's type and
    value, tensors and descriptors as ``specialization_key`` keys them), which a training loop's
    calls repeat: building that key costs about half as much host time as ``specialization_key``
    (its per-argument Python), which runs only when the exact values are new."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = getattr(kernel, "params", ())  # an interpreted kernel has none: triton's path
        self.defaults = tuple(param.default for param in params)
        self.kinds = _kinds(kernel) if isinstance(kernel, JITFunction) else ()
        self.index = {param.name: i for i, param in enumerate(params)}
        self.compiled = {}  # (device, key) -> (triton CompiledKernel, its _Direct or None)
        self.recent = {}  # (device, exact key) -> the same entries
        self.keyed_positions = {}  # the arguments' types -> positions of their tensors and descriptors

    def exact_key(self, values, options) -> tuple:
        """A hashable key of the launch's exact values: every argument's type (so True, 1 and 1.0
        differ), then the values, tensors and descriptors replaced by what ``_value_key`` keeps of
        them (their addresses, shapes and strides are launch-time values). Equal exact keys have
        equal ``specialization_key``s."""
        types = tuple(map(type, values))
        positions = self.keyed_positions.get(types)
        if positions is None:
            positions = self.keyed_positions[types] = tuple(
                i for i, kind in enumerate(types) if issubclass(kind, torch.Tensor) or kind is _GluonDescriptor)
        if positions:
            values = list(values)
            for i in positions:
                value = values[i]
                values[i] = (value.dtype, value.data_ptr() % 16 == 0) if type(value) is torch.Tensor \
                    else _value_key(value, True)
        return options, types, tuple(values)

    def _remember(self, exact, entry):
        if len(self.recent) >= _MAX_RECENT:
            self.recent.clear()
        self.recent[exact] = entry

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launch(grid, args, kwargs)

        return launch

    def _bind(self, args, kwargs):
        """Every parameter's value in signature order, and the launch options as a tuple."""
        values = [*args, *self.defaults[len(args):]]
        options = []
        index = self.index
        for name, value in kwargs.items():
            position = index.get(name)
            if position is None:
                options.append((name, value))
            else:
                values[position] = value
        return values, tuple(options)

    def launch(self, grid, args, kwargs):
        if not (self.kinds and type(grid) is tuple and _fast_path_available()):
            self.kernel[grid](*args, **kwargs)
            return
        device = driver.active.get_current_device()
        values, options = self._bind(args, kwargs)
        exact = (device, self.exact_key(values, options))
        entry = self.recent.get(exact)
        if entry is None:
            try:
                key = (device, specialization_key(self.kinds, values, options))
            except _Unkeyed:
                self.kernel[grid](*args, **kwargs)
                return
            entry = self.compiled.get(key)
            if entry is None:  # first launch of this variant: triton compiles or finds it
                compiled = self.kernel[grid](*args, **kwargs)
                entry = self.compiled[key] = (compiled, _direct(compiled, values))
                self._remember(exact, entry)
                return
            self._remember(exact, entry)
        compiled, direct = entry
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        stream = driver.active.get_current_stream(device)  # as triton's path: torch's current stream
        if direct is not None:
            direct.launch(grid[0], grid_y, grid_z, stream, *direct.head,
                          *(_expand(direct, values) if direct.descriptors else values))
            return
        # The launcher takes the launch metadata and the enter / exit hooks before the arguments:
        # None for all three (no hook is installed, see _fast_path_available).
        compiled.run(grid[0], grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
                     None, None, None, *values)
