"""The computation on one block: the dense statistics pass, the pruner on every linear, the propagation pass.

Nothing here reads or writes files or job state; the block arrives with its weights and leaves pruned, and its
outputs (the next block's inputs) are in the activation store. Statistics come from the still dense block, for
every linear from the same pass; the propagation runs the pruned block on the same inputs (Wanda, Sun et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .memory import trim
from .errors import StreamPruneError
from .groups import Calls, Replaced, each_group, group_call, refuse_unsupported, sum_outputs
from .model import all_finite
from .targets import block_output, expert_count, experts_modules, targets
from .routing import find_routers
from .statistics import BlockStatistics, GroupStatistics, StopForward, _forced_routing


TRIM_ELEMENTS = 1 << 20  # a malloc_trim costs about 1 ms: worth it after a workspace of several MB, per linear
CHECK_ELEMENTS = 1 << 22  # check_pruned's chunk: a few 4 MB temporaries
BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}  # a float's bits, by its size


class Stopped(Exception):
    """A stop was requested in the middle of a pass: the block is abandoned (it is not committed)."""


@dataclass
class BlockResult:
    linears: dict         # target label (a linear's module name, an experts parameter) -> {"zeros", "numel"}
    target: float         # the sparsity this block was pruned to
    masks: dict           # local parameter name -> mask, for the parameters asked for
    recomputed: set       # local parameter names the pruner replaced (not only masked)
    experts: int = 0      # experts pruned (each with its own matrices)
    fallback: int = 0     # experts that took the all-tokens statistics (see BlockLoop.fallback)

    @property
    def sparsity(self) -> float:
        zeros = sum(v["zeros"] for v in self.linears.values())
        numel = sum(v["numel"] for v in self.linears.values())
        return zeros / numel if numel else 0.0


def check_pruned(w: torch.Tensor, mask: torch.Tensor, structure, where: str) -> None:
    """The guarantees edge exports rely on, checked on the weight as it goes to the writer: every pruned entry is
    +0.0, and with N:M every group of M consecutive inputs of every row holds at least N zeros. In row chunks of
    at most CHECK_ELEMENTS entries: its temporaries stay small beside the block."""
    rows = max(1, CHECK_ELEMENTS // max(1, w.shape[1]))
    bits = w.view(BITS[w.element_size()])  # +0.0 is the one float whose bits are all zero (-0.0, NaN are not)
    for r in range(0, w.shape[0], rows):
        wc, mc = w[r:r + rows], mask[r:r + rows]
        if bool((mc & (bits[r:r + rows] != 0)).any()):
            raise StreamPruneError(f"internal: {where}: a pruned entry is not +0.0")
        if structure.is_nm:
            zeros = (wc == 0).reshape(wc.shape[0], -1, structure.m).sum(-1)
            if bool((zeros < structure.n).any()):
                raise StreamPruneError(f"internal: {where}: a group of {structure.m} inputs holds fewer than "
                                       f"{structure.n} zeros")


class BlockLoop:
    def __init__(self, pruner, structure, runtime, observer, device: torch.device, dtype: torch.dtype,
                 row_chunk: int = 0, expert_min_tokens: int = 0, profile=None):
        self.pruner, self.structure, self.rt, self.obs = pruner, structure, runtime, observer
        self.profile = profile
        # what the dense pass gathers: the pruner's statistics, and those a profile allocating within blocks reads
        self.needs = pruner.needs | (profile.within_needs if profile is not None else frozenset())
        self.device, self.dtype, self.row_chunk = device, dtype, row_chunk
        self.expert_min_tokens = expert_min_tokens
        self.probe = None  # () -> (hidden, [kwargs of block i]) of a probe window: routers without calibration
        self.calls = None  # expert groups: the experts module's recorded calls (groups.Calls) while a pass runs

    @torch.no_grad()
    def forward_all(self, block: nn.Module, i: int, acts, desc: str, outputs: bool = True,
                    stats: BlockStatistics | None = None) -> None:
        """Run this rank's calibration batches through `block` (outputs into `acts.outputs` if asked)."""
        if self.rt.stop_requested():
            raise Stopped
        for k, (j0, j1) in enumerate(self.obs.bar(acts.batches, desc=f"block {i} {desc}", leave=False)):
            if self.rt.signal_pending:
                raise Stopped
            self.obs.event(desc)
            a, b = acts.local(j0, j1)
            if stats is not None:
                stats.batch = j1 - j0
            if self.calls is not None:  # expert groups: which batch the experts module is called for
                self.calls.batch, self.calls.sequences = k, j1 - j0
            try:
                y = block_output(block, acts.inputs.read(a, b, self.device), acts.kwargs[j1 - j0][i])
            except StopForward:
                continue
            if stats is not None:
                stats.forward_done()
            if outputs:
                if not all_finite(y):
                    raise StreamPruneError(f"block {i}: its outputs are not finite (NaN or Inf) in "
                                           f"{str(self.dtype).replace('torch.', '')} compute"
                                           + ("; rerun with --dtype float32" if self.dtype != torch.float32 else ""))
                acts.outputs.write(a, y)

    def statistics(self, block: nn.Module, i: int, acts, needs: frozenset, desc: str, outputs: bool,
                   force: dict | None = None, only=None) -> BlockStatistics:
        """A dense pass with statistics hooks (stopping after the last target unless outputs are wanted)."""
        with BlockStatistics(block, needs, record=self.rt.dist.enabled, stop_early=not outputs,
                             force=force, only=only) as stats:
            self.forward_all(block, i, acts, desc, outputs=outputs, stats=stats)
        if self.rt.dist.enabled:
            stats.reduce(self.rt.dist)
        if not force:
            self.check_finite(i, stats)
            self.check_reached(i, stats)
        return stats

    @staticmethod
    def check_reached(i: int, stats) -> None:
        """Every linear's input was seen: a linear whose weight the model's code uses without calling the module
        (a state-space scan's projection) has no statistics, and pruning it from zeros would be arbitrary."""
        for t in stats.targets:
            if t.experts is None and stats.stats[(t.name, None)].tokens == 0:
                raise StreamPruneError(f"block {i} {t.label}: the block's forward uses this linear's weight without "
                                       f"calling it, so its input statistics cannot be gathered; not supported "
                                       f"(--method magnitude needs none)")

    def check_finite(self, i: int, stats) -> None:
        for key, st in stats.unique().items():
            if not st.finite():
                name = key[0] if key[1] is None else f"{key[0]} (expert {key[1]})"
                raise StreamPruneError(f"block {i} {name.removesuffix('.weight')}: its inputs are not finite (NaN or "
                                       f"Inf) in {str(self.dtype).replace('torch.', '')} compute; "
                                       + ("rerun with --dtype float32" if self.dtype != torch.float32 else
                                          "the blocks before it produce them"))

    def fallback(self, block: nn.Module, i: int, acts, stats: BlockStatistics) -> int:
        """Experts the calibration data barely reached (fewer than `expert_min_tokens` routed tokens) take the
        statistics they would have if every token were routed to them, computed by the model's own expert code
        with the routing forced. Returns how many experts did."""
        from .targets import experts_modules

        names = {id(m): n for n, m in experts_modules(block).items()}
        starved = {}
        for t in stats.targets:
            for e in range(t.experts or 0):
                if stats.stats[(t.name, e)].tokens < self.expert_min_tokens:
                    starved.setdefault(names[id(t.module)], set()).add(e)
        if not starved:
            return 0
        force = {name: sorted(es) for name, es in starved.items()}
        full = self.statistics(block, i, acts, self.needs, "fallback", outputs=False, force=force)
        for t in stats.targets:
            for e in starved.get(names.get(id(t.module)), ()):
                stats.stats[(t.name, e)] = full.stats[(t.name, e)]
        return sum(len(es) for es in starved.values())

    @torch.no_grad()
    def prune_block(self, i: int, block: nn.Module, acts, sparsity: float, want_masks: set,
                    experts=None) -> BlockResult:
        """Prune every target of block i in place (each expert's matrix on its own); `want_masks` names the
        parameters whose masks to return. `experts` (a groups.ExpertSource): the block's experts module is on the
        host, to be streamed through the device in groups."""
        if self.structure.width:
            return self._prune_width(i, block, acts, sparsity)
        self.find_routers(i, block, acts)
        if experts is not None:
            return self._prune_grouped(i, block, acts, sparsity, want_masks, experts)
        stats = None
        result = BlockResult({}, sparsity, {}, set())
        if self.pruner.needs_data:
            with self.obs.phase("statistics", self.device):
                stats = self.statistics(block, i, acts, self.needs, "statistics", outputs=False)
                result.fallback = self.fallback(block, i, acts, stats)
        with self.obs.phase("prune", self.device):
            self.prune_targets(i, stats.targets if stats else targets(block), stats, self.within(sparsity, stats),
                               sparsity, want_masks, result)
        del stats
        result.experts = sum(expert_count(m) for m in experts_modules(block).values())
        if self.pruner.needs_data:
            with self.obs.phase("propagate", self.device):
                self.forward_all(block, i, acts, "propagate")
        return result

    def find_routers(self, i: int, block: nn.Module, acts) -> None:
        """Block i's router linears (routing.find_routers), from one forward of its first calibration batch, or
        of `self.probe` (the captured input of a probe window: methods without calibration data)."""
        if not experts_modules(block):
            return
        if acts is not None:
            j0, j1 = acts.batches[0]
            a, b = acts.local(j0, j1)
            hidden, kwargs = acts.inputs.read(a, b, self.device), acts.kwargs[j1 - j0][i]
        else:
            hidden, kwargs = self.probe()
            kwargs = kwargs[i]
        find_routers(block, hidden, kwargs)

    def prune_targets(self, i: int, found: list, stats, per: dict, sparsity: float, want_masks: set,
                      result: BlockResult, experts: range | None = None, masks: dict | None = None) -> None:
        """Prune each target's matrices (each expert's on its own; only those in `experts` when given, with the
        target's tensor holding just them) in place, from its statistics; counts and masks into `result` (the
        masks of the parameters in `want_masks`, or into `masks` {attribute: mask} for a group of experts)."""
        for t in found:
            zeros = numel = 0
            wanted = (t.attr in masks) if masks is not None else t.name in want_masks
            full = torch.zeros(t.weight.shape, dtype=torch.bool, device=t.weight.device) if wanted else None
            first = experts.start if experts is not None else 0
            for e in ([None] if t.experts is None else (experts or range(t.experts))):
                local = None if e is None else e - first
                w = t.matrix(t.weight, local)
                pruned = self.pruner.prune(w, stats.pop((t.name, e)) if stats else None,
                                           per.get((t.name, e), sparsity), self.structure, self.row_chunk)
                if pruned.weight is not None:
                    w.copy_(pruned.weight)
                    result.recomputed.add(t.name)
                w.masked_fill_(pruned.mask, 0)
                w.add_(0.0)  # -0.0 + 0.0 = +0.0: no negative zero anywhere (some sparse kernels misread it)
                check_pruned(w, pruned.mask, self.structure,
                             f"block {i} {t.label}" + ("" if e is None else f" expert {e}"))
                zeros, numel = zeros + int(pruned.mask.count_nonzero()), numel + pruned.mask.numel()
                if full is not None:
                    t.matrix(full, local).copy_(pruned.mask)
                del pruned
                if w.numel() >= TRIM_ELEMENTS:
                    trim()  # its metric and selection workspace went back to malloc: give the pages to the OS
            before = result.linears.get(t.label, {"zeros": 0, "numel": 0})
            result.linears[t.label] = {"zeros": before["zeros"] + zeros, "numel": before["numel"] + numel}
            if full is not None and masks is not None:
                masks[t.attr] = full
            elif full is not None:
                result.masks[t.name] = full

    def within(self, sparsity: float, stats: BlockStatistics | None) -> dict:
        """{(target name, expert): sparsity} from a profile that allocates inside blocks ({} otherwise)."""
        if stats is None or self.profile is None or not self.profile.within_needs:
            return {}
        keys = [(t, e) for t in stats.targets for e in ([None] if t.experts is None else range(t.experts))]
        got = self.profile.within(sparsity, [(t.matrix(t.weight, e), stats.stats[(t.name, e)]) for t, e in keys],
                                  self.row_chunk)
        return {} if got is None else {(t.name, e): s for (t, e), s in zip(keys, got)}

    # ------------------------------------------------------------------ experts in groups (groups.py)

    @torch.no_grad()
    def _prune_grouped(self, i: int, block: nn.Module, acts, sparsity: float, want_masks: set, src) -> BlockResult:
        """Block i with its experts module streamed in groups of `src.size` experts: groups.py's steps 1-3 for
        the statistics (each group pruned right after its own), then again on the pruned block to propagate."""
        module = block.get_submodule(src.module_name)
        mine = [t for t in targets(block) if t.module is module]
        others = lambda t: t.module is not module  # noqa: E731
        result = BlockResult({t.label: {"zeros": 0, "numel": 0} for t in targets(block)}, sparsity, {}, set())
        if not self.pruner.needs_data:  # magnitude: no pass, each group pruned from its weights alone
            with self.obs.phase("experts", self.device):
                self._groups(i, module, mine, src, None, sparsity, result)
            with self.obs.phase("prune", self.device):
                self.prune_targets(i, [t for t in targets(block) if others(t)], None, {}, sparsity, want_masks,
                                   result)
            result.experts = expert_count(module)
            return result
        with self.obs.phase("statistics", self.device):
            calls = self._record(block, i, acts, module, src, "experts input")
        with self.obs.phase("experts", self.device):  # statistics and prune, group by group
            self._groups(i, module, mine, src, calls, sparsity, result)
        with self.obs.phase("statistics", self.device):
            with Replaced(module, calls.replay):
                stats = self.statistics(block, i, acts, self.needs, "statistics", outputs=False, only=others)
            self.calls = None
        with self.obs.phase("prune", self.device):
            self.prune_targets(i, stats.targets, stats, {}, sparsity, want_masks, result)
        del stats, calls
        result.experts = expert_count(module)
        with self.obs.phase("propagate", self.device):
            calls = self._record(block, i, acts, module, src, "experts input")
            sum_outputs(module, mine, src, calls, self.device, lambda: self.rt.signal_pending, Stopped)
            with Replaced(module, calls.replay):
                self.forward_all(block, i, acts, "propagate")
            self.calls = None
        return result

    def _record(self, block: nn.Module, i: int, acts, module: nn.Module, src, desc: str) -> Calls:
        """Step 1: every batch's call of the experts module, the block stopped there."""
        self.calls = Calls(src.store)
        with Replaced(module, self.calls.record):
            self.forward_all(block, i, acts, desc, outputs=False)
        return self.calls

    def _groups(self, i: int, module: nn.Module, mine: list, src, calls: Calls | None, sparsity: float,
                result: BlockResult) -> None:
        """Step 2 of the dense pass, group by group: the group's parameters on the device; its experts' statistics
        and summed output from the recorded calls (none for magnitude); pruned and written back."""
        count = expert_count(module)
        for group in each_group(module, src, lambda: self.rt.signal_pending, Stopped):
            params = {a: getattr(module, a) for a in src.params}
            stats = GroupStatistics(mine, params, group[0], group[1] - group[0], self.needs, self.rt.dist.enabled)
            if calls is not None:
                for k in list(calls.recorded):
                    group_call(module, calls, k, stats, group, count, src.module_name, self.device)
            if self.pruner.needs_data:
                if self.rt.dist.enabled:
                    stats.reduce(self.rt.dist)
                self.check_finite(i, stats)
                result.fallback += self._group_fallback(module, mine, params, calls, stats, group, count,
                                                        src.module_name)
            masks = {t.attr: None for t in mine if src.needs_mask(t.attr)}  # filled by prune_targets
            self.prune_targets(i, mine, stats if self.pruner.needs_data else None, {}, sparsity, set(), result,
                               experts=range(*group), masks=masks)
            for t in mine:
                src.write(t.attr, group, getattr(module, t.attr), masks.get(t.attr), t.name in result.recomputed)
            del masks, stats, params

    def _group_fallback(self, module, mine: list, params: dict, calls: Calls, stats, group: tuple, count: int,
                        name: str) -> int:
        """BlockLoop.fallback for one group: its starved experts' statistics with every token routed to them."""
        starved = sorted({e for t in mine for e in range(*group)
                          if stats.stats[(t.name, e)].tokens < self.expert_min_tokens})
        if not starved:
            return 0
        forced = GroupStatistics(mine, params, group[0], group[1] - group[0], self.needs, self.rt.dist.enabled)
        for k in list(calls.recorded):
            args, kwargs, sequences = calls.on(self.device, k)
            args, kwargs = _forced_routing(args, kwargs, [e - group[0] for e in starved])
            try:
                forced.run(lambda: module(*args, **kwargs), sequences)
            except (RuntimeError, IndexError) as e:
                refuse_unsupported(e, name)
        if self.rt.dist.enabled:
            forced.reduce(self.rt.dist)
        for t in mine:
            for e in starved:
                stats.stats[(t.name, e)] = forced.stats[(t.name, e)]
        return len(starved)

    @torch.no_grad()
    def _prune_width(self, i: int, block: nn.Module, acts, ratio: float) -> BlockResult:
        """`--structure width`: the MLP's channels removed (width.py), statistics from the dense pass as above."""
        stats = None
        if self.pruner.needs_data:
            with self.obs.phase("statistics", self.device):
                stats = self.statistics(block, i, acts, self.pruner.needs_of(block), "statistics", outputs=False)
        with self.obs.phase("prune", self.device):
            linears = self.pruner.prune_block(block, stats, i)
        del stats
        trim()
        result = BlockResult(linears, ratio, {}, {f"{name}.weight" for name in linears} | {
            f"{name}.bias" for name in linears if block.get_submodule(name).bias is not None})
        if self.pruner.needs_data:
            with self.obs.phase("propagate", self.device):
                self.forward_all(block, i, acts, "propagate")
        return result

    def sweep(self, model, acts, profile) -> list[float]:
        """A sweeping profile's dense pass over every block: each block's score, from its dense statistics,
        its outputs the next block's inputs (nothing is pruned)."""
        scores = []
        for i in self.obs.bar(range(len(model.blocks)), desc=f"{profile.name} sweep", unit="block"):
            block, _ = model.load_block(i)
            self.find_routers(i, block, acts)
            stats = self.statistics(block, i, acts, profile.needs, profile.name, outputs=True)
            self.fallback(block, i, acts, stats)
            pairs = [(t.matrix(t.weight, e), stats.stats[(t.name, e)]) for t in stats.targets
                     for e in ([None] if t.experts is None else range(t.experts))]
            scores.append(profile.score(pairs, self.row_chunk))
            del stats, pairs
            model.release_block(i)
            acts.swap()
        return scores
