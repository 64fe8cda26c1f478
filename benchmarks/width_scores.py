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
    if isinstance(fraction, str):  # "dX": damping X x each channel's own diagonal (shrinking G toward its diagonal)
        L = torch.linalg.cholesky(Gss + torch.diag(float(fraction[1:]) * Gss.diagonal()))
        return W[:, keep_idx] + torch.cholesky_solve((W[:, drop_idx] @ G[drop_idx][:, keep_idx]).t(), L).t()
    L = torch.linalg.cholesky(Gss + fraction * Gss.diagonal().mean() * torch.eye(len(keep_idx)))
    return W[:, keep_idx] + torch.cholesky_solve((W[:, drop_idx] @ G[drop_idx][:, keep_idx]).t(), L).t()


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
        acc = dict(sq=torch.zeros(inter), G=torch.zeros(inter, inter), sq_in=torch.zeros(model.config.hidden_size))

        def down_in(mod, args):
            x = args[0].reshape(-1, inter).float()
            acc["sq"] += (x * x).sum(0)
            acc["G"] += x.t() @ x

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
    args = ap.parse_args()

    from streamprune.calibration import calibration_windows
    from streamprune.demo import build_smollm2
    from streamprune.evaluate import make_windows, read_token_stream

    model = build_smollm2()
    torch.set_num_threads(2)
    calib = calibration_windows(str(WIKITEXT / "valid.txt"), model, args.nsamples, args.seqlen, 0, 49152)
    test = make_windows(read_token_stream(WIKITEXT / "test.txt", model), 512, 10, "test")
    for spec in args.runs:
        ratio, score, fraction = spec.split(",")
        t = time.time()
        ppl, keep = run(model, calib, test, float(ratio), score, fraction if fraction.startswith("d") else float(fraction))
        print(f"ratio {ratio} score {score} damping {fraction} keep {keep} calibration {args.nsamples}x{args.seqlen}: "
              f"ppl {ppl:.2f} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
