"""streamprune.methods against direct computations on tiny matrices (selection, RIA, DSnoT, SparseGPT, OWL)."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch

from streamprune.errors import StreamPruneError
from streamprune.methods import RIA, Structure, Wanda, select
from streamprune.methods.dsnot import dsnot_refine
from streamprune.methods.owl import owl_outlier_ratio, owl_sparsities, spread_weighted
from streamprune.methods.ria import column_abs_sum, ria_rows
from streamprune.methods.admm import ADMM, admm_prune, schedule
from streamprune.methods.sparsegpt import sparsegpt_prune
from streamprune.statistics import BlockStatistics, ChannelMoments, HessianStats


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def wanda_mask(w, s, sparsity, structure, row_chunk=0):
    return Wanda().prune(w, SimpleNamespace(sq_norm=s), sparsity, structure, row_chunk).mask


def ria_mask(w, s, sparsity, structure, row_chunk=0):
    return RIA().prune(w, SimpleNamespace(sq_norm=s), sparsity, structure, row_chunk).mask


def ria_score(w, s, alpha=0.5):
    col = column_abs_sum(w)
    col = torch.where(col == 0, torch.ones_like(col), col).reshape(1, -1)
    return ria_rows(w, col, s.float().sqrt().reshape(1, -1) ** alpha)


# ------------------------------------------------------------------------------------------------ selection

@pytest.mark.parametrize("structure", [Structure(), Structure(2, 4)])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.05])
def test_select_is_a_stable_ascending_sort(structure, sparsity):
    """Unstructured: per row the k smallest, ties broken towards the lower index; many exact ties on purpose."""
    g = _gen(5)
    metric = torch.randint(0, 6, (40, 64), generator=g).float()  # six values: ties everywhere
    metric[7] = 1.0                                               # a row that is one long tie
    metric[9, :32] = torch.rand(32, generator=g)
    got = select(metric, sparsity, structure)
    if structure.is_nm:
        groups = metric.reshape(40, -1, 4)
        want = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, torch.topk(groups, 2, -1, largest=False)[1], True)
        assert torch.equal(got, want.reshape(40, 64)) and _nm_ok(got, 2, 4)
        return
    k = int(64 * sparsity)
    want = torch.zeros_like(metric, dtype=torch.bool)
    for i in range(40):
        order = sorted(range(64), key=lambda j: (float(metric[i, j]), j))
        want[i, order[:k]] = True
    assert torch.equal(got, want)


def _nm_ok(mask, n, m):
    return bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all())


# ------------------------------------------------------------------------------------------------ RIA

def _ria_by_hand(w, s, alpha):
    out, inp = w.shape
    res = torch.zeros(out, inp, dtype=torch.float64)
    for i in range(out):
        for j in range(inp):
            col = sum(abs(float(w[k, j])) for k in range(out))
            row = sum(abs(float(w[i, k])) for k in range(inp))
            a = abs(float(w[i, j]))
            res[i, j] = (a / col + a / row) * float(s[j]) ** (alpha / 2)
    return res


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_ria_score_matches_hand_formula(alpha):
    g = _gen(0)
    w = torch.randn(5, 8, generator=g)
    s = torch.rand(8, generator=g) * 3 + 0.1
    got = ria_score(w, s, alpha)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _ria_by_hand(w, s, alpha), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_ria_unstructured_mask_is_brute_force_per_row(sparsity):
    g = _gen(1)
    w = torch.randn(6, 10, generator=g, dtype=torch.float16)
    s = torch.rand(10, generator=g) + 0.05
    score = _ria_by_hand(w.float(), s, 0.5)
    k = int(10 * sparsity)
    want = torch.zeros(6, 10, dtype=torch.bool)
    for i in range(6):
        order = sorted(range(10), key=lambda j: (float(score[i, j]), j))
        want[i, order[:k]] = True
    for chunk in (0, 1, 4):
        assert torch.equal(ria_mask(w, s, sparsity, Structure(), row_chunk=chunk), want)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_ria_nm_valid_and_brute_force(n, m):
    g = _gen(3)
    w = torch.randn(7, 16, generator=g)
    s = torch.rand(16, generator=g) + 0.05
    score = _ria_by_hand(w, s, 0.5)
    got = ria_mask(w, s, 0.5, Structure(n, m), row_chunk=3)
    assert _nm_ok(got, n, m)
    for i in range(7):
        for g0 in range(0, 16, m):
            order = sorted(range(g0, g0 + m), key=lambda j: float(score[i, j]))
            assert set(torch.nonzero(got[i, g0:g0 + m]).flatten().add(g0).tolist()) == set(order[:n])


# ------------------------------------------------------------------------------------------------ DSnoT

def _dsnot_setup(seed, out=16, inp=64, tokens=512, shift=1.0):
    g = _gen(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(tokens, inp, generator=g) * (torch.rand(inp, generator=g) + 0.2) \
        + shift * torch.randn(inp, generator=g)
    mean, var, sq = x.mean(0), x.var(0, unbiased=False), (x ** 2).mean(0)
    return w, x, mean, var, sq


def _expected_error(w, mask, mean):
    return (w.double() * mean.double() * mask).sum(1)


@pytest.mark.parametrize("structure", [Structure(), Structure(2, 4), Structure(4, 8)])
def test_dsnot_keeps_sparsity_and_structure(structure):
    w, _, mean, var, sq = _dsnot_setup(10)
    mask0 = wanda_mask(w, sq, 0.6, structure)
    mask = dsnot_refine(w, mask0, mean, var, sq, max_cycles=30, update_threshold=0.0, structure=structure)
    assert mask.dtype == torch.bool and not torch.equal(mask, mask0)
    assert torch.equal(mask.sum(1), mask0.sum(1))
    if structure.is_nm:
        assert _nm_ok(mask, structure.n, structure.m)
    # only initially pruned weights are regrown and only initially kept ones are pruned
    assert bool((mask & ~mask0).sum(1).eq((~mask & mask0).sum(1)).all())


@pytest.mark.parametrize("structure", [Structure(), Structure(2, 4)])
def test_dsnot_never_increases_expected_error(structure):
    for seed in range(3):
        w, _, mean, var, sq = _dsnot_setup(20 + seed)
        mask0 = wanda_mask(w, sq, 0.5, structure)
        e0 = _expected_error(w, mask0, mean).abs()
        for cycles in (1, 3, 50):
            e1 = _expected_error(w, dsnot_refine(w, mask0, mean, var, sq, max_cycles=cycles, update_threshold=0.0,
                                                 structure=structure), mean).abs()
            assert bool((e1 <= e0 * (1 + 1e-5) + 1e-6).all())
        assert float(e1.sum()) < 0.5 * float(e0.sum())


def test_dsnot_row_chunks_and_threshold():
    w, _, mean, var, sq = _dsnot_setup(30)
    mask0 = wanda_mask(w, sq, 0.5, Structure())
    full = dsnot_refine(w, mask0, mean, var, sq, update_threshold=0.0)
    for chunk in (1, 5):
        assert torch.equal(dsnot_refine(w, mask0, mean, var, sq, update_threshold=0.0, row_chunk=chunk), full)
    # a threshold above every |e| leaves the mask untouched
    big = float(_expected_error(w, mask0, mean).abs().max()) + 1
    assert torch.equal(dsnot_refine(w, mask0, mean, var, sq, update_threshold=big), mask0)


def test_dsnot_reduces_reconstruction_error_with_nonzero_mean_inputs():
    w, x, mean, var, sq = _dsnot_setup(40, out=32, inp=128, tokens=2048, shift=1.5)
    for structure, sparsity in ((Structure(), 0.6), (Structure(2, 4), 0.5)):
        mask0 = wanda_mask(w, sq, sparsity, structure)
        mask = dsnot_refine(w, mask0, mean, var, sq, update_threshold=0.0, structure=structure)

        def err(mk):
            return float(torch.linalg.norm(x @ w.t() - x @ (w * ~mk).t()))
        assert err(mask) < 0.9 * err(mask0)


def _improve_row(w, m0, mean, var, sq, cycles, thr, pow_, n_m):
    """One row of the 'improve' rule, written as a plain Python loop."""
    c = len(w)
    d = [float(w[j]) * float(mean[j]) for j in range(c)]
    key = [d[j] / float(var[j]) ** pow_ for j in range(c)]
    wan = [abs(float(w[j])) * float(sq[j]) ** 0.5 for j in range(c)]
    pruned0 = [bool(m0[j]) for j in range(c)]
    cur = list(pruned0)
    e = sum(d[j] for j in range(c) if pruned0[j])
    rg = [sorted([j for j in range(c) if pruned0[j] and d[j] > 0], key=lambda j: (-key[j], j)),
          sorted([j for j in range(c) if pruned0[j] and d[j] < 0], key=lambda j: (key[j], j))]
    pr = [sorted([j for j in range(c) if not pruned0[j] and d[j] < 0], key=lambda j: (wan[j], j)),
          sorted([j for j in range(c) if not pruned0[j] and d[j] > 0], key=lambda j: (wan[j], j))]
    prg, ppr = [0, 0], [0, 0]
    for _ in range(cycles):
        side = 0 if e > 0 else 1
        if abs(e) <= thr or prg[side] >= len(rg[side]):
            break
        r = rg[side][prg[side]]
        if n_m:
            m = n_m
            group = [j for j in range(r - r % m, r - r % m + m)
                     if not pruned0[j] and not cur[j] and (d[j] < 0 if side == 0 else d[j] > 0)]
            if not group:
                prg[side] += 1
                continue
            p = min(group, key=lambda j: (wan[j], j))
        else:
            if ppr[side] >= len(pr[side]):
                break
            p = pr[side][ppr[side]]
        e_new = e - d[r] + d[p]
        if abs(e_new) >= abs(e):
            break
        cur[r], cur[p], e = False, True, e_new
        prg[side] += 1
        if not n_m:
            ppr[side] += 1
    return cur


@pytest.mark.parametrize("structure", [Structure(), Structure(2, 4)])
def test_dsnot_improve_matches_loop(structure):
    w, _, mean, var, sq = _dsnot_setup(50, out=12, inp=32)
    mask0 = wanda_mask(w, sq, 0.5, structure)
    got = dsnot_refine(w, mask0, mean, var, sq, max_cycles=12, update_threshold=0.05, pow_of_var_regrowing=1.0,
                       structure=structure)
    for i in range(12):
        want = _improve_row(w[i], mask0[i], mean, var, sq, 12, 0.05, 1.0, structure.m)
        assert got[i].tolist() == want, i


def test_channel_moments_match_reference_definitions():
    g = _gen(70)
    batches = [torch.randn(1, 7, 5, generator=g) + 2, torch.randn(2, 7, 5, generator=g), torch.randn(9, 5, generator=g)]
    st = ChannelMoments(5)
    for b in batches:
        st.add(b)
    flat = [b.reshape(-1, 5).double() for b in batches]
    allx = torch.cat(flat)
    torch.testing.assert_close(st.mean.double(), allx.mean(0), rtol=1e-5, atol=1e-6)
    pooled_within = sum(f.var(0, unbiased=False) * f.shape[0] for f in flat) / allx.shape[0]
    torch.testing.assert_close(st.var.double(), pooled_within, rtol=1e-5, atol=1e-6)
    assert st.nsamples == 4 and st.ntokens == allx.shape[0]
    torch.testing.assert_close(st.sum_mean.double(), allx.sum(0) / 4, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ SparseGPT

def test_hessian_stats_is_two_over_n_sum_xtx():
    g = _gen(80)
    batches = [torch.randn(1, 6, 4, generator=g), torch.randn(3, 6, 4, generator=g), torch.randn(5, 4, generator=g)]
    hs = HessianStats(4)
    for b in batches:
        hs.add(b)
    allx = torch.cat([b.reshape(-1, 4).double() for b in batches])
    assert hs.nsamples == 5 and hs.H.dtype == torch.float32
    torch.testing.assert_close(hs.H.double(), 2 / 5 * allx.t() @ allx, rtol=1e-5, atol=1e-5)


def test_block_statistics_hooks():
    """The hooks see each linear's input; after the first forward, later ones stop after the last linear."""
    block = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x = torch.randn(2, 5, 6, generator=_gen(79))
    with torch.no_grad(), BlockStatistics(block, frozenset({"sq_norm", "moments", "hessian"})) as stats:
        block(x)
        stats.forward_done()
        with pytest.raises(Exception) as stop:
            block(x)
    assert type(stop.value).__name__ == "StopForward"
    flat = x.reshape(-1, 6)
    st = stats.stats[("0.weight", None)]
    torch.testing.assert_close(st.hessian.H, 2 / 4 * flat.t() @ flat * 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.moments.sum_mean, flat.sum(0) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.sq_norm, (flat ** 2).sum(0) / 2, rtol=1e-5, atol=1e-6)
    hidden = torch.relu(flat @ block[0].weight.t() + block[0].bias)
    torch.testing.assert_close(stats.stats[("2.weight", None)].sq_norm, (hidden ** 2).sum(0) / 2, rtol=1e-5, atol=1e-5)  # both passes counted
    assert not block[0]._forward_pre_hooks  # removed on exit


def _calib(seed, inp, tokens=256):
    g = _gen(seed)
    x = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    hs = HessianStats(inp)
    for t in range(0, tokens, 32):
        hs.add(x[t:t + 32].unsqueeze(0))
    return x, hs.H


def _obs_loop(w, H, sparsity, n, m, blocksize, percdamp=0.01):
    """Textbook sequential OBS in float64, one column at a time, with the explicit inverse of the Hessian
    restricted to the not yet processed columns (no Cholesky, no lazy block updates)."""
    W = w.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    hdiag = [float(torch.linalg.inv(H[j:, j:])[0, 0]) for j in range(cols)]
    mask = torch.zeros(W.shape, dtype=torch.bool)
    for i in range(cols):
        if not n and i % blocksize == 0:
            blk = range(i, min(i + blocksize, cols))
            sal = torch.stack([W[:, j] ** 2 / hdiag[j] for j in blk], 1)
            thresh = sorted(sal.flatten().tolist())[int(sal.numel() * sparsity)]
            mask[:, i:i + len(blk)] = sal <= thresh
        if n and i % m == 0:
            sal = torch.stack([W[:, j] ** 2 / hdiag[j] for j in range(i, i + m)], 1)
            for r in range(W.shape[0]):
                for j in sorted(range(m), key=lambda j: float(sal[r, j]))[:n]:
                    mask[r, i + j] = True
        hinv = torch.linalg.inv(H[i:, i:])
        q = torch.where(mask[:, i], torch.zeros_like(W[:, i]), W[:, i])
        W[:, i:] -= ((W[:, i] - q) / hinv[0, 0])[:, None] * hinv[0][None, :]
        W[:, i] = q
    return W, mask


@pytest.mark.parametrize("structure,blocksize", [(Structure(), 10), (Structure(), 24), (Structure(2, 4), 8)])
def test_sparsegpt_matches_sequential_obs(structure, blocksize):
    x, H = _calib(81, 24)
    w = torch.randn(6, 24, generator=_gen(82))
    new, mask = sparsegpt_prune(w, H, 0.5, structure, blocksize=blocksize)
    want_w, want_mask = _obs_loop(w, H, 0.5, structure.n, structure.m, blocksize)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(new.double(), want_w, rtol=1e-4, atol=1e-4)


def test_sparsegpt_sparsity_nm_and_reconstruction():
    x, H = _calib(83, 64, tokens=512)
    w = torch.randn(16, 64, generator=_gen(84))
    new, mask = sparsegpt_prune(w, H, 0.5, Structure(), blocksize=16)
    for b in range(0, 64, 16):       # the reference's per-block rule: int(numel * sparsity) + 1 (no ties here)
        assert int(mask[:, b:b + 16].sum()) == int(16 * 16 * 0.5) + 1
    assert bool((new[mask] == 0).all())
    ref = x @ w.t()
    masked_only = float(torch.linalg.norm(ref - x @ (w * ~mask).t()))
    assert float(torch.linalg.norm(ref - x @ new.t())) < 0.8 * masked_only

    new, mask = sparsegpt_prune(w, H, 0.5, Structure(2, 4), blocksize=16)
    assert _nm_ok(mask, 2, 4) and bool((new[mask] == 0).all())
    assert float(torch.linalg.norm(ref - x @ new.t())) < float(torch.linalg.norm(ref - x @ (w * ~mask).t()))


def _dead_column_case(seed, dead, rows):
    """A 16-input Hessian whose input `dead` is always 0, a float16 weight of `rows` rows, and a copy of H."""
    x, _ = _calib(seed, 16)
    x[:, dead] = 0
    hs = HessianStats(16)
    hs.add(x.unsqueeze(0))
    return hs, torch.randn(rows, 16, generator=_gen(seed + 1)).half(), hs.H.clone()


def test_sparsegpt_dead_columns_and_dtype():
    hs, w, H0 = _dead_column_case(85, 3, 5)
    new, mask = sparsegpt_prune(w, hs.H, 0.5, Structure(2, 4), blocksize=8)
    assert torch.equal(hs.H, H0)                      # the caller's H is untouched by default
    assert new.dtype == torch.float16 and bool((new[:, 3] == 0).all()) and bool(mask[:, 3].all())
    with pytest.raises(StreamPruneError):
        sparsegpt_prune(w, hs.H, 0.5, Structure(2, 4), blocksize=6)


# ------------------------------------------------------------------------------------------------ ADMM

def _admm_by_hand(w, H, sparsity, n, m, iters, gradual, rho, damp):
    """ADMM-Grad as the paper writes it, in float64 with explicit inverses: normalise by d = sqrt(diag H),
    A = Hn + damp I, then per iteration mask from |W + U| (per row, sorted by value then index; N:M: only the N
    smallest of each group are candidates), Z = masked W + U, U += W - Z, W = (A + rho I)^-1 (A W0 + rho (Z - U))
    in column form; the result is Z / d."""
    H = H.double()
    d = torch.diag(H).sqrt()
    Hn = H / d[:, None] / d[None, :]
    A = Hn + damp * torch.eye(H.shape[0], dtype=torch.float64)
    inv = torch.linalg.inv(A + rho * torch.eye(H.shape[0], dtype=torch.float64))
    W0 = (w.double() * d).t()                     # [in, out]: one column per output row
    XY = A @ W0
    W, U = W0.clone(), torch.zeros_like(W0)
    rows, cols = w.shape
    target = n / m if m else sparsity
    for t in range(1, iters + 1):
        if t <= gradual:
            cur = target * (1 - (1 - t / gradual) ** 3)
            k = int(cols * cur)
            mask = torch.zeros(rows, cols, dtype=torch.bool)
            V = (W + U).t().abs()
            for r in range(rows):
                cand = range(cols)
                if m:
                    cand = [g + j for g in range(0, cols, m)
                            for j in sorted(range(m), key=lambda j: (float(V[r, g + j]), j))[:n]]
                for j in sorted(cand, key=lambda j: (float(V[r, j]), j))[:k]:
                    mask[r, j] = True
        Z = (W + U) * ~mask.t()
        U = U + W - Z
        W = inv @ (XY + rho * (Z - U))
    Z = (W + U) * ~mask.t()
    return (Z.t() / d), mask


@pytest.mark.parametrize("structure,sparsity", [(Structure(), 0.5), (Structure(), 0.7), (Structure(2, 4), 0.5)])
def test_admm_matches_the_papers_iteration(structure, sparsity):
    x, H = _calib(91, 24)
    w = torch.randn(6, 24, generator=_gen(92))
    new, mask = admm_prune(w, H, sparsity, structure, iters=12, gradual=8, rho=0.7, damp=0.1)
    want_w, want_mask = _admm_by_hand(w, H, sparsity, structure.n, structure.m, 12, 8, 0.7, 0.1)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(new.double(), want_w, rtol=1e-4, atol=1e-4)


def test_admm_converges_to_the_least_squares_weights_on_its_mask():
    """With the mask fixed (gradual=1: Wanda's mask) and no damping, ADMM's fixed point is the exact constrained
    least-squares solution per row: w_S = w0_S + H_SS^-1 H_SR w0_R, w_R = 0, solved directly in float64."""
    x, H = _calib(93, 32, tokens=512)
    w = torch.randn(8, 32, generator=_gen(94))
    new, mask = admm_prune(w, H, 0.5, Structure(), iters=1500, gradual=1, rho=1.0, damp=0.0)
    Hd, want = H.double(), torch.zeros(8, 32, dtype=torch.float64)
    for r in range(8):
        S, R = (~mask[r]).nonzero().squeeze(1), mask[r].nonzero().squeeze(1)
        want[r, S] = w[r, S].double() + torch.linalg.solve(Hd[S][:, S], Hd[S][:, R] @ w[r, R].double())
    torch.testing.assert_close(new.double(), want, rtol=1e-4, atol=1e-4)
    # gradual=1 prunes at once with Wanda's metric: |W| * sqrt(diag H) per row
    assert torch.equal(mask, select(w.abs() * torch.diag(H).sqrt(), 0.5, Structure()))


@pytest.mark.parametrize("structure,sparsity", [(Structure(), 0.5), (Structure(), 0.7), (Structure(2, 4), 0.5),
                                                (Structure(4, 8), 0.5)])
def test_admm_objective_not_above_sparsegpt(structure, sparsity):
    """The layer-wise objective ||W X - W' X||^2 on the same statistic: ADMM (defaults) <= SparseGPT."""
    g = _gen(95)
    x = (torch.randn(1024, 64, generator=g) @ (torch.eye(64) + 0.5 * torch.randn(64, 64, generator=g))) \
        * (0.2 + 3 * torch.rand(64, generator=g))  # correlated inputs, channels of very different scale
    hs = HessianStats(64)
    hs.add(x.unsqueeze(0))
    w = torch.randn(32, 64, generator=g)

    def err(v):
        return float(((x @ (w - v).t()) ** 2).sum())

    new, mask = admm_prune(w, hs.H, sparsity, structure)
    ref, _ = sparsegpt_prune(w, hs.H, sparsity, structure)
    assert err(new) <= err(ref)
    assert bool((new[mask] == 0).all()) and not bool(torch.signbit(new[mask]).any())
    if structure.is_nm:
        assert _nm_ok(mask, structure.n, structure.m)
    else:
        assert bool((mask.sum(1) == int(64 * sparsity)).all())


def test_admm_row_chunks_dead_columns_h_and_dtype(monkeypatch):
    import streamprune.methods.admm as admm

    hs, w, H0 = _dead_column_case(96, 5, 9)
    new, mask = admm_prune(w, hs.H, 0.5, Structure(2, 4))
    assert torch.equal(hs.H, H0)                    # the caller's H is untouched unless overwrite_H
    assert new.dtype == torch.float16 and bool((new[:, 5] == 0).all())
    monkeypatch.setattr(admm, "SMALL_ELEMENTS", 0)  # split this small matrix too: rows 4, 4, 1
    monkeypatch.setattr(admm, "MIN_ROWS", 1)
    chunked, cmask = admm_prune(w, hs.H, 0.5, Structure(2, 4), row_chunk=4)
    assert torch.equal(cmask, mask)
    torch.testing.assert_close(chunked, new, rtol=1e-3, atol=1e-3)
    admm_prune(w, hs.H, 0.5, Structure(2, 4), overwrite_H=True)
    assert not torch.equal(hs.H, H0)                # reused for the factorization: memory as SparseGPT


def test_admm_schedule_and_options():
    assert [round(schedule(0.6, t, 4), 4) for t in range(1, 6)] == [0.3469, 0.525, 0.5906, 0.6, 0.6]
    for kwargs, match in [(dict(iters=0), "--admm-iters"), (dict(iters=5, gradual=6), "--admm-gradual"),
                          (dict(rho=0.0), "--admm-rho"), (dict(damp=-1.0), "--admm-damp")]:
        with pytest.raises(StreamPruneError, match=match):
            ADMM(**kwargs)


# ------------------------------------------------------------------------------------------------ OWL

def test_owl_outlier_ratio_direct():
    g = _gen(90)
    ws = [torch.randn(8, 12, generator=g), torch.randn(20, 12, generator=g) * 30, torch.randn(6, 20, generator=g)]
    ss = [torch.rand(12, generator=g) ** 4 * 50, torch.rand(12, generator=g), torch.rand(20, generator=g) ** 6 * 99]
    metrics = [w.abs() * s.sqrt() for w, s in zip(ws, ss)]
    flat = torch.cat([mt.flatten() for mt in metrics]).double()
    block = int((flat > 5 * flat.mean()).sum()) / flat.numel()
    per = sum(int((mt > 5 * mt.double().mean()).sum()) for mt in metrics) / flat.numel()
    assert block > 0 and per > 0 and block != per  # one mean over the whole block, not one per linear
    assert owl_outlier_ratio(list(zip(ws, ss))) == pytest.approx(block)
    assert owl_outlier_ratio(list(zip(ws, ss)), row_chunk=3) == pytest.approx(block)
    assert owl_outlier_ratio(list(zip(ws, ss)), hyper_m=1e9) == 0.0


def test_owl_sparsities_official_formula():
    assert owl_sparsities([1.0, 2.0, 3.0], 0.5, 0.08) == pytest.approx([0.58, 0.5, 0.42])
    assert owl_sparsities([7.0, 7.0, 7.0], 0.7) == [0.7, 0.7, 0.7]
    assert owl_sparsities([3.0], 0.6) == [0.6]
    assert owl_sparsities([], 0.5) == []


@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.08), (0.6, 0.2)])
def test_owl_sparsities_mean_order_spread(target, lam):
    ratios = [float(x) for x in torch.rand(32, generator=_gen(91)) * 10]
    sp = owl_sparsities(ratios, target, lam)
    assert abs(sum(sp) / len(sp) - target) < 1e-12
    assert max(sp) - min(sp) == pytest.approx(2 * lam) and max(sp) - min(sp) <= 2 * lam + 1e-12
    for (ra, sa), (rb, sb) in itertools.combinations(zip(ratios, sp), 2):
        if ra > rb:
            assert sa < sb
        elif ra < rb:
            assert sa > sb


def test_owl_sparsities_clamped_into_open_interval():
    sp = owl_sparsities([0.0, 0.0, 0.0, 10.0], 0.05, 0.08)
    assert all(0 < s < 1 for s in sp) and sp[-1] == 0.01
    sp = owl_sparsities([0.0, 10.0, 10.0, 10.0], 0.95, 0.08)
    assert all(0 < s < 1 for s in sp) and sp[0] == 0.99


def test_spread_weighted_keeps_the_weighted_mean_and_the_order():
    ratios, sizes = [0.02, 0.10, 0.05, 0.02], [100, 300, 50, 550]
    got = spread_weighted(ratios, sizes, 0.7, 0.08)
    assert sum(g * n for g, n in zip(got, sizes)) / sum(sizes) == pytest.approx(0.7, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(0.16)              # 2 lambda
    assert got[1] == min(got) and got[0] == got[3] == max(got)     # most outliers: least pruned
    assert spread_weighted([0.3, 0.3], [1, 5], 0.6, 0.08) == [0.6, 0.6]
    assert min(spread_weighted([0.0, 1.0], [1000, 1], 0.05, 0.04)) == 0.01   # clamped into (0, 1)



# ---------------------------------------------------------------- the zeros written, counted


DEAD = 16  # input channels of block 0's attention no token reaches (more than --sparsity 0.1 masks per row)


@pytest.fixture(scope="module")
def dead_channels(tiny_models, tmp_path_factory):
    """A tiny model whose block 0 input norm zeroes DEAD hidden channels: q/k/v see all-zero inputs there."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("dead") / "model"
    shutil.copytree(tiny_models("llama", realistic=False), dst)
    name = "model.layers.0.input_layernorm.weight"
    for shard in dst.glob("*.safetensors"):
        t = load_file(shard)
        if name in t:
            t[name][::4][:DEAD] = 0
            save_file(t, shard, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("method", ["admm", "sparsegpt", "wanda", "magnitude"])
def test_counts_are_the_zeros_written(method, dead_channels, ids_file, tmp_path):
    """Summary, job state, `status` and `report` count the zeros on disk, for every method; the masks' own share
    (the requested sparsity) is `mask_sparsity`, and the summary line says where the rest came from. ADMM and
    SparseGPT zero the dead channels' columns beyond their masks."""
    from click.testing import CliRunner

    from streamprune.cli import main
    from streamprune.reporting import report
    from streamprune.state import JobDir
    from tiny import tensors

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prune", str(dead_channels), str(out), "--calib", str(ids_file), "--nsamples",
                                    "8", "--seqlen", "32", "--sparsity", "0.1", "--method", method, "--no-progress"])
    assert res.exit_code == 0, res.stderr
    got = tensors(out)
    pruned = [t for n, t in got.items() if ".layers." in n and t.dim() == 2]
    on_disk = sum(int((t == 0).sum()) for t in pruned) / sum(t.numel() for t in pruned)
    state = JobDir(out).load()
    q = state.blocks[0].linears["self_attn.q_proj"]
    assert q["zeros"] == int((got["model.layers.0.self_attn.q_proj.weight"] == 0).sum())
    assert state.sparsity() == pytest.approx(on_disk, abs=1e-12)
    assert report(out)["overall"] == pytest.approx(on_disk, abs=1e-12)
    status = json.loads(CliRunner().invoke(main, ["status", str(out), "--json"]).stdout)
    assert status["sparsity"] == pytest.approx(on_disk, abs=1e-12)
    assert status["mask_sparsity"] == pytest.approx(0.1, abs=0.02)
    rows = q["numel"] // 64
    if method == "admm":          # its mask: int(64 x 0.1) per row; the dead columns zeroed by the update too
        assert (q["masked"], q["zeros"]) == (rows * int(64 * 0.1), rows * DEAD)
        assert "zeros from the data" in res.stdout
    elif method == "sparsegpt":   # its mask takes every tie of its threshold: the dead columns' zeros
        assert q["masked"] == q["zeros"] == rows * DEAD and "from the data" not in res.stdout
    else:
        assert q["zeros"] == q["masked"] and "from the data" not in res.stdout
