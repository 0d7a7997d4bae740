"""Every way a user spells a GEMM is caught end to end through Dynamo + Inductor."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import lynx_compile
from lynx_compile.kernels import reference


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.w = nn.Parameter(torch.randn(32, 32) / 6)
        self.b = nn.Parameter(torch.randn(32))

    def forward(self, x, y):
        a = self.proj(x)                                # nn.Linear -> addmm
        b = F.linear(a, self.w, self.b)                 # F.linear -> addmm
        c = b @ self.w.T                                # x @ w.T -> mm
        d = torch.einsum("bsk,nk->bsn", c, self.w)      # einsum with a weight -> bmm
        e = torch.matmul(d, y.transpose(-1, -2))        # activation x input -> bmm
        return torch.einsum("bij,bjk->bik", e, d)       # activation x activation -> bmm


def _expected(model, x, y):
    def sp(a, b, bias=None):
        return reference.sparse_matmul(a, b, bias, n=2, m=4)

    a = sp(x.reshape(-1, 16), model.proj.weight.t(), model.proj.bias)
    b = sp(a, model.w.t(), model.b)
    c = sp(b, model.w.t())
    d = sp(c.reshape(2, 8, 32), model.w.t().expand(2, 32, 32))
    e = sp(d, y.transpose(-1, -2))
    return sp(e, d)


@torch.no_grad()
def test_all_spellings_are_rewritten_through_inductor():
    torch.manual_seed(0)
    model, x, y = Spellings().eval(), torch.randn(2, 8, 16), torch.randn(2, 8, 32)
    out = torch.compile(model, backend="rtlynx", fullgraph=True, options={"min_tokens": 0})(x, y)
    (report,) = lynx_compile.reports()
    assert [(r.name, r.op, r.kind, r.rewritten) for r in report.records] == [
        ("proj", "addmm", "linear", True), ("(root)", "addmm", "linear", True), ("(root)", "mm", "linear", True),
        ("(root)", "bmm", "linear", True), ("(root)", "bmm", "matmul", True), ("(root)", "bmm", "matmul", True)]
    torch.testing.assert_close(out, _expected(model, x, y), rtol=1e-5, atol=1e-4)
