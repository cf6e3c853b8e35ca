"""Device diagnostic: lower the prefill kernel once; on failure print the failing frame's locals."""
import sys, traceback
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests/gpu")
from check_kernels import make_case
from pallas_kernels.prefill import ragged_paged_attention as prefill_kernel
from pallas_kernels.reference import ragged_paged_attention as reference
rng = np.random.default_rng(0)
args = make_case(rng, q_lens=[150, 37], ctx_lens=[170, 37], num_q_heads=4, num_kv_heads=2, head_dim=128, block_size=16)
try:
    out = np.asarray(prefill_kernel(*args, scale=0.1), np.float32)
    ref = np.asarray(reference(*args, scale=0.1), np.float32)
    print("DIAG OK rel err", np.linalg.norm(out - ref) / np.linalg.norm(ref))
except Exception as e:
    tb = e.__traceback__
    while tb.tb_next: tb = tb.tb_next
    f = tb.tb_frame
    print("DIAG FAIL", type(e).__name__, e, f.f_code.co_filename, tb.tb_lineno)
    for k, v in f.f_locals.items():
        print("  ", k, "=", str(v)[:1500])
    import inspect
    try: print(inspect.getsource(f.f_code)[:3000])
    except Exception: pass
    # The Mosaic GPU module, with source locations, for the ops that slice shared memory.
    tb = e.__traceback__
    while tb:
        for name, val in list(tb.tb_frame.f_locals.items()):
            if type(val).__name__ == "Module" and hasattr(val, "operation"):
                txt = val.operation.get_asm(enable_debug_info=True)
                for line in txt.splitlines():
                    if "subview" in line or "slice_smem" in line or "async_store" in line or "async_load" in line:
                        print("MLIR", line.strip()[:600])
                tb = None
                break
        else:
            tb = tb.tb_next
            continue
        break
