"""ctypes binding of cuda/ffa_capi.cu (our flexible flash attention kernels) for tests and benchmarks.

Tensors are torch CUDA tensors, contiguous (T, H, D); lse is (T, H) fp32. Build the library with
scripts/bench/build_ffa_lib.sh (or set FFA_LIB to its path).
"""
import ctypes
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))

MASKS = {"full": 0, "causal": 1, "inv_causal": 2, "bi_causal": 3}
_DT = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _load():
    path = os.environ.get("FFA_LIB", os.path.join(_ROOT, "build-ffa", "libffa.so"))
    lib = ctypes.CDLL(path)
    vp, i64, i32, f32, cp = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_char_p
    lib.ffa_c_plan_create.restype = vp
    lib.ffa_c_plan_create.argtypes = [ctypes.POINTER(i64), i32, i64, i64, i32, cp, i32]
    lib.ffa_c_forward_tile_q.restype = i32
    lib.ffa_c_forward_tile_q.argtypes = [i32, i32]
    lib.ffa_c_plan_destroy.argtypes = [vp]
    lib.ffa_c_plan_stats.argtypes = [vp, ctypes.POINTER(i64)]
    lib.ffa_c_forward.argtypes = [vp, i32, i32, i32, i32, vp, vp, vp, vp, vp, f32, i32, vp, cp, i32]
    lib.ffa_c_workspace_bytes.restype = ctypes.c_size_t
    lib.ffa_c_workspace_bytes.argtypes = [i64, i32, i32, i32]
    lib.ffa_c_backward.argtypes = [vp, i32, i32, i32, i32] + [vp] * 9 + [f32, i32, i32, vp, vp, cp, i32]
    lib.ffa_c_merge.argtypes = [i32, i64, i32, i32] + [vp] * 7 + [cp, i32]
    return lib


_lib = None


def lib():
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def _err():
    return ctypes.create_string_buffer(512)


def _check(rc, err):
    if rc != 0:
        raise RuntimeError(err.value.decode())


def _stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def forward_tile_q(kernel, d):
    """Rows per q-side plan item that forward kernel `kernel` needs at head dim d (192 for kernels 3 and 5
    at D=64, else 128): pass it as Plan(..., fwd_tile_q=...) for that kernel."""
    return lib().ffa_c_forward_tile_q(int(kernel), int(d))


class Plan:
    """Host plan + its device copy for one slice list: [(qs, qe, ks, ke, mask_name_or_int), ...].
    fwd_tile_q: rows per q-side item (0: the default 128, what kernels 0-2 and the backward use)."""

    def __init__(self, slices, num_q, num_k, fwd_tile_q=0):
        flat = []
        for s in slices:
            m = MASKS[s[4]] if isinstance(s[4], str) else int(s[4])
            flat += [int(s[0]), int(s[1]), int(s[2]), int(s[3]), m]
        arr = (ctypes.c_int64 * max(1, len(flat)))(*flat)
        err = _err()
        self.handle = lib().ffa_c_plan_create(arr, len(slices), num_q, num_k, int(fwd_tile_q), err, 512)
        if not self.handle:
            raise ValueError(err.value.decode())
        self.num_q, self.num_k = num_q, num_k

    def stats(self):
        out = (ctypes.c_int64 * 9)()
        lib().ffa_c_plan_stats(self.handle, out)
        keys = ["visible_pairs", "q_items", "q_runs", "q_full", "q_masked", "k_items", "k_runs", "k_full", "k_masked"]
        return dict(zip(keys, list(out)))

    def __del__(self):
        if getattr(self, "handle", None) and _lib is not None:
            _lib.ffa_c_plan_destroy(self.handle)
            self.handle = None


def _p(t):
    return ctypes.c_void_p(t.data_ptr())


def forward(plan, q, k, v, scale=0.0, out=None, lse=None, kernel=0):
    """kernel: 0 TMA + wgmma (default), 1 wgmma with cp.async loads, 2 mma.sync fallback, 3 v8 (TMA with
    intra-warpgroup overlap; its plan needs fwd_tile_q=forward_tile_q(3, d)), 5 v10 (v8 on a persistent grid,
    the same plan as 3)."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(tq, hq, device=q.device, dtype=torch.float32) if lse is None else lse
    err = _err()
    rc = lib().ffa_c_forward(plan.handle, _DT[q.dtype], hq, hkv, d, _p(q), _p(k), _p(v), _p(out), _p(lse),
                             float(scale), int(kernel), _stream(), err, 512)
    _check(rc, err)
    return out, lse


def backward(plan, dout, q, k, v, out, lse, scale=0.0, deterministic=False, grads=None, kernel=5):
    """kernel: 5 TMA warp-specialized dK/dV with dQ writer warps (v8-bwd; the default here and in flexcp;
    deterministic runs 1), 1 wgmma + cp.async, 2 mma.sync. 0 and 3 (v7 TMA, 128- / 64-query steps) and 4
    (ping-pong) were removed: the library rejects them."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    if grads is None:
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    dq, dk, dv = grads
    nbytes = lib().ffa_c_workspace_bytes(tq, hq, d, int(deterministic))
    ws = torch.empty(max(nbytes, 256), dtype=torch.uint8, device=q.device)
    err = _err()
    rc = lib().ffa_c_backward(plan.handle, _DT[q.dtype], hq, hkv, d, _p(q), _p(k), _p(v), _p(out), _p(dout),
                              _p(lse), _p(dq), _p(dk), _p(dv), float(scale), int(deterministic), int(kernel), _p(ws),
                              _stream(), err, 512)
    _check(rc, err)
    return dq, dk, dv


def merge(o1, lse1, o2, lse2, out=None, lse=None):
    t, h, d = o1.shape
    out = torch.empty_like(o1) if out is None else out
    lse = torch.empty_like(lse1) if lse is None else lse
    err = _err()
    rc = lib().ffa_c_merge(_DT[o1.dtype], t, h, d, _p(o1), _p(lse1), _p(o2), _p(lse2), _p(out), _p(lse),
                           _stream(), err, 512)
    _check(rc, err)
    return out, lse
