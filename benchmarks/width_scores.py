"""Which channel score and how much damping for `--structure width`: an in-memory study on SmolLM2-135M.

The same computation as streamprune's width pruning (width.py), written out on transformers' model in memory so
that variants are quick to try: block by block, the down projection's input statistics through the already
shrunk blocks, a channel score, the kept channels, the damped least-squares refit of down_proj
(W_S + W_R G_RS (G_SS + d I)^-1, d = FRACTION x mean diag G_SS; FRACTION 0 = no refit). Perplexity on the first
10 windows of 512 tokens of WikiText-2 test, float32.

Scores (per channel j; W = down_proj.weight, x = its input, G = x^T x):
  down  sum_i |W_ij| x ||x_j||          (streamprune's: Wanda's metric over the column)
  l2    ||W_:j|| x ||x_j||
  prod  Wanda's metric over the gate and up rows (the producers)
  both  down and prod, each divided by its mean, summed
  obs   ||W_:j||^2 / [(G + d I)^-1]_jj  (the error left after an OBS refit, one shot)
  iobsK obs, K rounds: remove 1/K of the channels, refit, score again

    python benchmarks/width_scores.py 0.2,down,0.1 0.2,l2,0.1 0.2,obs,0.01     # RATIO,SCORE,FRACTION ...
    python benchmarks/width_scores.py --nsamples 64 --seqlen 512 0.2,down,0.01
    python benchmarks/width_scores.py 0.2,down,d0.1        # dX: damping X x each channel's own diagonal of G_SS

More refits (the FRACTION field): pcrR (least squares on the top R eigenvectors of G_SS), pcsR (the same on the
channels scaled to unit norm), topK/D (each removed channel regressed on its K most correlated kept ones, ridge
D), cvridge / cvdiag / cvpcr (the damping, diagonal damping or rank chosen per block by cross-validation over the
calibration windows: fit on all folds but one, the held-out error of down's output, `--folds`, the chosen
damping scaled by (K-1)/K for fitting on fewer tokens unless `--cv-raw`). Score hybD: down x sqrt(the share of
||x_j||^2 the other channels do not explain, damping D).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
sys.path.insert(0, str(REPO))


def perplexity(model, windows) -> float:
    with torch.no_grad():
        return math.exp(sum(float(model(w[None], labels=w[None]).loss) for w in windows) / len(windows))


def refit(W, G, keep_idx, drop_idx, fraction):
    Gss = G[keep_idx][:, keep_idx]
    if not fraction:
        return W[:, keep_idx]
    if isinstance(fraction, str) and fraction.startswith("pcs"):  # "pcsR": pcrR on the channels scaled to unit norm
        r = int(fraction[3:])
        d = G.diagonal().clamp_min(1e-12).sqrt()
        Gn = G / d[:, None] / d[None, :]
        Wn = W * d[None, :]
        return refit(Wn, Gn, keep_idx, drop_idx, f"pcr{r}") / d[None, keep_idx]
    if isinstance(fraction, str) and fraction.startswith("pcr"):  # "pcrR": regression on G_SS's top R eigenvectors
        r = int(fraction[3:])
        evals, evecs = torch.linalg.eigh(Gss.double())
        V, e = evecs[:, -r:], evals[-r:]
        B = (G[drop_idx][:, keep_idx].double() @ V) / e @ V.t()      # removed channels regressed on the kept
        return W[:, keep_idx] + (W[:, drop_idx].double() @ B).float()
    if isinstance(fraction, str) and fraction.startswith("top"):  # "topK,D": each removed channel on its K most
        k, d = fraction[3:].split("/")                                # correlated kept ones, ridge D
        k, d = int(k), float(d)
        Grs = G[drop_idx][:, keep_idx]
        corr = Grs / (G.diagonal()[drop_idx, None] * Gss.diagonal()[None, :]).sqrt()
        B = torch.zeros_like(Grs)
        mean = Gss.diagonal().mean()
        for r in range(len(drop_idx)):
            idx = corr[r].abs().topk(k).indices
            A = Gss[idx][:, idx] + d * mean * torch.eye(k)
            B[r, idx] = torch.linalg.solve(A, Grs[r, idx])
        return W[:, keep_idx] + W[:, drop_idx] @ B
    if isinstance(fraction, str):  # "dX": damping X x each channel's own diagonal (shrinking G toward its diagonal)
        L = torch.linalg.cholesky(Gss + torch.diag(float(fraction[1:]) * Gss.diagonal()))
        return W[:, keep_idx] + torch.cholesky_solve((W[:, drop_idx] @ G[drop_idx][:, keep_idx]).t(), L).t()
    L = torch.linalg.cholesky(Gss + fraction * Gss.diagonal().mean() * torch.eye(len(keep_idx)))
    return W[:, keep_idx] + torch.cholesky_solve((W[:, drop_idx] @ G[drop_idx][:, keep_idx]).t(), L).t()


FOLDS = 2        # --folds
CORRECT = True   # --cv-raw sets False
RIDGE_GRID = (0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)


def cv_refit(W, G, folds, keep_idx, drop_idx, kind):
    """The refit with its regularization chosen per block by FOLDS-fold cross-validation over calibration windows:
    "ridge" picks d (x mean diag) from RIDGE_GRID, "pcr" the rank from 32..keep. Held-out error of down's output:
    tr(W_R (B G_SS B^T - 2 B G_SR + G_RR) W_R^T) on the left-out fold."""
    k = len(keep_idx)
    if kind == "diag":  # ridge toward each channel's own diagonal: ridge on the channels scaled to unit norm
        d = G.diagonal().clamp_min(1e-12).sqrt()
        scale = lambda M: M / d[:, None] / d[None, :]  # noqa: E731
        out = cv_refit(W * d[None, :], scale(G), [scale(f) for f in folds], keep_idx, drop_idx, "ridge")
        return out / d[None, keep_idx]
    WR = W[:, drop_idx].double()
    grid = RIDGE_GRID if kind == "ridge" else [r for r in (32, 64, 128, 192, 256, 384, 512, 640, 768, 1024) if r < k] + [k]
    errs = torch.zeros(len(grid), dtype=torch.float64)
    for f in range(len(folds)):
        Gt, Gv = (G - folds[f]).double(), folds[f].double()
        Gss, Grs = Gt[keep_idx][:, keep_idx], Gt[drop_idx][:, keep_idx]
        e, V = torch.linalg.eigh(Gss)
        P = WR @ Grs @ V  # out x k
        vss, vrs, vrr = Gv[keep_idx][:, keep_idx], Gv[drop_idx][:, keep_idx], Gv[drop_idx][:, drop_idx]
        for gi, g in enumerate(grid):
            if kind == "ridge":
                filt = 1 / (e + g * Gss.diagonal().mean())
                M = (P * filt) @ V.t()                      # W_R B
            else:
                M = (P[:, -g:] / e[-g:]) @ V[:, -g:].t()
            errs[gi] += ((M @ vss) * M).sum() - 2 * ((WR @ vrs) * M).sum() + ((WR @ vrr) * WR).sum()
    best = grid[int(errs.argmin())]
    if kind == "ridge" and CORRECT:
        best = best * (len(folds) - 1) / len(folds)  # the folds fit on (K-1)/K of the tokens: a little less damping
    CHOSEN.append(best)
    return refit(W, G, keep_idx, drop_idx, best if kind == "ridge" else f"pcr{best}")


CHOSEN = []


def choose(score: str, W, G, sq, sq_in, mlp, keep: int, fraction: float):
    inter = W.shape[1]
    if score.startswith("iobs"):
        rounds, alive, Wc = int(score[4:]), torch.arange(inter), W.clone()
        for r in range(1, rounds + 1):
            k = inter - round((inter - keep) * r / rounds)
            Ga = G[alive][:, alive]
            inv = torch.linalg.inv(Ga + max(fraction, 1e-2) * Ga.diagonal().mean() * torch.eye(len(alive)))
            loc = torch.sort(torch.topk((Wc ** 2).sum(0) / inv.diagonal(), k).indices).values
            dead = torch.tensor(sorted(set(range(len(alive))) - set(loc.tolist())), dtype=torch.long)
            Wc = refit(Wc, Ga, loc, dead, max(fraction, 1e-2))
            alive = alive[loc]
        return alive
    norm = sq.sqrt()
    if score == "down":
        s = W.abs().sum(0) * norm
    elif score == "l2":
        s = W.norm(dim=0) * norm
    elif score in ("prod", "both"):
        s = (mlp.gate_proj.weight.abs() * sq_in.sqrt()).sum(1) + (mlp.up_proj.weight.abs() * sq_in.sqrt()).sum(1)
        if score == "both":
            d = W.abs().sum(0) * norm
            s = d / d.mean() + s / s.mean()
    elif score == "obs":
        inv = torch.linalg.inv(G + max(fraction, 1e-2) * G.diagonal().mean() * torch.eye(inter))
        s = (W ** 2).sum(0) / inv.diagonal()
    else:
        raise SystemExit(f"unknown score {score}")
    return torch.sort(torch.sort(-s, stable=True).indices[:keep]).values


@torch.no_grad()
def run(model_dir, calib, test, ratio: float, score: str, fraction: float, multiple: int = 8) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inter = model.config.intermediate_size
    keep = round(inter * (1 - ratio) / multiple) * multiple
    layers = model.model.layers
    xs, kws = [], []

    def grab(mod, args, kwargs):
        xs.append(args[0] if args else kwargs["hidden_states"])
        kws.append(kwargs)
        raise ValueError

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    for w in calib:
        try:
            model(w[None])
        except ValueError:
            pass
    h.remove()
    for layer in layers:
        mlp = layer.mlp
        acc = dict(sq=torch.zeros(inter), G=torch.zeros(inter, inter), sq_in=torch.zeros(model.config.hidden_size),
                   folds=[torch.zeros(inter, inter) for _ in range(FOLDS)], window=0)

        def down_in(mod, args):
            x = args[0].reshape(-1, inter).float()
            acc["sq"] += (x * x).sum(0)
            acc["G"] += x.t() @ x
            acc["folds"][acc["window"] % FOLDS] += x.t() @ x
            acc["window"] += 1

        def gate_in(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            acc["sq_in"] += (x * x).sum(0)

        hs = [mlp.down_proj.register_forward_pre_hook(down_in), mlp.gate_proj.register_forward_pre_hook(gate_in)]
        for x, kw in zip(xs, kws):
            layer(x, **kw)
        for hh in hs:
            hh.remove()
        W = mlp.down_proj.weight.float()
        kept = choose(score, W, acc["G"], acc["sq"], acc["sq_in"], mlp, keep, fraction)
        dropped = torch.tensor(sorted(set(range(inter)) - set(kept.tolist())), dtype=torch.long)
        if isinstance(fraction, str) and fraction.startswith("cv"):
            new = cv_refit(W, acc["G"], acc["folds"], kept, dropped, fraction[2:])
        else:
            new = refit(W, acc["G"], kept, dropped, fraction)
        mlp.gate_proj.weight = torch.nn.Parameter(mlp.gate_proj.weight[kept])
        mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight[kept])
        mlp.down_proj.weight = torch.nn.Parameter(new.contiguous())
        xs = [y[0] if isinstance(y, tuple) else y for y in (layer(x, **kw) for x, kw in zip(xs, kws))]
    model.config.intermediate_size = keep
    return perplexity(model, test), keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="RATIO,SCORE,FRACTION")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--folds", type=int, default=2, help="cross-validation folds (calibration windows in turn)")
    ap.add_argument("--cv-raw", action="store_true", help="the damping the folds chose, not scaled by (K-1)/K")
    args = ap.parse_args()
    global FOLDS, CORRECT
    FOLDS, CORRECT = args.folds, not args.cv_raw

    from streamprune.calibration import calibration_windows
    from streamprune.demo import build_smollm2
    from streamprune.evaluation import make_windows, read_token_stream

    model = build_smollm2()
    torch.set_num_threads(2)
    calib = calibration_windows(str(WIKITEXT / "valid.txt"), model, args.nsamples, args.seqlen, 0, 49152)
    test = make_windows(read_token_stream(WIKITEXT / "test.txt", model), 512, 10, "test")
    for spec in args.runs:
        ratio, score, fraction = spec.split(",", 2)
        t = time.time()
        ppl, keep = run(model, calib, test, float(ratio), score, fraction if fraction[0] in "dptc" else float(fraction))
        print(f"ratio {ratio} score {score} damping {fraction} keep {keep} calibration {args.nsamples}x{args.seqlen}: "
              f"ppl {ppl:.2f} ({time.time() - t:.0f} s)" + (f" chosen {CHOSEN}" if CHOSEN else ""), flush=True)
        CHOSEN.clear()


if __name__ == "__main__":
    main()
