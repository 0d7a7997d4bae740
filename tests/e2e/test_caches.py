"""With Inductor's caches on (the default), a cached graph never answers for a compile with other
passes or options: plain Inductor, rtlynx 2:4 and rtlynx 1:2 each get their own graph, and a rerun
is served the right one from the cache."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys, torch, lynx_compile, torch.nn as nn
    from lynx_compile.kernels import reference
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).eval()
    x = torch.randn(8, 64)

    def expected(n, mm):
        h = reference.sparse_matmul(x, m[0].weight.t(), m[0].bias, n=n, m=mm)
        return reference.sparse_matmul(torch.nn.functional.gelu(h), m[2].weight.t(), m[2].bias, n=n, m=mm)

    with torch.no_grad():
        dense = torch.compile(m, backend="inductor")(x)
        torch.testing.assert_close(dense, m(x))
        for pattern, (n, mm) in (("2:4", (2, 4)), ("1:2", (1, 2))):
            torch._dynamo.reset()
            out = torch.compile(m, backend="rtlynx", options={"min_tokens": 0, "pattern": pattern})(x)
            torch.testing.assert_close(out, expected(n, mm), rtol=1e-5, atol=1e-5)
    print("reports", len(lynx_compile.reports()))
""")


def test_caches_never_mix_up_compiles(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    first = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip() == "reports 2"  # both rtlynx graphs ran the passes
    rerun = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]  # served from the cache, still the right results
    assert rerun.stdout.strip() == "reports 0"  # a cache hit skips the passes (the log says so)
