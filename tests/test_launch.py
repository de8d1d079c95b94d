"""``ops/launch.FastLaunch``: its cache key held against triton's own specializer, and how it binds
a launch's arguments (CPU, with a recording stand-in for the compiled kernel; on a GPU every tl
kernel of the suite launches through it)."""

import itertools

import numpy as np
import pytest
import torch
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction

from flashtile import configs
from flashtile.ops import launch

INTS = [0, 1, 2, 15, 16, 17, 48, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 16,
        2**63 - 16, 2**63, 2**64 - 16]


def tensor_values():
    """Tensors of three dtypes whose data pointers are 16-byte aligned or not."""
    values = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.int32):
        base = torch.zeros(64, dtype=dtype)
        values += [base, base[1:], base[8:], base[16:]]
    return values


def descriptor_values():
    """Gluon TMA descriptors of three dtypes, three boxes and two layouts each, over two views
    (different base pointer, shape and strides: launch-time values, not specialized)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from flashtile.ops.descriptors import shared_layout

    values = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        base = torch.zeros(256, 512, dtype=dtype)
        for block in ((64, 32), (64, 64), (128, 64)):
            narrow = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8 * dtype.itemsize, rank=2)
            for layout in (shared_layout(block, dtype), narrow):
                values += [TensorDescriptor.from_tensor(view, list(block), layout) for view in (base, base[:128, 64:])]
    return values


VALUES = INTS + [0.5, 1.0, 16.0, True, False, None] + tensor_values() + descriptor_values()


def triton_specialization(value, specialize):
    return native_specialize_impl(CUDABackend, value, False, specialize, True)


@pytest.mark.parametrize("specialize", [True, False])
def test_value_key_is_at_least_as_fine_as_triton(specialize):
    """Two arguments with equal keys must select the same compiled variant in triton."""
    keyed = [(launch._value_key(v, specialize), v) for v in VALUES]
    for (key_a, a), (key_b, b) in itertools.combinations(keyed, 2):
        if key_a == key_b:
            assert triton_specialization(a, specialize) == triton_specialization(b, specialize), (a, b)


def test_value_key_tells_apart_what_triton_does():
    """And the key is not coarser in the cases the kernels meet: alignment, dtype, % 16, == 1;
    a descriptor's dtype, box and layout."""
    t = torch.zeros(64, dtype=torch.float16)
    pairs = [(t, t[1:]), (t, t.to(torch.bfloat16)), (16, 17), (1, 17), (2**31 - 16, 2**31)]
    descriptors = descriptor_values()  # dtype-major, then box, layout, view
    pairs += [(descriptors[0], descriptors[12]), (descriptors[0], descriptors[4]), (descriptors[0], descriptors[2])]
    for a, b in pairs:
        assert triton_specialization(a, True) != triton_specialization(b, True)
        assert launch._value_key(a, True) != launch._value_key(b, True)


@pytest.mark.parametrize("value", [np.int64(16), object()], ids=["numpy int", "object"])
def test_value_key_leaves_other_kinds_to_triton(value):
    with pytest.raises(launch._Unkeyed):
        launch._value_key(value, True)


def _kernel(X, n, scale, m, FLAG: tl.constexpr, BLOCK: tl.constexpr = 16):
    pass


class RecordingKernel(JITFunction):
    """A JITFunction whose ``[grid](...)`` records the call and hands back a stand-in compiled kernel
    whose ``run`` records the direct launches."""

    def __init__(self, fn, **kwargs):
        super().__init__(fn, **kwargs)
        self.slow_calls, self.fast_calls = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.slow_calls.append((grid, args, kwargs))
            compiled = type("Compiled", (), {})()
            compiled.function, compiled.packed_metadata = "function", "metadata"
            compiled.run = lambda *launch_args: self.fast_calls.append(launch_args)
            return compiled

        return run


class FakeDriver:
    """``triton.runtime.driver`` on a machine without a GPU: device 0, stream 77."""

    class active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 77)


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(launch, "driver", FakeDriver)
    monkeypatch.setattr(launch, "_fast_path_available", lambda: True)
    kernel = RecordingKernel(_kernel, do_not_specialize=["m"])
    return kernel, launch.FastLaunch(kernel)


def test_fast_launch_binds_arguments_in_signature_order(recording):
    kernel, fast = recording
    x = torch.zeros(32, dtype=torch.float16)
    fast[(3,)](x, 32, 0.5, 7, FLAG=True, num_warps=4)
    assert kernel.slow_calls == [((3,), (x, 32, 0.5, 7), {"FLAG": True, "num_warps": 4})]
    fast[(5, 2)](x, 48, 0.25, 9, FLAG=True, num_warps=4)  # same variant: launched directly
    assert len(kernel.slow_calls) == 1
    (call,) = kernel.fast_calls
    assert call[:9] == (5, 2, 1, 77, "function", "metadata", None, None, None)
    assert call[9:] == (x, 48, 0.25, 9, True, 16)  # the BLOCK default filled in, num_warps left out


@pytest.mark.parametrize("change", ["alignment", "dtype", "not % 16", "== 1", "constexpr", "num_warps"])
def test_fast_launch_sends_a_new_variant_through_triton(recording, change):
    kernel, fast = recording
    x = torch.zeros(32, dtype=torch.float16)
    args, kwargs = [x, 32, 0.5, 7], {"FLAG": True, "num_warps": 4}
    fast[(1,)](*args, **kwargs)
    if change == "alignment":
        args[0] = x[1:]
    elif change == "dtype":
        args[0] = x.float()
    elif change == "not % 16":
        args[1] = 33
    elif change == "== 1":
        args[1] = 1
    elif change == "constexpr":
        kwargs["FLAG"] = 1  # equal to True, but another constexpr value for triton
    else:
        kwargs["num_warps"] = 8
    fast[(1,)](*args, **kwargs)
    assert len(kernel.slow_calls) == 2 and kernel.fast_calls == []


def test_fast_launch_ignores_unspecialized_integer_values(recording):
    kernel, fast = recording
    x = torch.zeros(32, dtype=torch.float16)
    for m in (7, 16, 1, 2**20):  # ``m`` is do_not_specialize: one variant for every value
        fast[(1,)](x, 32, 0.5, m, FLAG=False)
    assert len(kernel.slow_calls) == 1 and len(kernel.fast_calls) == 3


def test_fast_launch_takes_triton_path_when_switched_off(recording, monkeypatch):
    kernel, _ = recording
    monkeypatch.undo()  # the real _fast_path_available: the interpreter (or FAST_LAUNCH) turns it off
    monkeypatch.setattr(configs, "FAST_LAUNCH", False)
    fast = launch.FastLaunch(kernel)
    x = torch.zeros(32, dtype=torch.float16)
    for _ in range(3):
        fast[(1,)](x, 32, 0.5, 7, FLAG=False)
    assert len(kernel.slow_calls) == 3 and kernel.fast_calls == []
    assert not launch._fast_path_available()


def test_fast_launch_sends_unkeyed_arguments_through_triton_every_time(recording):
    kernel, fast = recording
    x = torch.zeros(32, dtype=torch.float16)
    for _ in range(2):
        fast[(1,)](x, np.int64(32), 0.5, 7, FLAG=False)
    assert len(kernel.slow_calls) == 2 and kernel.fast_calls == [] and fast.compiled == {}


def test_fast_launch_repeats_skip_the_specialization_key(recording, monkeypatch):
    """A launch whose exact values were seen before takes its variant from ``recent`` without
    ``specialization_key``; new values of an unspecialized integer go through it once each."""
    kernel, fast = recording
    calls = []
    real = launch.specialization_key
    monkeypatch.setattr(launch, "specialization_key", lambda *args: calls.append(args) or real(*args))
    x = torch.zeros(32, dtype=torch.float16)
    for m in (7, 7, 7, 9, 9, 7):
        fast[(1,)](x, 32, 0.5, m, FLAG=False)
    assert len(calls) == 2 and len(kernel.slow_calls) == 1 and len(kernel.fast_calls) == 5
    assert len(fast.recent) == 2


@pytest.mark.parametrize("second", [1.0, True], ids=["float", "bool"])
def test_fast_launch_exact_key_tells_equal_values_of_other_types_apart(recording, second):
    """1, 1.0 and True are equal and hash alike: the exact key holds each argument's type, so an
    integer argument passed as a float (another kernel signature) is a new variant."""
    kernel, fast = recording
    x = torch.zeros(32, dtype=torch.float16)
    fast[(1,)](x, 1, 0.5, 7, FLAG=False)
    fast[(1,)](x, second, 0.5, 7, FLAG=False)
    assert len(kernel.slow_calls) == 2 and kernel.fast_calls == []


def test_fast_launch_exact_key_reads_alignment_not_address(recording):
    """Tensors enter the exact key as dtype and 16-byte alignment: another tensor at another
    aligned address repeats the key, an unaligned view is a new variant."""
    kernel, fast = recording
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64, dtype=torch.float16)
    for t in (x, y, x[8:], x[1:]):
        fast[(1,)](t, 32, 0.5, 7, FLAG=False)
    assert len(kernel.slow_calls) == 2
    assert [call[9].data_ptr() for call in kernel.fast_calls] == [y.data_ptr(), x[8:].data_ptr()]
    assert len(fast.recent) == 2


def test_fast_launch_bounds_its_exact_keys(recording, monkeypatch):
    kernel, fast = recording
    monkeypatch.setattr(launch, "_MAX_RECENT", 3)
    x = torch.zeros(32, dtype=torch.float16)
    for m in range(5):  # unspecialized: one variant, five exact keys
        fast[(1,)](x, 32, 0.5, m, FLAG=False)
    assert len(kernel.slow_calls) == 1 and len(kernel.fast_calls) == 4
    assert len(fast.recent) == 2  # full at the fourth key: started over with it, then the fifth


def test_specialization_key_tells_constexpr_types_apart():
    kinds = (launch._CONSTEXPR,)
    keys = {launch.specialization_key(kinds, [value], ()) for value in (True, 1, 1.0)}
    assert len(keys) == 3


class CLauncher:
    """Stands in for triton's compiled C launcher (``__triton_launcher.launch``: a callable with no
    Python code): records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


class LaunchWrapper:
    """triton's launch objects around one compiled variant: ``CudaLauncher`` (``run``), whose
    ``launch`` is ``driver.wrap_handle_tensordesc``'s closure over the C launcher when the kernel
    takes descriptors. Calls that go through either wrapper are recorded in ``wrapped``."""

    def __init__(self, takes_descriptors, scratch=0):
        self.c_launcher = CLauncher()
        self.wrapped = []
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True
        launcher, wrapped = self.c_launcher, self.wrapped

        def inner(*args):  # the descriptor-encoding wrapper: must be bypassed
            wrapped.append(args)
            return launcher(*args)

        self.launch = inner if takes_descriptors else launcher

    def __call__(self, *args):
        self.wrapped.append(args)


@pytest.fixture
def direct(monkeypatch):
    """A FastLaunch over a stand-in kernel whose compiled variants carry ``LaunchWrapper``s, and
    the encodings of its descriptors (``encoded``: one entry per encode)."""
    monkeypatch.setattr(launch, "driver", FakeDriver)
    monkeypatch.setattr(launch, "_fast_path_available", lambda: True)
    encoded = []

    def encode(desc, meta):
        encoded.append((desc.base.data_ptr(), tuple(desc.shape), tuple(desc.strides), meta))
        return [f"map{len(encoded)}", *desc.shape, *desc.strides]

    monkeypatch.setattr(launch, "_encode_descriptor", encode)

    class Kernel(JITFunction):
        def __init__(self, fn, scratch):
            super().__init__(fn)
            self.scratch, self.runs = scratch, []

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                compiled = type("Compiled", (), {})()
                compiled.function, compiled.packed_metadata = "function", "metadata"
                takes_descriptors = any(type(a) is launch._GluonDescriptor for a in args)
                compiled.metadata = type("Metadata", (), {"tensordesc_meta": ["meta"] if takes_descriptors else None})
                compiled.run = LaunchWrapper(takes_descriptors, self.scratch)
                self.runs.append(compiled.run)
                return compiled

            return run

    def make(scratch=0):
        kernel = Kernel(_kernel, scratch)
        return kernel, launch.FastLaunch(kernel)

    return make, encoded


def _descriptor(t, rows):
    from flashtile.ops.descriptors import descriptor

    return descriptor(t, (rows, t.numel() // rows), (16, 16))


def test_fast_launch_calls_the_c_launcher_itself(direct):
    make, encoded = direct
    kernel, fast = make()
    x = torch.zeros(32, dtype=torch.float16)
    fast[(3,)](x, 32, 0.5, 7, FLAG=True, num_warps=4)
    fast[(5, 2)](x, 48, 0.25, 9, FLAG=True, num_warps=4)
    (run,) = kernel.runs
    (call,) = run.c_launcher.calls
    assert call[:14] == (5, 2, 1, 77, "function", False, True, None, None, "metadata", None, None, None, x)
    assert call[14:] == (48, 0.25, 9, True, 16)
    assert run.wrapped == [] and encoded == []


def test_fast_launch_encodes_each_descriptor_once(direct):
    """Descriptors reach the C launcher expanded as triton's wrapper expands them (encoded map,
    shape, strides), encoded again only for another address, shape or strides."""
    make, encoded = direct
    kernel, fast = make()
    a, b = torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(64, 64, dtype=torch.bfloat16)
    fast[(1,)](_descriptor(a, 64), 32, 0.5, 7, FLAG=False)  # first launch: triton's path
    for desc in (_descriptor(a, 64), _descriptor(a, 64), _descriptor(b, 64), _descriptor(a, 32), _descriptor(a, 64)):
        fast[(1,)](desc, 32, 0.5, 7, FLAG=False)
    (run,) = kernel.runs
    assert run.wrapped == []
    assert [call[13:18] for call in run.c_launcher.calls] == [
        ("map1", 64, 64, 64, 1), ("map1", 64, 64, 64, 1), ("map2", 64, 64, 64, 1), ("map3", 32, 128, 128, 1),
        ("map1", 64, 64, 64, 1)]
    assert all(call[18:] == (32, 0.5, 7, False, 16) for call in run.c_launcher.calls)
    assert [e[:3] for e in encoded] == [(a.data_ptr(), (64, 64), (64, 1)), (b.data_ptr(), (64, 64), (64, 1)),
                                         (a.data_ptr(), (32, 128), (128, 1))]
    assert {e[3] for e in encoded} == {"meta"}


def test_fast_launch_bounds_its_encoded_descriptors(direct, monkeypatch):
    make, encoded = direct
    monkeypatch.setattr(launch, "_MAX_ENCODED", 3)
    _, fast = make()
    t = torch.zeros(64 * 64, dtype=torch.bfloat16)
    for rows in (64, 32, 16, 8, 64):  # the first through triton; the fifth finds the cache full
        fast[(1,)](_descriptor(t, rows), 32, 0.5, 7, FLAG=False)
    ((_, direct_launch),) = fast.compiled.values()
    assert [e[1] for e in encoded] == [(32, 128), (16, 256), (8, 512), (64, 64)]
    assert [key[2:4] for key in direct_launch.encoded] == [(64, 64)]  # started over, then kept the fifth


def test_fast_launch_leaves_scratch_kernels_to_triton(direct):
    """A variant that needs a scratch buffer (device-side descriptors) launches through triton's
    wrapper, which allocates it."""
    make, _ = direct
    kernel, fast = make(scratch=128)
    x = torch.zeros(32, dtype=torch.float16)
    for _ in range(3):
        fast[(1,)](x, 32, 0.5, 7, FLAG=False)
    (run,) = kernel.runs
    assert len(run.wrapped) == 2 and run.c_launcher.calls == []
