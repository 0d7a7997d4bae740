import pytest
import torch

import lynx_compile


@pytest.fixture(autouse=True)
def fresh_compile_state(tmp_path, monkeypatch):
    """Each test compiles from scratch: Inductor's caches skip custom passes on a hit."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_cache"))
    monkeypatch.delenv("LYNX_DUMP_DIR", raising=False)
    torch._dynamo.reset()
    lynx_compile.clear_reports()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()
