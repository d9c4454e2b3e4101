"""The emulator itself: MLX's signature rules, the semantics of what the shim models, and
loud refusals/faults for what it does not (so a passing emulation means something)."""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest
from build_tools import needs_gxx

from metal_emulator import KernelFault, UnsupportedConstruct, metal_kernel

pytestmark = needs_gxx


def run(source, inputs, out_shape=(64,), grid=(64, 1, 1), tg=(32, 1, 1), dtype=mx.float32,
        template=None, names=("x",), header=""):
    k = metal_kernel("t", list(names), ["out"], source, header=header)
    return k(inputs=inputs, template=template, grid=grid, threadgroup=tg,
             output_shapes=[out_shape], output_dtypes=[dtype])[0]


def test_signature_follows_mlx_rules():
    body = "out[0] = big[0] + tiny[0] + s + big_shape[1] + big_strides[0] + dispatch_threads_per_threadgroup.x;"
    k = metal_kernel("sig", ["big", "tiny", "s"], ["out"], body)
    src = k.metal_source([mx.zeros((4, 8), mx.float16), mx.zeros((3,)), mx.array(2)],
                         [("T", mx.bfloat16), ("N", 3), ("FLAG", True)], [mx.float32])
    assert src.startswith("template <typename T, int N, bool FLAG>\n[[kernel]] void custom_kernel_sig(\n")
    assert src.split(") {\n")[0].splitlines()[2:] == [
        "  const device float16_t* big [[buffer(0)]],",
        "  const constant int* big_shape [[buffer(1)]],",
        "  const constant int64_t* big_strides [[buffer(2)]],",
        "  const constant float* tiny [[buffer(3)]],",       # < 8 elements: constant
        "  const constant int32_t& s [[buffer(4)]],",        # 0-d: reference
        "  device float* out [[buffer(5)]],",
        # substring rule: dispatch_threads_per_threadgroup also brings threads_per_threadgroup
        "  uint3 dispatch_threads_per_threadgroup [[dispatch_threads_per_threadgroup]],",
        "  uint3 threads_per_threadgroup [[threads_per_threadgroup]]",
    ]


def test_attributes_on_a_3d_grid():
    body = """
    uint3 g = thread_position_in_grid, t = thread_position_in_threadgroup;
    uint3 tg = threadgroup_position_in_grid, n = threadgroups_per_grid;
    uint i = (g.z * threads_per_grid.y + g.y) * threads_per_grid.x + g.x;
    out[i * 4 + 0] = thread_index_in_threadgroup;
    out[i * 4 + 1] = simdgroup_index_in_threadgroup * 32 + thread_index_in_simdgroup;
    out[i * 4 + 2] = (tg.z * n.y + tg.y) * n.x + tg.x;
    out[i * 4 + 3] = (t.z * threads_per_threadgroup.y + t.y) * threads_per_threadgroup.x + t.x;
    """
    out = np.array(run(body, [mx.zeros(1)], (4 * 6 * 8 * 4,), (8, 6, 4), (4, 2, 2), mx.uint32))
    out = out.reshape(4, 6, 8, 4)  # z, y, x, field
    z, y, x = np.meshgrid(np.arange(4), np.arange(6), np.arange(8), indexing="ij")
    local = (z % 2) * 8 + (y % 2) * 4 + x % 4
    np.testing.assert_array_equal(out[..., 0], local)
    np.testing.assert_array_equal(out[..., 1], local)
    np.testing.assert_array_equal(out[..., 2], ((z // 2) * 3 + y // 2) * 2 + x // 4)
    np.testing.assert_array_equal(out[..., 3], local)


def test_simdgroup_collectives():
    body = """
    uint i = thread_position_in_grid.x, lane = thread_index_in_simdgroup;
    float v = x[i];
    out[i * 8 + 0] = metal::simd_sum(v);
    out[i * 8 + 1] = metal::simd_max(v);
    out[i * 8 + 2] = metal::simd_min(v);
    out[i * 8 + 3] = metal::simd_shuffle(v, (lane * 7) % 32);
    out[i * 8 + 4] = metal::simd_shuffle_xor(v, 5);
    out[i * 8 + 5] = metal::simd_shuffle_down(v, 3);
    out[i * 8 + 6] = metal::simd_shuffle_up(v, 2);
    out[i * 8 + 7] = metal::simd_broadcast(v, 9);
    """
    x = mx.random.normal((64,))
    out = np.array(run(body, [x], (64 * 8,))).reshape(2, 32, 8)
    xs = np.array(x).reshape(2, 32)
    lane = np.arange(32)
    for s in range(2):
        v = xs[s]
        # Float sums depend on the order; bound the error by the magnitudes summed, not the sum.
        np.testing.assert_allclose(out[s, :, 0], v.sum(), rtol=0, atol=1e-6 * np.abs(v).sum())
        assert np.all(out[s, :, 0] == out[s, 0, 0])  # every lane gets the same value
        np.testing.assert_array_equal(out[s, :, 1], v.max())
        np.testing.assert_array_equal(out[s, :, 2], v.min())
        np.testing.assert_array_equal(out[s, :, 3], v[(lane * 7) % 32])
        np.testing.assert_array_equal(out[s, :, 4], v[lane ^ 5])
        np.testing.assert_array_equal(out[s, :, 5], np.where(lane + 3 < 32, v[np.minimum(lane + 3, 31)], v))
        np.testing.assert_array_equal(out[s, :, 6], np.where(lane >= 2, v[lane - 2], v))
        np.testing.assert_array_equal(out[s, :, 7], v[9])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_types_round_trip_and_round_to_nearest(dtype):
    body = "uint i = thread_position_in_grid.x; out[i] = T(float(x[i]) * 1.0009765625f);"
    x = (mx.random.normal((64,)) * 100).astype(dtype)
    out = run(body, [x], dtype=dtype, template=[("T", dtype)])
    assert mx.array_equal(out, (x.astype(mx.float32) * 1.0009765625).astype(dtype)).item()


def test_threadgroup_memory_is_shared_and_poisoned():
    shared = "threadgroup float buf[32]; uint i = thread_position_in_grid.x, t = thread_index_in_threadgroup;\n"
    with_barrier = shared + "buf[t] = x[i]; threadgroup_barrier(mem_flags::mem_threadgroup); out[i] = buf[31 - t];"
    x = mx.arange(64, dtype=mx.float32)
    out = run(with_barrier, [x])
    assert mx.array_equal(out, mx.concatenate([x[:32][::-1], x[32:][::-1]])).item()
    missing_barrier = shared + "buf[t] = x[i]; out[i] = buf[31 - t];"
    assert mx.isnan(run(missing_barrier, [x])).any().item()  # read before written: poison
    unread = shared + "out[i] = buf[t];"
    assert mx.isnan(run(unread, [x])).all().item()


def test_unwritten_outputs_stay_poisoned():
    out = run("uint i = thread_position_in_grid.x; if (i < 60) out[i] = x[i];", [mx.zeros(64)])
    assert mx.isnan(out[60:]).all().item() and not mx.isnan(out[:60]).any().item()


@pytest.mark.parametrize("body, match", [
    ("out[thread_position_in_grid.x] = simd_prefix_exclusive_sum(x[0]);", "prefix scans"),
    ("atomic_fetch_add_explicit(out, 1.0f, memory_order_relaxed);", "atomics"),
    ("out[0] = quad_sum(x[0]);", "quad-groups"),
    ("out[0] = metal::erf(x[0]);", "metal::erf"),
    ("float4 a = float4(1.0f); out[0] = a.xyz.x;", "swizzles"),
    ("out[0] = x[0] + 1.0h;", "half literals"),
    ("out[0] = *((device const float*)x);", "casts to address-space pointers"),
    ("simdgroup_float8x8 m; out[0] = x[0];", "simdgroup matrices"),
])
def test_unmodeled_constructs_are_refused(body, match):
    with pytest.raises(UnsupportedConstruct, match=match):
        run(body, [mx.zeros(64)])


def test_atomic_outputs_are_refused():
    with pytest.raises(UnsupportedConstruct, match="atomic_outputs"):
        metal_kernel("t", ["x"], ["out"], "out[0] = 0;", atomic_outputs=True)


@pytest.mark.parametrize("body, match", [
    ("out[thread_position_in_grid.x] = x[thread_position_in_grid.x + 1];", "out-of-bounds access to buffer `x`"),
    ("const device float* p = x + thread_position_in_grid.x; out[0] = p[64];", "out-of-bounds"),
    ("threadgroup float b[8]; b[thread_index_in_threadgroup] = 0; out[0] = 0;", "threadgroup array index"),
    ("if (thread_index_in_threadgroup == 3) return;\nthreadgroup_barrier(mem_flags::mem_threadgroup);",
     "threadgroup_barrier at kernel line 2"),
    ("float v = x[0]; if (thread_index_in_simdgroup < 16) v = metal::simd_sum(v); out[0] = v;",
     "divergent simdgroups"),
])
def test_kernel_faults_are_reported(body, match):
    with pytest.raises(KernelFault, match=match):
        run(body, [mx.zeros(64)])


def test_non_uniform_grids_only_for_grid_only_kernels():
    x = mx.arange(50, dtype=mx.float32)
    out = run("uint i = thread_position_in_grid.x; out[i] = x[i] * 2;", [x], (50,), (50, 1, 1))
    assert mx.array_equal(out, x * 2).item()
    with pytest.raises(KernelFault, match="non-uniform threadgroups"):
        run("out[thread_position_in_grid.x] = threadgroup_position_in_grid.x;", [x], (50,), (50, 1, 1))
